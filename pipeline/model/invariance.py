"""Patches a loaded model gets, each installed only where a load-time probe shows it right.

- Batch invariance: a row's logits must not depend on what shares its batch. Padding leaks into
  the raw-audio layer's group norm (wav2vec2-base-960h's kind, transformers #18501); its
  statistics are taken from each row's valid frames (:class:`ValidFramesGroupNorm`, or the matmul
  encoders given the rows' lengths), and an attention mask hides padded frames from the rest.
  :func:`batch_deviation` compares a padded batch with one row at a time.
- The conv feature encoder and the positional conv as matrix products
  (:mod:`pipeline.model.conv_encoder`), swapped in by :func:`checked_swap` where their fp32 output
  equals the stock module's on a probe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from pipeline.model.conv_encoder import (
    BatchedMatmulFeatureEncoder,
    MatmulFeatureEncoder,
    MatmulPositionalConv,
    UnsupportedEncoder,
    conv_output_frames,
)
from pipeline.model.loading import ieee_fp32, positional_conv, relative_deviation

log = logging.getLogger(__name__)

# The matmul conv feature encoders by config name (inference.conv_encoder): chunked for CPUs in
# reduced precision, batched for GPUs.
CONV_ENCODERS = {"chunked": MatmulFeatureEncoder, "batched": BatchedMatmulFeatureEncoder}

# Batch-invariance probe: rows of these lengths beyond the receptive field (unequal, one just above
# it), short because the probe runs in fp32 while the replica starts.
PROBE_LENGTHS = (4_000, 1_217, 51)
# Largest |Δlogit| relative to max(1, max |logit|) that counts as invariant (and as an equal swap):
# fp32's own is ~1e-6, plain zero padding on a group-norm model ~0.8.
PROBE_TOLERANCE = 1e-3
# Encoder probe: two rows of raw samples, the second zero-padded from the given sample on; a width
# that is no multiple of the stack's stride (320).
ENCODER_PROBE_SAMPLES, ENCODER_PROBE_VALID = 16_111, 12_345
# Positional-conv probe: two rows of frames, the second's padded frames zeroed as the encoder does.
POSITIONAL_PROBE_FRAMES, POSITIONAL_PROBE_VALID = 301, 217


class ValidFramesGroupNorm(torch.nn.Module):
    """``nn.GroupNorm`` whose statistics come from each row's valid frames only, inside
    :meth:`valid_frames`; outside it, the wrapped layer unchanged. (torch has no masked group norm.)"""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm
        self._frames: torch.Tensor | None = None

    @contextmanager
    def valid_frames(self, frames: torch.Tensor) -> Iterator[None]:
        """Forwards in this block take row ``i``'s statistics from its first ``frames[i]`` frames."""
        self._frames = frames
        try:
            yield
        finally:
            self._frames = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frames is None:
            return self.norm(x)
        # The wrapped layer on each row's valid frames alone: that row's unbatched computation, so
        # the two agree bit for bit (and per-row calls beat masked statistics on CPUs). Padded frames
        # become zeros, which no valid frame of the later, unpadded conv layers sees.
        out = None
        for row, n in enumerate(self._frames.tolist()):
            y = self.norm(x[row : row + 1, :, :n])
            if out is None:
                out = y.new_zeros(x.shape)  # y's dtype: fp32 under autocast, as nn.GroupNorm
            out[row, :, :n] = y[0]
        return out


def first_group_norm(model) -> tuple[torch.nn.Module, torch.nn.GroupNorm] | None:
    """The first conv layer and its ``GroupNorm``, where the model has that structure."""
    encoder = getattr(model.base_model, "feature_extractor", None)
    layers = getattr(encoder, "conv_layers", None)
    if not layers:
        return None
    norm = getattr(layers[0], "layer_norm", None)
    return (layers[0], norm) if isinstance(norm, torch.nn.GroupNorm) else None


class ValidLengths:
    """The modules of a model that take each row's valid length, set together per forward pass."""

    def __init__(self, first_conv: tuple[int, int]):
        self.first_conv = first_conv  # the raw-audio layer's (kernel, stride)
        self.norm: ValidFramesGroupNorm | None = None
        self.encoder: MatmulFeatureEncoder | BatchedMatmulFeatureEncoder | None = None

    @contextmanager
    def of(self, samples: torch.Tensor) -> Iterator[None]:
        """Forwards in this block see rows of ``samples`` valid samples each."""
        with ExitStack() as stack:
            if self.norm is not None:
                stack.enter_context(self.norm.valid_frames(conv_output_frames(samples, *self.first_conv)))
            if self.encoder is not None:
                stack.enter_context(self.encoder.valid_lengths(samples))
            yield


def batch_deviation(logits: Callable[[list[np.ndarray]], torch.Tensor],
                    frames: Callable[[Sequence[int]], list[int]], min_samples: int) -> float:
    """Largest logit difference, relative, between one padded batch of probe rows (:data:`PROBE_LENGTHS`
    beyond ``min_samples``) and each row alone; ``logits`` runs one fp32 forward over a batch."""
    rng = np.random.default_rng(0)
    lengths = [min_samples + n for n in PROBE_LENGTHS]
    waves = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    batched = logits(waves)
    scale, worst = 1.0, 0.0
    for row, (wave, n) in enumerate(zip(waves, frames(lengths), strict=True)):
        alone = logits([wave])[0, :n]
        scale = max(scale, float(alone.abs().max()))
        worst = max(worst, float((batched[row, :n] - alone).abs().max()))
    return worst / scale


def checked_swap(name: str, what: str, stock: torch.nn.Module | None, make, probe: torch.Tensor):
    """``make(stock)`` if the model has the structure it computes and its fp32 output matches
    ``stock``'s on ``probe`` (moved to ``stock``'s device); else None, saying why once (the stock
    module stays)."""
    try:
        fast = make(stock)
    except UnsupportedEncoder as exc:
        log.warning("%s: keeping the stock %s (%s)", name, what, exc)
        return None
    device = next(iter(stock.parameters()), probe).device  # a module without weights computes where the probe is
    probe = probe.to(device)
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
    deviation = relative_deviation(got, want) if want.shape == got.shape else math.inf
    if deviation > PROBE_TOLERANCE:
        log.warning("%s: keeping the stock %s (the matmul one differs by %.3g on a probe)", name, what, deviation)
        return None
    return fast


def install_matmul_encoder(model, name: str, kind: str) -> torch.nn.Module | None:
    """Swap in the matmul conv encoder ``kind`` (a key of :data:`CONV_ENCODERS`) where
    :func:`checked_swap` passes it; return it, or None."""
    base = model.base_model
    rng = np.random.default_rng(0)
    probe = torch.from_numpy(rng.standard_normal((2, ENCODER_PROBE_SAMPLES)).astype(np.float32))
    probe[1, ENCODER_PROBE_VALID:] = 0
    fast = checked_swap(name, "conv feature encoder", getattr(base, "feature_extractor", None),
                        CONV_ENCODERS[kind], probe)
    if fast is not None:
        base.feature_extractor = fast
    return fast


def install_matmul_positional_conv(model, name: str) -> bool:
    """Swap in :class:`MatmulPositionalConv` where :func:`checked_swap` passes it; return whether."""
    stock = positional_conv(model)
    if stock is None:
        return False
    rng = np.random.default_rng(0)
    probe = torch.from_numpy(rng.standard_normal((2, POSITIONAL_PROBE_FRAMES, model.config.hidden_size))
                             .astype(np.float32))
    probe[1, POSITIONAL_PROBE_VALID:] = 0
    fast = checked_swap(name, "positional conv", stock, MatmulPositionalConv, probe)
    if fast is not None:
        model.base_model.encoder.pos_conv_embed = fast
    return fast is not None
