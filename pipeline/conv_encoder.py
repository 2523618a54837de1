"""The wav2vec2 family's conv feature encoder as matmuls, channels-last, for CPUs. Pure torch.

On CPUs ``nn.Conv1d`` (oneDNN) can run these layers far below the machine's matmul speed: with
bf16 on an Intel CPU with AMX the 512→512 kernel-3 stride-2 layer ran at a third of the speed of
the same product as one matmul over overlapping windows, and the encoder took ~70 % of the whole
forward pass (on an AMD CPU without AMX both encoders ran alike). Here each layer is matrix
products over views of the channels-last input (no im2col copy), and each row goes through the
whole stack a few hundred output frames at a time, so no layer's output for a whole batch is ever
held (see :class:`MatmulFeatureEncoder`). The raw-audio layer's group norm is folded into its
kernel. Same weights and, but for the raw-audio layer's conv (fp32 here, one rounding fewer), the
same order of roundings as the stock layers under autocast: convs in the compute dtype, norms in
fp32, each activation in the dtype the stock layer gives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_output_frames(samples: int | torch.Tensor, kernel: int, stride: int) -> int | torch.Tensor:
    """Valid output frames of an unpadded conv layer for ``samples`` valid input frames (none below
    the kernel): an int for an int, a tensor for an integer tensor."""
    frames = (samples - kernel) // stride + 1
    return frames.clamp(min=0) if isinstance(frames, torch.Tensor) else max(0, frames)


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


# The stack's output frames computed at once: ~10 s of 16 kHz audio, 33k frames of the first layer
# (67 MB in fp32 at 512 channels). Inside the job on the 2-core CPU 512 ran ~5% faster than whole
# layers; 64 and 128 paid more in per-chunk overhead and smaller products than they saved.
CHUNK_FRAMES = 512


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

    def frames(self, inputs: int) -> int:
        """Output frames for ``inputs`` input frames."""
        return conv_output_frames(inputs, self.kernel, self.stride)

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """Input frames that output frames ``start:stop`` are computed from."""
        return start * self.stride, (stop - 1) * self.stride + self.kernel

    def conv_frames(self, h: torch.Tensor) -> torch.Tensor:
        """The conv over contiguous ``(T, C_in)``: ``(T', C_out)`` in ``h``'s dtype.

        A window (frames ``t*s .. t*s+k-1``, ``k*C_in`` consecutive numbers) overlaps the next
        one, so one product over all windows makes the matmul copy them first (their im2col: for
        512 channels a third as long as the product). Cut at every ``s`` frames instead, each
        piece is a matrix whose rows lie densely ``s*C_in`` apart: ``⌈k/s⌉`` products, added.
        """
        _, bias, parts = self.weights(h.dtype)
        step = self.stride * self.in_channels
        steps = self.frames(h.shape[0])
        out = None
        for q, part in enumerate(parts):
            view = h.as_strided((steps, part.shape[0]), (step, 1), h.storage_offset() + q * step)
            if out is not None:
                out.addmm_(view, part)
            else:
                out = torch.mm(view, part) if bias is None else torch.addmm(bias, view, part)
        return out

    def __call__(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Contiguous ``(T, C_in)`` → conv → norm (layer norm, in fp32) → activation → ``(T', C_out)``
        in ``dtype``."""
        x = self.conv_frames(h)
        if self.norm_kind == "layer":
            # CPU autocast runs layer_norm in fp32; the stock layer's output is then rounded
            # once, to the compute dtype.
            x = F.layer_norm(x.float(), *_affine(self.norm))
        return self.activation(x).to(dtype)


class MatmulFeatureEncoder(torch.nn.Module):
    """Drop-in for a wav2vec2-family ``FeatureEncoder`` (``conv_layers`` of conv → norm → activation).

    ``forward(input_values (B, L)) → (B, C, T)`` like the stock encoder. Set :attr:`lengths`
    (valid samples per row) for batch invariance: a group norm then takes its statistics from
    each row's valid frames alone and padded frames are zeros, as
    :class:`pipeline.model.ValidFramesGroupNorm` does for the stock layers. Raises
    :class:`UnsupportedEncoder` for layers it does not know.

    Each row goes through the whole stack ``CHUNK_FRAMES`` output frames at a time, every layer
    computing just the frames the next one needs (neighbouring windows overlap by a few frames,
    computed twice): no layer's output for a whole batch is ever held. Layer by layer, the first
    layer's output alone was 330 MB of bf16 for a batch of 100 s of audio; a CPU replica, which
    hands its free heap back after each call, touched such pages afresh every call, and inside
    the job the kernel's page faults (zeroing them) took 9 s of its CPU time on 30 minutes of
    audio, 5.5 s chunked (page faults 0.77 M → 0.54 M; its calls ~5% faster, two pairs of runs).
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
        first = self.layers[0]
        with torch.autocast("cpu", enabled=False):
            # The raw-audio layer in fp32: ten multiply-adds per output, and a norm wants fp32 anyway.
            audio = input_values.float().contiguous()
            frames = audio.shape[1]
            for layer in self.layers:
                frames = layer.frames(frames)
            out = torch.empty(audio.shape[0], frames, self.layers[-1].out_channels, dtype=dtype)
            valid = [first.frames(audio.shape[1])] * audio.shape[0]
            if self.lengths is not None:
                valid = conv_output_frames(self.lengths, first.kernel, first.stride).tolist()
            for row, n in enumerate(valid):
                fold = self._fold_group_norm(audio[row], n) if first.norm_kind == "group" and n else None
                for start in range(0, frames, CHUNK_FRAMES):
                    stop = min(frames, start + CHUNK_FRAMES)
                    out[row, start:stop] = self._frames(audio[row], start, stop, n, fold, dtype)
        return out.transpose(1, 2)

    def _frames(self, audio: torch.Tensor, start: int, stop: int, valid: int,
                fold: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor:
        """Output frames ``start:stop`` of the stack over one row's samples, ``(stop - start, C)``.
        A first layer with a group norm takes it folded into ``fold`` (:meth:`_fold_group_norm`),
        and its frames from ``valid`` on are zeros."""
        for layer in reversed(self.layers[1:]):
            start, stop = layer.span(start, stop)
        first = self.layers[0]
        samples = audio[slice(*first.span(start, stop))]
        if first.norm_kind != "group":
            h = first(samples[:, None], dtype)
        elif fold is None:
            h = torch.zeros(stop - start, first.out_channels, dtype=dtype)
        else:
            windows = samples.as_strided((stop - start, first.kernel), (first.stride, 1))
            h = first.activation(torch.addmm(fold[1], windows, fold[0]))
            if valid < stop:
                h[max(0, valid - start) :] = 0
            h = h.to(dtype)
        for layer in self.layers[1:]:
            h = layer(h, dtype)
        return h

    def _fold_group_norm(self, audio: torch.Tensor, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw-audio layer's group norm (per channel, over a row's first ``valid`` frames)
        folded into its kernel: ``(kernel (k, C_out), shift (C_out,))`` in fp32, so that the
        layer's normalised output is ``windows @ kernel + shift``.

        A channel's conv output is ``x = w·u + b`` over the audio's windows ``u`` (ten samples),
        so its mean and variance over a row are ``w·ū + b`` and ``wᵀΣw``, from the windows' mean
        ``ū`` and ``k × k`` covariance ``Σ`` (float64 here, more exact than fp32 sums over 10⁵
        frames). The norm is then one affine map per channel, ``a·x + c``, which the kernel and
        bias absorb: the layer is one product and the activation, where the norm written out
        (mean, centred squares, scale) made five passes over a 512-channel fp32 tensor and took
        three times as long as the conv on a CPU.
        """
        layer = self.layers[0]
        norm = layer.norm
        u = audio.as_strided((valid, layer.kernel), (layer.stride, 1)).double()
        w = layer.weights(torch.float32)[0].double()
        b = layer.conv.bias.double() if layer.conv.bias is not None else torch.zeros(layer.out_channels,
                                                                                     dtype=torch.float64)
        u_mean = u.mean(0)
        d = u - u_mean
        covariance = d.T @ d / valid
        mean = w @ u_mean + b
        scale = norm.weight.double() * torch.rsqrt(((w @ covariance) * w).sum(1) + norm.eps)
        return (w * scale[:, None]).T.float(), (norm.bias.double() + scale * (b - mean)).float()


def _affine(norm: torch.nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps
