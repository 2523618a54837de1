"""The wav2vec2 family's conv feature encoder as matmuls, channels-last, for CPUs. Pure torch.

On CPUs ``nn.Conv1d`` (oneDNN) runs these layers far below the machine's matmul speed: with bf16
on an AVX-512 CPU the 512→512 kernel-3 stride-2 layer ran at a third of the speed of the same
product as one matmul over overlapping windows, and the encoder took ~70 % of the whole forward
pass. Each layer here is that matmul: a window view of the channels-last input (frames ``t*s ..
t*s+k-1`` are ``k*C`` consecutive numbers) times the kernel flattened to ``(k*C_in, C_out)``.
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


class _Layer:
    """One conv layer's settings and its kernel as a matrix, per dtype."""

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
        self._weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(C_out, k*C_in)`` with columns ordered (tap, channel), and the bias, in ``dtype``."""
        if dtype not in self._weights:
            w = self.conv.weight.detach().permute(0, 2, 1).reshape(self.out_channels, -1)
            b = self.conv.bias
            self._weights[dtype] = (w.to(dtype).contiguous(), None if b is None else b.detach().to(dtype))
        return self._weights[dtype]


    def conv_matmul(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, C_in)`` contiguous → ``(B, T', C_out)``: the windows as one matrix product."""
        h = h.contiguous()  # the window view below assumes (T, C) rows laid out densely
        rows, steps = h.shape[0], (h.shape[1] - self.kernel) // self.stride + 1
        width = self.kernel * self.in_channels
        windows = h.as_strided((rows, steps, width), (h.stride(0), self.stride * self.in_channels, 1))
        weight, bias = self.weights(h.dtype)
        return F.linear(windows, weight, bias)


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
        self.lengths: torch.Tensor | None = None

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else input_values.dtype
        lengths = self.lengths
        with torch.autocast("cpu", enabled=False):
            h = input_values[:, :, None]
            for layer in self.layers:
                # The raw-audio layer's conv in fp32: ten multiply-adds per output, and its norm
                # wants fp32 anyway.
                h = layer.conv_matmul(h.float() if layer.in_channels == 1 else h.to(dtype))
                if lengths is not None:
                    lengths = conv_output_frames(lengths, layer.kernel, layer.stride)
                if layer.norm_kind == "group":
                    h = self._group_norm(h, layer, lengths, dtype)
                elif layer.norm_kind == "layer":
                    # Out in the compute dtype, as the stock layer: CPU autocast keeps layer_norm's
                    # input dtype (computed in fp32 here, then rounded once).
                    h = layer.activation(F.layer_norm(h.float(), *_affine(layer.norm))).to(dtype)
                else:
                    h = layer.activation(h)
        return h.transpose(1, 2)

    @staticmethod
    def _group_norm(h: torch.Tensor, layer: _Layer, lengths: torch.Tensor | None, dtype) -> torch.Tensor:
        """Per row and channel over time, then the activation; over each row's valid frames only
        when ``lengths`` is given. Statistics in fp32, as autocast runs ``group_norm``.

        Written out (mean, centred sum of squares, one multiply-add) because ``torch.var_mean``
        over time in this layout took twice as long as the rest of the layer on a CPU; scratch
        buffers are reused because first-touch page faults on fresh 100 MB tensors cost as much
        as the arithmetic.
        """
        norm = layer.norm
        out = torch.empty(h.shape, dtype=dtype)
        valid = lengths.tolist() if lengths is not None else [h.shape[1]] * h.shape[0]
        centred = torch.empty(h.shape[1:], dtype=torch.float32)
        scratch = torch.empty_like(centred)
        for row, n in enumerate(valid):
            x = h[row, :n].float()
            mean = x.sum(0) / n
            d = torch.sub(x, mean, out=centred[:n])
            var = torch.mul(d, d, out=scratch[:n]).sum(0) / n
            scale = norm.weight * torch.rsqrt(var + norm.eps)
            y = torch.mul(d, scale, out=scratch[:n]).add_(norm.bias)
            out[row, :n] = layer.activation(y)
            out[row, n:] = 0
        return out


def _affine(norm: torch.nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps
