"""The reference code path, the oracle for the job: the seed notebook's
``processor(audio, sampling_rate=16000)`` → model → argmax → ``processor.batch_decode``, in fp32.

One utterance at a time (the default) it is what any row's transcript must equal; in batches it is
the naive loop the benchmark compares the job with. The tests, ``jobs.benchmark`` and the demo
model's evaluation all use this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCTC, AutoProcessor

SAMPLE_RATE = 16_000


class Reference:
    """The reference path over ``model`` and ``processor`` (e.g. a model being trained)."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu") -> Reference:
        """The model and processor saved in ``model_dir``, on ``device``."""
        model = AutoModelForCTC.from_pretrained(model_dir).to(device).eval()
        return cls(model, AutoProcessor.from_pretrained(model_dir))

    def _inputs(self, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        inputs = self.processor(list(audios), sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items() if k in ("input_values", "attention_mask")}

    def logits(self, audio: np.ndarray) -> torch.Tensor:
        """``(frames, vocab)`` for one utterance, unpadded."""
        with torch.inference_mode():
            return self.model(**self._inputs([audio])).logits[0]

    def transcribe(self, audios: Sequence[np.ndarray], batch_size: int = 1) -> list[str]:
        """Texts for ``audios`` (float, or int16 scaled to [-1, 1)), ``batch_size`` at a time, padded
        by the processor."""
        audios = [a.astype(np.float32) / 32768.0 if a.dtype == np.int16 else a for a in audios]
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(audios), batch_size):
                ids = self.model(**self._inputs(audios[i : i + batch_size])).logits.argmax(-1)
                texts += self.processor.batch_decode(ids)
        return texts

    def __call__(self, audio: np.ndarray) -> str:
        return self.transcribe([audio])[0]
