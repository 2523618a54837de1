"""The wav2vec2 family's conv feature encoder as matmuls, channels-last, for CPUs. Pure torch.

On CPUs ``nn.Conv1d`` (oneDNN) runs these layers far below the machine's matmul speed: with bf16
on an AVX-512 CPU the 512→512 kernel-3 stride-2 layer ran at a third of the speed of the same
product as one matmul over overlapping windows, and the encoder took ~70 % of the whole forward
pass. Here each layer is matrix products over views of the channels-last input (no im2col copy),
computed a few thousand output frames at a time, so the fp32 temporaries of norm and activation
stay in cache and are reused instead of being fresh 100 MB tensors whose first-touch page faults
cost as much as the arithmetic. The raw-audio layer's group norm is folded into its kernel.
Same weights and, but for the raw-audio layer's conv (fp32 here, one rounding fewer), the same
order of roundings as the stock layers under autocast: convs in the compute dtype, norms in fp32,
each activation in the dtype the stock layer gives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_output_frames(samples: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Valid output frames of an unpadded conv layer for ``samples`` valid input frames (none below
    the kernel)."""
    return (torch.div(samples - kernel, stride, rounding_mode="floor") + 1).clamp_(min=0)


class UnsupportedEncoder(ValueError):
    """The encoder's layers are not the conv → norm → activation stack this module computes."""


def _norm_kind(layer: torch.nn.Module, out_channels: int) -> str:
    norm = getattr(layer, "layer_norm", None)
    if norm is None:
        return "none"
    if isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == out_channels and norm.affine:
        return "group"  # per channel, over time (wav2vec2-base's first layer)
    if isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (out_channels,):
        return "layer"  # per frame, over channels
    raise UnsupportedEncoder(f"{type(layer).__name__} has a {type(norm).__name__} this encoder does not compute")


CHUNK_FRAMES = 4096  # output frames computed at once: 8 MB of fp32 at 512 channels


def _chunks(frames: int):
    """``(start, stop)`` of each run of at most ``CHUNK_FRAMES`` frames in ``range(frames)``."""
    for start in range(0, frames, CHUNK_FRAMES):
        yield start, min(frames, start + CHUNK_FRAMES)


class _Layer:
    """One conv layer's settings and its kernel as matrices, per dtype."""

    def __init__(self, layer: torch.nn.Module):
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, torch.nn.Conv1d):
            raise UnsupportedEncoder(f"{type(layer).__name__} has no Conv1d")
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            raise UnsupportedEncoder(f"{type(layer).__name__}: padded, dilated or grouped conv")
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.norm_kind = _norm_kind(layer, conv.out_channels)
        self.norm = getattr(layer, "layer_norm", None)
        self.activation = layer.activation
        self.conv = conv
        self._weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]] = {}

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """In ``dtype``: the kernel ``(C_out, k*C_in)`` with columns ordered (tap, channel), the
        bias, and the kernel's transpose cut into ``⌈k/s⌉`` pieces ``(width, C_out)``, one per
        block of ``s`` input frames (the last may be partial)."""
        if dtype not in self._weights:
            w = self.conv.weight.detach().permute(0, 2, 1).reshape(self.out_channels, -1).to(dtype).contiguous()
            b = self.conv.bias
            step = self.stride * self.in_channels
            parts = [w[:, q : q + step].t().contiguous() for q in range(0, w.shape[1], step)]
            self._weights[dtype] = (w, None if b is None else b.detach().to(dtype), parts)
        return self._weights[dtype]

    def steps(self, h: torch.Tensor) -> int:
        """Output frames for ``h``'s ``(B, T, C_in)``."""
        return max(0, (h.shape[1] - self.kernel) // self.stride + 1)

    def conv_frames(self, h: torch.Tensor, row: int, start: int, stop: int) -> torch.Tensor:
        """Output frames ``start:stop`` of row ``row`` of the conv over contiguous ``(B, T, C_in)``,
        ``(stop - start, C_out)`` in ``h``'s dtype.

        A window (frames ``t*s .. t*s+k-1``, ``k*C_in`` consecutive numbers) overlaps the next
        one, so one product over all windows makes the matmul copy them first (their im2col: for
        512 channels a third as long as the product). Cut at every ``s`` frames instead, each
        piece is a matrix whose rows lie densely ``s*C_in`` apart: ``⌈k/s⌉`` products, added.
        """
        _, bias, parts = self.weights(h.dtype)
        step = self.stride * self.in_channels
        offset = h.storage_offset() + row * h.stride(0) + start * step
        out = None
        for q, part in enumerate(parts):
            view = h.as_strided((stop - start, part.shape[0]), (step, 1), offset + q * step)
            if out is not None:
                out.addmm_(view, part)
            else:
                out = torch.mm(view, part) if bias is None else torch.addmm(bias, view, part)
        return out

    def __call__(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, T, C_in)`` → conv → norm (layer norm, in fp32) → activation → ``(B, T', C_out)``
        in ``dtype``."""
        h = h.contiguous()  # the views in conv_frames() assume (T, C) rows laid out densely
        steps = self.steps(h)
        out = torch.empty(h.shape[0], steps, self.out_channels, dtype=dtype)
        for row in range(h.shape[0]):
            for start, stop in _chunks(steps):
                x = self.conv_frames(h, row, start, stop)
                if self.norm_kind == "layer":
                    # CPU autocast runs layer_norm in fp32; the stock layer's output is then rounded
                    # once, to the compute dtype, as the assignment does here.
                    x = F.layer_norm(x.float(), *_affine(self.norm))
                out[row, start:stop] = self.activation(x)
        return out


class MatmulFeatureEncoder(torch.nn.Module):
    """Drop-in for a wav2vec2-family ``FeatureEncoder`` (``conv_layers`` of conv → norm → activation).

    ``forward(input_values (B, L)) → (B, C, T)`` like the stock encoder. Set :attr:`lengths`
    (valid samples per row) for batch invariance: a group norm then takes its statistics from
    each row's valid frames alone and padded frames are zeros, as
    :class:`pipeline.model.ValidFramesGroupNorm` does for the stock layers. Raises
    :class:`UnsupportedEncoder` for layers it does not know.
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        layers = getattr(encoder, "conv_layers", None)
        if not layers:
            raise UnsupportedEncoder(f"{type(encoder).__name__} has no conv_layers")
        self.encoder = encoder  # kept as a submodule: its parameters stay the model's
        self.layers = [_Layer(layer) for layer in layers]
        if self.layers[0].in_channels != 1:
            raise UnsupportedEncoder("the first conv layer does not take one channel of raw audio")
        if any(layer.norm_kind == "group" for layer in self.layers[1:]):
            raise UnsupportedEncoder("a group norm after the raw-audio layer")
        self.lengths: torch.Tensor | None = None

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else input_values.dtype
        lengths = self.lengths
        with torch.autocast("cpu", enabled=False):
            # The raw-audio layer in fp32: ten multiply-adds per output, and a norm wants fp32 anyway.
            h = input_values.float()[:, :, None]
            for layer in self.layers:
                if lengths is not None:
                    lengths = conv_output_frames(lengths, layer.kernel, layer.stride)
                if layer.norm_kind == "group":
                    h = self._normalised_audio_conv(h, layer, lengths, dtype)
                else:
                    h = layer(h if layer.in_channels == 1 else h.to(dtype), dtype)
        return h.transpose(1, 2)

    @staticmethod
    def _normalised_audio_conv(audio: torch.Tensor, layer: _Layer, lengths: torch.Tensor | None,
                               dtype: torch.dtype) -> torch.Tensor:
        """The raw-audio layer (``(B, L, 1)`` fp32 in) with its group norm (per row and channel,
        over time; over each row's ``lengths`` valid frames when given) folded into its kernel,
        then the activation, in ``dtype``; padded frames are zeros.

        A channel's conv output is ``x = w·u + b`` over the audio's windows ``u`` (ten samples),
        so its mean and variance over a row are ``w·ū + b`` and ``wᵀΣw``, from the windows' mean
        ``ū`` and ``k × k`` covariance ``Σ`` (float64 here, more exact than fp32 sums over 10⁵
        frames). The norm is then one affine map per channel, ``a·x + c``, which the kernel and
        bias absorb: the layer is one product and the activation, where the norm written out
        (mean, centred squares, scale) made five passes over a 512-channel fp32 tensor and took
        three times as long as the conv on a CPU.
        """
        norm = layer.norm
        audio = audio.contiguous()
        rows, steps = audio.shape[0], layer.steps(audio)
        windows = audio.as_strided((rows, steps, layer.kernel), (audio.stride(0), layer.stride, 1))
        w = layer.weights(torch.float32)[0].double()
        b = layer.conv.bias.double() if layer.conv.bias is not None else torch.zeros(layer.out_channels,
                                                                                     dtype=torch.float64)
        out = torch.zeros(rows, steps, layer.out_channels, dtype=dtype)
        for row, n in enumerate(lengths.tolist() if lengths is not None else [steps] * rows):
            if n == 0:
                continue
            u = windows[row, :n].double()
            u_mean = u.mean(0)
            d = u - u_mean
            covariance = d.T @ d / n
            mean = w @ u_mean + b
            scale = norm.weight.double() * torch.rsqrt(((w @ covariance) * w).sum(1) + norm.eps)
            kernel = (w * scale[:, None]).T.float()
            shift = (norm.bias.double() + scale * (b - mean)).float()
            for start, stop in _chunks(n):
                out[row, start:stop] = layer.activation(torch.addmm(shift, windows[row, start:stop], kernel))
        return out


def _affine(norm: torch.nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps
