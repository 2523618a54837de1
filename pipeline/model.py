"""wav2vec2-family CTC inference on padded batches. Pure: no Ray.

Loading goes through ``AutoProcessor`` / ``AutoModelForCTC``, so a hub id and a local folder
take the same path. Decoding is greedy, exactly as the reference code path:
argmax over the logits, then ``processor.batch_decode``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoProcessor

from pipeline import bundled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where a checkpoint comes from and how far it is trusted."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def source(self) -> str:
        """What ``from_pretrained`` gets: ``@demo`` resolved where this runs (driver or actor)."""
        return bundled.model_path(self.name)

    def kwargs(self) -> dict:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


@dataclass(frozen=True)
class FrontEnd:
    """What the decode stage needs to know of the model's feature extractor."""

    sampling_rate: int
    do_normalize: bool


def load_front_end(spec: ModelSpec) -> FrontEnd:
    """Read only the feature extractor's settings (a small JSON file), e.g. on the driver."""
    fe = AutoFeatureExtractor.from_pretrained(spec.source, **spec.kwargs())
    return FrontEnd(sampling_rate=int(fe.sampling_rate), do_normalize=bool(getattr(fe, "do_normalize", False)))


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


class CTCTranscriber:
    """One loaded model replica; call :meth:`transcribe` with normalised 16 kHz waveforms."""

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.processor = AutoProcessor.from_pretrained(spec.source, **spec.kwargs())
        self.model = AutoModelForCTC.from_pretrained(spec.source, use_safetensors=True, **spec.kwargs())
        self.model.to(self.device).eval()
        # Models trained without an attention mask (group-norm front end, e.g.
        # wav2vec2-base-960h) must not get one: their feature extractor says which.
        self.use_attention_mask = bool(self.processor.feature_extractor.return_attention_mask)
        config = self.model.config
        self.min_samples = receptive_field(config.conv_kernel, config.conv_stride)
        log.info(
            "loaded %s on %s (%d threads, attention mask: %s)",
            spec.name, self.device, torch.get_num_threads(), self.use_attention_mask,
        )

    def frames(self, num_samples: Sequence[int]) -> list[int]:
        """Output frames the model gives for inputs of these lengths."""
        lengths = torch.as_tensor(list(num_samples), dtype=torch.long)
        return self.model._get_feat_extract_output_lengths(lengths).tolist()

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Transcribe one batch: zero-pad to the longest, forward once, greedy-decode each row.

        Each row's predictions are cut to its own frames, so padding never adds characters.
        """
        lengths = [len(w) for w in waves]
        batch = np.zeros((len(waves), max(lengths)), dtype=np.float32)
        for row, wave in zip(batch, waves, strict=True):
            row[: len(wave)] = wave
        inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
        mask = None
        if self.use_attention_mask:
            mask = (torch.arange(inputs.shape[1]) < torch.as_tensor(lengths)[:, None]).to(self.device)
        with torch.inference_mode():
            logits = self.model(inputs, attention_mask=mask).logits
        ids = logits.argmax(dim=-1).cpu()
        texts = self.processor.batch_decode([ids[i, :n].tolist() for i, n in enumerate(self.frames(lengths))])
        if len(texts) != len(waves):
            raise RuntimeError(f"decoded {len(texts)} texts for a batch of {len(waves)} rows")
        return texts
