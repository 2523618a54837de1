"""wav2vec2-family CTC inference on padded batches. Pure: no Ray.

Loading goes through ``AutoFeatureExtractor`` / ``AutoTokenizer`` / ``AutoModelForCTC``, so a hub
id and a local folder take the same path. Decoding is greedy, exactly as the reference code path:
argmax over the logits, then the tokenizer's ``batch_decode`` (what ``processor.batch_decode``
calls; :class:`GreedyCTCDecoder`).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
# Not AutoProcessor: a checkpoint that decodes with an LM names Wav2Vec2ProcessorWithLM, which it
# cannot load without pyctcdecode and kenlm, and whose batch_decode takes logits, not ids.
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, Wav2Vec2CTCTokenizer

from pipeline.checkpoint import ModelSpec
from pipeline.conv_encoder import (BatchedMatmulFeatureEncoder, MatmulFeatureEncoder, MatmulPositionalConv,
                                   UnsupportedEncoder, conv_output_frames)

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` follows what the process was given: a visible GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device = cuda, but this process sees no GPU")
    return torch.device(device)


def receptive_field(conv_kernel: Sequence[int], conv_stride: Sequence[int]) -> int:
    """Fewest input samples that give one output frame of the conv feature encoder."""
    field = 1
    for kernel, stride in zip(reversed(conv_kernel), reversed(conv_stride), strict=True):
        field = (field - 1) * stride + kernel
    return field


class ValidFramesGroupNorm(torch.nn.Module):
    """``nn.GroupNorm`` whose statistics come from each row's valid frames only.

    wav2vec2-base-960h's kind normalises its first conv layer over time; with zero padding the
    padded frames shift the mean and variance, so a row's logits depend on what it was batched
    with (transformers #18501). Set :attr:`frames` (valid frames per row) before a batched forward;
    with ``frames = None`` it is the wrapped layer, unchanged. Written by hand because torch has no
    masked group norm.
    """

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm
        self.frames: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames is None:
            return self.norm(x)
        # The wrapped layer on each row's valid frames alone: the very computation of that row
        # unbatched, so the two agree bit for bit. Padded frames become zeros, which no valid frame
        # of the later (unpadded) conv layers sees. Masked statistics over the whole padded tensor
        # (var_mean + addcmul) took 4x as long on CPU as these per-row group_norm calls.
        out = None
        for row, n in enumerate(self.frames.tolist()):
            y = self.norm(x[row : row + 1, :, :n])
            if out is None:
                out = y.new_zeros(x.shape)  # y's dtype: fp32 under autocast, as nn.GroupNorm
            out[row, :, :n] = y[0]
        return out


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The conv feature encoders a replica can run (pipeline.conv_encoder): "auto" takes the chunked
# matmul one on CPUs in reduced precision (where oneDNN's conv1d can be slow), the batched one on
# GPUs (where cuDNN's convs took 80% of a warm bf16 forward; with it, the positional conv as
# products too), and the stock one otherwise.
CONV_ENCODERS = {"chunked": MatmulFeatureEncoder, "batched": BatchedMatmulFeatureEncoder}


# Attention kernels a GPU replica may use: not cuDNN's (torch's first choice on an H200), which
# builds a graph for each new shape: 2.6 ms of host time per attention call, ~31 ms per batch for
# wav2vec2-base's 12 layers (torch profiler, H200), and nearly every batch has a shape of its own.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextmanager
def ieee_fp32(on: bool) -> Iterator[None]:
    """While ``on``, fp32 on a GPU means IEEE fp32: TF32 off for cuDNN's convs (torch's default
    has it on) and cuBLAS's matmuls (``torch.set_float32_matmul_precision`` turns it on). cuDNN's
    TF32 convs moved random-weight logits by 5e-4 on an H200 (1 of 8 transcripts changed against
    the CPU; 4e-6 and none without). The settings are restored afterwards. Through torch's
    ``fp32_precision`` settings: reading the older ``allow_tf32`` flags raises once anything in
    the process has set the newer ones differently for convs and RNNs."""
    if not on:
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want|`` relative to ``max(1, max |want|)``: what the load-time probes compare."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _positional_conv(model) -> torch.nn.Module | None:
    return getattr(getattr(model.base_model, "encoder", None), "pos_conv_embed", None)


def positional_conv_in_fp32(model) -> None:
    """Run the encoder's positional conv outside autocast, in fp32 (see :func:`guard_positional_conv`)."""
    conv = _positional_conv(model)
    if conv is None:
        return
    forward = conv.forward

    def fp32_forward(hidden_states, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(hidden_states.float(), *args, **kwargs)

    conv.forward = fp32_forward


POSITIONAL_CONV_TOLERANCE = 0.1  # max |error| relative to max(1, max |output|): bf16's own is ~0.006


def guard_positional_conv(model, dtype: torch.dtype) -> bool:
    """Keep the encoder's positional conv in ``dtype`` under CPU autocast where this torch build
    computes it right, else run it in fp32; return whether it now runs in fp32.

    This torch build's CPU (oneDNN) grouped conv1d in bf16 is right for some shapes and wrong for
    others: wav2vec2-base's (768 channels in 16 groups of 48, kernel 128) is right (max error 0.016
    for outputs up to 2.8, bf16's own), the demo model's (192 channels in 16 groups of 12, kernel 64)
    returns errors as large as its output (3.3 for outputs up to 3.2), which garbled every
    transcript. A probe on random frames, autocast against fp32, decides for each model.
    """
    conv = _positional_conv(model)
    if conv is None:
        return False
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn((2, 300, model.config.hidden_size), generator=generator)
    try:
        with torch.inference_mode():
            want = conv(hidden)
            with torch.autocast("cpu", dtype=dtype):
                got = conv(hidden).float()
        deviation = _relative_deviation(got, want)
    except Exception as exc:  # noqa: BLE001 - a conv the probe cannot call keeps fp32, as before the probe
        log.info("positional conv in fp32: the probe failed (%s)", exc)
    else:
        if deviation <= POSITIONAL_CONV_TOLERANCE:
            return False
        log.info("positional conv in fp32: in %s it deviates by %.3g on a probe", dtype, deviation)
    positional_conv_in_fp32(model)
    return True


def cast_linear_weights(model, dtype: torch.dtype) -> int:
    """Store every ``nn.Linear``'s weight and bias in ``dtype``, for forwards under autocast to
    ``dtype`` only; return how many layers.

    Autocast casts them on every forward (its cast cache lives for one autocast context): for
    wav2vec2-base, 85M parameters, ~37 ms a batch on the 2-core CPU. Autocast would compute with
    exactly these values, so the logits are the same bit for bit; the weights take half the memory.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        layer.to(dtype)
    return len(layers)


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``); return whether
    this C library can (musl and macOS have no such call). The heap keeps its address space, so
    this bounds what the process holds, not where its next blocks go."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def _first_group_norm(model) -> tuple[torch.nn.Module, torch.nn.GroupNorm] | None:
    """The first conv layer and its ``GroupNorm``, where the model has that structure."""
    encoder = getattr(model.base_model, "feature_extractor", None)
    layers = getattr(encoder, "conv_layers", None)
    if not layers:
        return None
    norm = getattr(layers[0], "layer_norm", None)
    return (layers[0], norm) if isinstance(norm, torch.nn.GroupNorm) else None


class GreedyCTCDecoder:
    """Argmax ids → texts, exactly as ``tokenizer.batch_decode`` gives them for each row's frames.

    A ``Wav2Vec2CTCTokenizer`` merges repeated tokens and drops the blank (its pad token) in
    Python, token by token: ~13,000 audio s/s on the 2-core CPU, so a fifth to a third as long as
    an H200's forward passes. Here the merging and dropping run on the whole batch in numpy, on ids
    mapped to one id per distinct token (so ids the tokenizer spells alike, e.g. unknown ones,
    merge as its tokens do), and the tokenizer gets the few ids left with ``group_tokens=False``,
    which then does the rest as before (word delimiters, clean-up): 1.7-2.3x as fast, the same
    texts (``jobs.benchmark --decode-cost``). Other tokenizers get the plain call.
    """

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.canonical: np.ndarray | None = None
        if type(tokenizer) is Wav2Vec2CTCTokenizer:  # a subclass (remote code) may merge otherwise
            first: dict[str, int] = {}
            tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            self.canonical = np.array([first.setdefault(token, i) for i, token in enumerate(tokens)])
            self.blank = first.get(tokenizer.pad_token, -1)

    def __call__(self, ids: np.ndarray, frames: Sequence[int]) -> list[str]:
        """``ids`` ``(rows, T)``; each row's first ``frames[row]`` are its own."""
        if self.canonical is None or ids.max(initial=0) >= len(self.canonical):  # ids past the config's vocabulary
            return self.tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(frames)])
        token = self.canonical[ids]
        keep = np.ones(ids.shape, dtype=bool)
        keep[:, 1:] = token[:, 1:] != token[:, :-1]
        keep &= (token != self.blank) & (np.arange(ids.shape[1]) < np.asarray(frames)[:, None])
        return self.tokenizer.batch_decode([row[k].tolist() for row, k in zip(ids, keep, strict=True)],
                                           group_tokens=False)


@dataclass(frozen=True)
class Started:
    """A batch :meth:`CTCTranscriber.start` queued: its argmax ids (on the host once ``done``, a
    CUDA event, has passed; ``None`` on a CPU) and each row's valid frames."""

    ids: torch.Tensor
    frames: list[int]
    done: torch.cuda.Event | None


class CTCTranscriber:
    """One loaded model replica; call :meth:`transcribe` with normalised 16 kHz waveforms.

    Batches are made batch-invariant where the model allows it: a row's logits do not depend on
    what it shares a batch with (see :class:`ValidFramesGroupNorm`). :attr:`batch_invariant` says
    whether that holds for the loaded model; the load-time probe decides.
    """

    # Probe lengths, beyond the receptive field: unequal, and one just above it. Short, since the
    # probe runs in fp32 while the replica starts: on wav2vec2-base 0.28 s where 16 000 samples
    # took 0.54 s, and the plain padding it must catch still deviates by ~0.8 (~0.95 before).
    PROBE_LENGTHS = (4_000, 1_217, 51)
    PROBE_TOLERANCE = 1e-3  # max |Δlogit| relative to max(1, max |logit|); plain padding gives ~0.8

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None,
                 precision: str = "fp32", exact: bool = True, conv_encoder: str = "auto"):
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        feature_extractor = AutoFeatureExtractor.from_pretrained(spec.source, **spec.kwargs())
        self.tokenizer = AutoTokenizer.from_pretrained(spec.source, **spec.kwargs())
        self.model = AutoModelForCTC.from_pretrained(
            spec.source, use_safetensors=not spec.allow_pickle_weights, **spec.kwargs())
        self.model.to(self.device).eval()
        self.decoder = GreedyCTCDecoder(self.tokenizer, self.model.config.vocab_size)
        self.autocast = PRECISIONS[precision]
        if conv_encoder not in ("auto", "stock", *CONV_ENCODERS):
            raise ValueError(f"conv_encoder = {conv_encoder!r}: use auto, stock or one of {sorted(CONV_ENCODERS)}")
        if conv_encoder == "auto":
            conv_encoder = ("batched" if self.device.type == "cuda" else
                            "chunked" if self.autocast is not None else "stock")
        self._encoder = None if conv_encoder == "stock" else self._install_matmul_encoder(spec.name, conv_encoder)
        # The GPU layout also runs the positional conv as matmuls (see MatmulPositionalConv), even
        # where the model's feature encoder keeps the stock one: the two are independent.
        self.matmul_positional_conv = conv_encoder == "batched" and self._install_matmul_positional_conv(spec.name)
        self.positional_conv_fp32 = False
        if self.autocast is not None and self.device.type == "cpu" and not self.matmul_positional_conv:
            self.positional_conv_fp32 = guard_positional_conv(self.model, self.autocast)
        config = self.model.config
        self.min_samples = receptive_field(config.conv_kernel, config.conv_stride)
        self._first_conv = config.conv_kernel[0], config.conv_stride[0]
        # The standard path: models whose feature extractor returns an attention mask were trained
        # with one; the others (group-norm front end, e.g. base-960h) get none.
        self.use_attention_mask = bool(feature_extractor.return_attention_mask)
        self._norm: ValidFramesGroupNorm | None = None
        self._valid_lengths = False  # whether _encoder gets each row's valid length
        # exact=False keeps the standard padding: only for measuring what exactness costs.
        self.batch_invariant = self._make_batch_invariant(spec.name) if exact else False
        if self.autocast is not None:
            # After the batch-invariance probe, which runs in fp32: from here on only autocast's.
            cast_linear_weights(self.model, self.autocast)
        log.info(
            "loaded %s on %s (%s, %d threads, attention mask: %s, batch-invariant: %s, conv encoder: %s, "
            "positional conv: %s%s)", spec.name, self.device, precision, torch.get_num_threads(),
            self.use_attention_mask, self.batch_invariant, type(self._encoder).__name__ if self._encoder else "stock",
            "matmul, " if self.matmul_positional_conv else "", "fp32" if self.positional_conv_fp32 else precision,
        )

    def _install_matmul_encoder(self, name: str, kind: str) -> torch.nn.Module | None:
        """Swap in the matmul conv encoder ``kind`` (a key of :data:`CONV_ENCODERS`) where
        :meth:`_checked_swap` passes it; return it, or None."""
        base = self.model.base_model
        # Unequal rows, zero-padded to a width that is no multiple of the stack's stride (320).
        probe = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16_111)).astype(np.float32))
        probe[1, 12_345:] = 0
        fast = self._checked_swap(name, "conv feature encoder", getattr(base, "feature_extractor", None),
                                  CONV_ENCODERS[kind], probe)
        if fast is not None:
            base.feature_extractor = fast
        return fast

    def _install_matmul_positional_conv(self, name: str) -> bool:
        """Swap in :class:`MatmulPositionalConv` where :meth:`_checked_swap` passes it."""
        stock = _positional_conv(self.model)
        if stock is None:
            return False
        # Unequal rows, the shorter one's padded frames zeroed as the encoder zeroes them.
        probe = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 301, self.model.config.hidden_size))
                                 .astype(np.float32))
        probe[1, 217:] = 0
        fast = self._checked_swap(name, "positional conv", stock, MatmulPositionalConv, probe)
        if fast is not None:
            self.model.base_model.encoder.pos_conv_embed = fast
        return fast is not None

    def _checked_swap(self, name: str, what: str, stock: torch.nn.Module, make, probe: torch.Tensor):
        """``make(stock)`` if the model has the structure it computes and its fp32 output matches
        ``stock``'s on ``probe``; else None, saying why once (the stock module stays)."""
        try:
            fast = make(stock)
        except UnsupportedEncoder as exc:
            log.warning("%s: keeping the stock %s (%s)", name, what, exc)
            return None
        probe = probe.to(self.device)
        with torch.inference_mode(), ieee_fp32(True):
            try:
                want = stock(probe)
            except Exception as exc:  # noqa: BLE001 - a module whose input is not what the probe gives
                log.warning("%s: keeping the stock %s (it does not take the probe: %s)", name, what, exc)
                return None
            try:
                got = fast(probe)
            except Exception as exc:  # noqa: BLE001 - a layer it computes wrongly may also fail: keep the stock one
                log.warning("%s: keeping the stock %s (the matmul one failed: %s)", name, what, exc)
                return None
        deviation = _relative_deviation(got, want) if want.shape == got.shape else math.inf
        if deviation > self.PROBE_TOLERANCE:
            log.warning("%s: keeping the stock %s (the matmul one differs by %.3g on a probe)", name, what, deviation)
            return None
        return fast

    def _make_batch_invariant(self, name: str) -> bool:
        """Install the exact path, probe it, and fall back to the standard one where it fails.

        The exact path always passes an attention mask: the encoder then zeroes padded frames
        before its positional conv and hides them from attention, which reproduces the unpadded
        computation on the valid frames — the batch-of-one result the model gives any utterance.
        """
        found = None if self._encoder else _first_group_norm(self.model)
        if found is not None:
            layer, norm = found
            self._norm = ValidFramesGroupNorm(norm)
            layer.layer_norm = self._norm
        self._valid_lengths = self._encoder is not None
        standard_mask, self.use_attention_mask = self.use_attention_mask, True
        deviation = self.probe()
        if deviation <= self.PROBE_TOLERANCE:
            return True
        if found is not None:
            layer.layer_norm, self._norm = norm, None
        self._valid_lengths = False
        self.use_attention_mask = standard_mask
        # Once per replica: e.g. Data2VecAudio's stacked positional convs and the conformer's conv
        # modules see padded frames, which no mask hides.
        log.warning(
            "%s (%s) is not batch-invariant with a valid-frames mask (max |Δlogit| %.3g between a "
            "padded batch and one row at a time on a probe); using the standard padding, so a row's "
            "transcript can depend on what shares its batch", name, self.model.config.model_type, deviation,
        )
        return False

    def probe(self) -> float:
        """Largest logit difference, relative, between one padded batch and one row at a time."""
        rng = np.random.default_rng(0)
        lengths = [self.min_samples + n for n in self.PROBE_LENGTHS]
        waves = [rng.standard_normal(n).astype(np.float32) for n in lengths]
        batched = self.logits(waves, autocast=None)
        scale, worst = 1.0, 0.0
        for row, (wave, frames) in enumerate(zip(waves, self.frames(lengths), strict=True)):
            alone = self.logits([wave], autocast=None)[0, :frames]
            scale = max(scale, float(alone.abs().max()))
            worst = max(worst, float((batched[row, :frames] - alone).abs().max()))
        return worst / scale

    def frames(self, num_samples: Sequence[int]) -> list[int]:
        """Output frames the model gives for inputs of these lengths."""
        lengths = torch.as_tensor(list(num_samples), dtype=torch.long)
        return self.model._get_feat_extract_output_lengths(lengths).tolist()

    def logits(self, waves: Sequence[np.ndarray], autocast: torch.dtype | None | str = "default") -> torch.Tensor:
        """One forward pass over the zero-padded batch: ``(rows, frames of the longest, vocab)``.

        ``autocast`` is the configured precision by default; ``None`` forces fp32 (for the load-time
        probe: once loaded, a reduced-precision replica's linear weights are in that precision).
        """
        dtype = self.autocast if autocast == "default" else autocast
        lengths = [len(w) for w in waves]
        shape = len(waves), max(lengths)
        if self.device.type == "cuda":  # page-locked, so that the copy to the GPU runs asynchronously
            buffer = torch.zeros(shape, pin_memory=True)
            batch = buffer.numpy()
        else:
            batch = np.zeros(shape, dtype=np.float32)
            buffer = torch.from_numpy(batch)
        for row, wave in zip(batch, waves, strict=True):
            row[: len(wave)] = wave
        inputs = buffer.to(self.device, non_blocking=True)
        n = torch.as_tensor(lengths)
        mask = None
        if self.use_attention_mask:
            # non_blocking: a plain copy to a GPU would wait for the batch ahead to finish
            mask = torch.arange(shape[1], device=self.device) < n.to(self.device, non_blocking=True)[:, None]
        if self._norm is not None:
            self._norm.frames = conv_output_frames(n, *self._first_conv)
        if self._valid_lengths:
            self._encoder.lengths = n
        try:
            with (torch.inference_mode(), ieee_fp32(dtype is None),
                  sdpa_kernel(ATTENTION_BACKENDS) if self.device.type == "cuda" else nullcontext(),
                  torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)):
                return self.model(inputs, attention_mask=mask).logits.float()
        finally:
            if self._norm is not None:
                self._norm.frames = None
            if self._encoder is not None:
                self._encoder.lengths = None

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Transcribe one batch: zero-pad to the longest, forward once, greedy-decode each row.

        Each row's predictions are cut to its own frames, so padding never adds characters.
        """
        return self.finish(self.start(waves))

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]]) -> Iterator[list[str] | Exception]:
        """:meth:`transcribe` each batch in turn, starting each before finishing the one ahead of it
        (:meth:`start`, :meth:`finish`): on a GPU the host decodes one batch and pads the next while
        the GPU runs. A batch that fails yields its exception instead of texts, and the rest go on."""
        pending = None
        for waves in [*batches, None]:
            started = None
            if waves is not None:
                try:
                    started = self.start(waves)
                except Exception as exc:  # noqa: BLE001 - the caller decides, in this batch's turn
                    started = exc.with_traceback(None)  # its frames would keep the batch's tensors alive
            if pending is not None:
                yield self._finish_or_error(pending)
            pending = started

    def _finish_or_error(self, started: Started | Exception) -> list[str] | Exception:
        if isinstance(started, Exception):
            return started
        try:
            return self.finish(started)
        except Exception as exc:  # noqa: BLE001 - as in transcribe_batches
            return exc.with_traceback(None)

    def start(self, waves: Sequence[np.ndarray]) -> Started:
        """The first half of :meth:`transcribe`: pad the batch, queue its forward pass and argmax,
        and the argmax's copy to the host. On a GPU this returns while they run, so the host can
        decode the batch before (:meth:`finish`) and pad the next one meanwhile; on a CPU they
        have run when it returns."""
        ids = self.logits(waves).argmax(dim=-1)
        frames = self.frames([len(w) for w in waves])
        if self.device.type != "cuda":
            return Started(ids, frames, None)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return Started(host, frames, done)

    def finish(self, started: Started) -> list[str]:
        """The second half of :meth:`transcribe`: wait for the batch's ids, greedy-decode each row."""
        if started.done is not None:
            started.done.synchronize()
        texts = self.decoder(started.ids.numpy(), started.frames)
        if len(texts) != len(started.frames):
            raise RuntimeError(f"decoded {len(texts)} texts for a batch of {len(started.frames)} rows")
        return texts

    def release_memory(self) -> None:
        """Between calls: a CPU replica gives its heap's free pages back (:func:`release_free_heap`).

        Its batches' activations live in a heap that ``pipeline.checkpoint.CPU_REPLICA_ENV`` tells never to shrink,
        and batches of ever new shapes fragment it: over a 2-hour corpus the heap grew to 2.3 GB
        around 0.5 GB of live blocks, and kept growing. Trimmed after each call of 64 rows it held
        ~0.7 GB; the next call pays its page faults again (~4% slower in one pair of runs in one
        process; a 180-minute job took 300 s with and without).
        """
        if self.device.type == "cpu":
            release_free_heap()
