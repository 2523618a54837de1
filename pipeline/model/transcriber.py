"""wav2vec2-family CTC inference on padded batches, pipelined. Pure: no Ray.

:class:`CTCTranscriber` is one loaded replica: it pads a batch, runs one forward pass under the
configured precision with the patches of :mod:`pipeline.model.invariance`, takes the argmax and
decodes it greedily (:class:`~pipeline.model.ctc.GreedyCTCDecoder`), exactly as the reference path
(:mod:`pipeline.model.reference`) does one row at a time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

from pipeline.config import InferenceConfig
from pipeline.memory import release_free_heap
from pipeline.model.ctc import GreedyCTCDecoder
from pipeline.model.invariance import (
    CONV_ENCODERS,
    PROBE_TOLERANCE,
    ValidFramesGroupNorm,
    ValidLengths,
    batch_deviation,
    first_group_norm,
    install_matmul_encoder,
    install_matmul_positional_conv,
)
from pipeline.model.loading import (
    ATTENTION_BACKENDS,
    PRECISIONS,
    cast_linear_weights,
    guard_positional_conv,
    ieee_fp32,
    load_model,
    resolve_device,
    resolve_precision,
)
from pipeline.model.spec import ModelSpec, receptive_field
from pipeline.transcribe import Emission

log = logging.getLogger(__name__)

_DEFAULTS = InferenceConfig()  # the config's defaults are the transcriber's


@dataclass(frozen=True)
class Started:
    """A batch :meth:`CTCTranscriber.start` queued: its argmax ids and each frame's top posterior
    (on the host once ``done``, a CUDA event, has passed; ``None`` on a CPU) and each row's valid
    frames; on a GPU, ``begun``, the event before its work in the stream (its device time is the
    events' difference: the stream runs batches one after another)."""

    ids: torch.Tensor
    confidence: torch.Tensor
    logprobs: torch.Tensor | None  # float16, when asked for (an LM decodes them)
    frames: list[int]
    done: torch.cuda.Event | None
    begun: torch.cuda.Event | None = None


class CTCTranscriber:
    """One loaded model replica; call :meth:`transcribe` with normalised 16 kHz waveforms.

    Batches are made batch-invariant where the model allows it: a row's logits do not depend on
    what it shares a batch with. :attr:`batch_invariant` says whether that holds for the loaded
    model; the load-time probe decides, and a model it fails keeps the standard padding (with a warning).
    """

    def __init__(self, spec: ModelSpec, device: str = _DEFAULTS.device, threads: int | None = None,
                 precision: str = _DEFAULTS.precision, conv_encoder: str = _DEFAULTS.conv_encoder):
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.device_s = 0.0  # the device's time on batches so far: CUDA events on a GPU, the forward's on a CPU
        feature_extractor, self.tokenizer, self.model = load_model(spec, self.device)
        self.decoder = GreedyCTCDecoder(self.tokenizer, self.model.config.vocab_size)
        self.precision = precision = resolve_precision(precision, self.device)
        self.autocast = PRECISIONS[precision]
        if conv_encoder == "auto":
            conv_encoder = ("batched" if self.device.type == "cuda" else
                            "chunked" if self.autocast is not None else "stock")
        if conv_encoder not in ("stock", *CONV_ENCODERS):
            raise ValueError(f"conv_encoder = {conv_encoder!r}: use auto, stock or one of {sorted(CONV_ENCODERS)}")
        config = self.model.config
        self.min_samples = receptive_field(config.conv_kernel, config.conv_stride)
        self.valid_lengths = ValidLengths((config.conv_kernel[0], config.conv_stride[0]))
        self.encoder = None if conv_encoder == "stock" else install_matmul_encoder(self.model, spec.name, conv_encoder)
        # The GPU layout also runs the positional conv as matmuls, even where the model's feature
        # encoder keeps the stock one: the two are independent.
        self.matmul_positional_conv = (conv_encoder == "batched"
                                       and install_matmul_positional_conv(self.model, spec.name))
        self.positional_conv_fp32 = False
        if self.autocast is not None and self.device.type == "cpu" and not self.matmul_positional_conv:
            self.positional_conv_fp32 = guard_positional_conv(self.model, self.autocast)
        # The standard path: models whose feature extractor returns an attention mask were trained
        # with one; the others (group-norm front end, e.g. base-960h) get none.
        self.use_attention_mask = bool(feature_extractor.return_attention_mask)
        self.batch_invariant = self._make_batch_invariant(spec.name)
        if self.autocast is not None:
            # After the batch-invariance probe, which runs in fp32: from here on only autocast's.
            cast_linear_weights(self.model, self.autocast)
        log.info(
            "loaded %s on %s (%s, %d threads, attention mask: %s, batch-invariant: %s, conv encoder: %s, "
            "positional conv: %s%s)", spec.name, self.device, precision, torch.get_num_threads(),
            self.use_attention_mask, self.batch_invariant, type(self.encoder).__name__ if self.encoder else "stock",
            "matmul, " if self.matmul_positional_conv else "", "fp32" if self.positional_conv_fp32 else precision,
        )

    @classmethod
    def from_config(cls, spec: ModelSpec, inference: InferenceConfig, threads: int | None) -> CTCTranscriber:
        """The transcriber a replica runs with the ``inference`` config section."""
        return cls(spec, device=inference.device, threads=threads, precision=inference.precision,
                   conv_encoder=inference.conv_encoder)

    def _make_batch_invariant(self, name: str) -> bool:
        """Install the exact path, probe it, and fall back to the standard one where it fails.

        The exact path always passes an attention mask: the encoder then zeroes padded frames
        before its positional conv and hides them from attention, which reproduces the unpadded
        computation on the valid frames — the batch-of-one result the model gives any utterance.
        """
        found = None if self.encoder else first_group_norm(self.model)
        if found is not None:
            layer, norm = found
            self.valid_lengths.norm = layer.layer_norm = ValidFramesGroupNorm(norm)
        self.valid_lengths.encoder = self.encoder
        standard_mask, self.use_attention_mask = self.use_attention_mask, True
        deviation = self.probe()
        if deviation <= PROBE_TOLERANCE:
            return True
        if found is not None:
            layer.layer_norm = norm
        self.valid_lengths.norm = self.valid_lengths.encoder = None
        self.use_attention_mask = standard_mask
        # e.g. Data2VecAudio's stacked positional convs and the conformer's conv modules see padded
        # frames, which no mask hides.
        log.warning(
            "%s (%s) is not batch-invariant with a valid-frames mask (max |Δlogit| %.3g between a "
            "padded batch and one row at a time on a probe); using the standard padding, so a row's "
            "transcript can depend on what shares its batch", name, self.model.config.model_type, deviation,
        )
        return False

    def probe(self) -> float:
        """Largest logit difference, relative, between one padded batch and one row at a time (fp32)."""
        return batch_deviation(lambda waves: self.logits(waves, autocast=None), self.frames, self.min_samples)

    def frames(self, num_samples: Sequence[int]) -> list[int]:
        """Output frames the model gives for inputs of these lengths."""
        lengths = torch.as_tensor(list(num_samples), dtype=torch.long)
        return self.model._get_feat_extract_output_lengths(lengths).tolist()

    def logits(self, waves: Sequence[np.ndarray], autocast: torch.dtype | None | str = "default") -> torch.Tensor:
        """One forward pass over the zero-padded batch: ``(rows, frames of the longest, vocab)``.

        ``autocast`` is the configured precision by default; ``None`` forces fp32 (for the load-time
        probe: once loaded, a reduced-precision replica's linear weights are in that precision).
        """
        return self._forward(self._padded(waves), [len(w) for w in waves], autocast)

    def _padded(self, waves: Sequence[np.ndarray]) -> torch.Tensor:
        """The batch zero-padded to its longest row, on the host (page-locked on a GPU replica, so
        that the copy to the GPU runs asynchronously)."""
        shape = len(waves), max(len(w) for w in waves)
        if self.device.type == "cuda":
            buffer = torch.zeros(shape, pin_memory=True)
            batch = buffer.numpy()
        else:
            batch = np.zeros(shape, dtype=np.float32)
            buffer = torch.from_numpy(batch)
        for row, wave in zip(batch, waves, strict=True):
            row[: len(wave)] = wave
        return buffer

    def _forward(self, buffer: torch.Tensor, lengths: list[int], autocast: torch.dtype | None | str) -> torch.Tensor:
        dtype = self.autocast if autocast == "default" else autocast
        inputs = buffer.to(self.device, non_blocking=True)
        n = torch.as_tensor(lengths)
        mask = None
        if self.use_attention_mask:
            # non_blocking: a plain copy to a GPU would wait for the batch ahead to finish
            mask = torch.arange(buffer.shape[1], device=self.device) < n.to(self.device, non_blocking=True)[:, None]
        with (torch.inference_mode(), ieee_fp32(dtype is None), self.valid_lengths.of(n),
              sdpa_kernel(ATTENTION_BACKENDS) if self.device.type == "cuda" else nullcontext(),
              torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)):
            return self.model(inputs, attention_mask=mask).logits.float()

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Transcribe one batch: zero-pad to the longest, forward once, greedy-decode each row.

        Each row's predictions are cut to its own frames, so padding never adds characters.
        """
        return self.decode([ids for ids, _ in self.finish(self.start(waves))])

    def decode(self, sequences: Sequence[np.ndarray]) -> list[str]:
        """Greedy CTC texts of argmax id sequences (rows' own frames, or a long row's windows stitched)."""
        return self.decoder.decode_sequences(sequences)

    def words(self, ids: np.ndarray, confidence: np.ndarray) -> list[tuple[str, int, int, float]]:
        """One row's words from its argmax ids and frames' top posteriors: ``(word, start frame, end
        frame, confidence)``, as the tokenizer's ``output_word_offsets`` (:meth:`GreedyCTCDecoder.words`)."""
        return self.decoder.words(ids, confidence)

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]],
                           logprobs: bool = False) -> Iterator[list[Emission] | Exception]:
        """Each batch's rows' emissions (:meth:`finish`; with ``logprobs``, log-probabilities too) in
        turn, starting each batch before finishing the one ahead of it (:meth:`start`): on a GPU the
        host takes one batch's ids and pads the next while the GPU runs. ``batches`` is read one
        ahead. A batch that fails yields its exception instead, and the rest go on."""
        pending = None
        for waves in itertools.chain(batches, [None]):
            started = None
            if waves is not None:
                try:
                    started = self.start(waves, logprobs)
                except Exception as exc:  # noqa: BLE001 - the caller decides, in this batch's turn
                    started = exc.with_traceback(None)  # its frames would keep the batch's tensors alive
            if pending is not None:
                yield self._finish_or_error(pending)
            pending = started

    def _finish_or_error(self, started: Started | Exception) -> list[Emission] | Exception:
        if isinstance(started, Exception):
            return started
        try:
            return self.finish(started)
        except Exception as exc:  # noqa: BLE001 - as in transcribe_batches
            return exc.with_traceback(None)

    def start(self, waves: Sequence[np.ndarray], logprobs: bool = False) -> Started:
        """The first half of :meth:`transcribe`: pad the batch, queue its forward pass and argmax,
        and the argmax's copy to the host. On a GPU this returns while they run, so the host can
        decode the batch before (:meth:`finish`) and pad the next one meanwhile; on a CPU they
        have run when it returns."""
        buffer, lengths, cuda = self._padded(waves), [len(w) for w in waves], self.device.type == "cuda"
        begun = torch.cuda.Event(enable_timing=True) if cuda else None
        if begun is not None:  # after the host's padding: the device's part begins with the copy
            begun.record(torch.cuda.current_stream(self.device))
        clock = time.perf_counter()
        logits = self._forward(buffer, lengths, "default")
        top = logits.max(dim=-1)
        # The top posterior from the logits (softmax's max): ids stay the logits' own argmax.
        ids, confidence = top.indices, torch.exp(top.values - logits.logsumexp(dim=-1))
        # float16 log-probabilities: a quarter of fp32 logits' bytes, and the beam's result is the same
        lp = logits.log_softmax(dim=-1).half() if logprobs else None
        frames = self.frames(lengths)
        if not cuda:  # the work has run: the device time is the host's
            self.device_s += time.perf_counter() - clock
            return Started(ids, confidence, lp, frames, None)
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (ids, confidence, lp)]
        done = torch.cuda.Event(enable_timing=True)
        done.record(torch.cuda.current_stream(self.device))
        return Started(*host, frames, done, begun)

    def finish(self, started: Started) -> list[Emission]:
        """The second half of :meth:`transcribe`: wait for the batch; each row's argmax ids and top
        posteriors over its own frames."""
        if started.done is not None:
            started.done.synchronize()
            if started.begun is not None:
                self.device_s += started.begun.elapsed_time(started.done) / 1000
        parts = [t.numpy() for t in (started.ids, started.confidence, started.logprobs) if t is not None]
        return [tuple(p[row, :n] for p in parts) for row, n in enumerate(started.frames)]

    def release_memory(self) -> None:
        """Between calls: a CPU replica gives its heap's free pages back, since its allocator
        settings (:data:`pipeline.memory.CPU_REPLICA_ENV`) never shrink the heap and batches of
        ever new shapes fragment it."""
        if self.device.type == "cpu":
            release_free_heap()
