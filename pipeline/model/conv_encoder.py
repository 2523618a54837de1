"""The wav2vec2 family's conv feature encoder as matmuls, channels-last. Pure torch.

Two layouts of the same products, one per device kind (why: docs/design.md, "The matmul conv encoder"):

* :class:`MatmulFeatureEncoder`, for CPUs in reduced precision, where oneDNN's ``nn.Conv1d`` can
  run these layers far below the machine's matmul speed. Each row goes through the whole stack a
  few hundred output frames at a time, so no layer's output for a whole batch is ever held.
* :class:`BatchedMatmulFeatureEncoder`, for GPUs, where cuDNN's convs dominate a bf16 forward and
  pay for new plans at every new batch shape. Each layer is two or three large matrix products over
  the whole batch, laid end to end.

Each layer is matrix products over views of the channels-last input (no im2col copy), and the
raw-audio layer's group norm is folded into its kernel. Same weights and, but for the raw-audio
layer's conv (fp32 here, one rounding fewer), the same order of roundings as the stock layers
under autocast: convs in the compute dtype, norms in fp32, each activation in the dtype the stock
layer gives it.

For GPUs also :class:`MatmulPositionalConv`, the transformer encoder's grouped positional conv as
products (its windows are copied, a block at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

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
# (67 MB in fp32 at 512 channels); small enough to stay out of fresh pages, large enough for big products.
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

    def conv_frames(self, h: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The conv's first ``steps`` output frames over contiguous ``(T, C_in)``: ``(steps, C_out)``
        in ``h``'s dtype. By default ``steps`` is every frame whose window lies inside ``h``; a
        frame whose window runs past ``h``'s end gets only the pieces (below) that lie inside it.

        A window (frames ``t*s .. t*s+k-1``, ``k*C_in`` consecutive numbers) overlaps the next
        one, so one product over all windows makes the matmul copy them first (their im2col: for
        512 channels a third as long as the product). Cut at every ``s`` frames instead, each
        piece is a matrix whose rows lie densely ``s*C_in`` apart: ``⌈k/s⌉`` products, added.
        """
        _, bias, parts = self.weights(h.dtype)
        step = self.stride * self.in_channels
        steps = self.frames(h.shape[0]) if steps is None else steps
        out = None
        for q, part in enumerate(parts):
            fit = min(steps, max(0, (h.numel() - q * step - part.shape[0]) // step + 1))
            view = h.as_strided((fit, part.shape[0]), (step, 1), h.storage_offset() + q * step)
            if out is not None:
                out[:fit].addmm_(view, part)
            else:
                out = torch.mm(view, part) if bias is None else torch.addmm(bias, view, part)
        return out

    def __call__(self, h: torch.Tensor, dtype: torch.dtype, steps: int | None = None,
                 out: torch.dtype | None = None) -> torch.Tensor:
        """Contiguous ``(T, C_in)`` → conv (:meth:`conv_frames`) → norm (layer norm, in fp32) →
        activation → ``(steps, C_out)`` in ``out`` (default ``dtype``)."""
        x = self.conv_frames(h, steps)
        if self.norm_kind == "layer":
            # The stock layer's layer norm computes in fp32 under autocast; its output is then
            # rounded once, to the compute dtype (or kept, see BatchedMatmulFeatureEncoder).
            x = F.layer_norm(x.float(), *_affine(self.norm))
        return self.activation(x).to(out or dtype)


def fold_group_norm(layer: _Layer, audio: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-audio layer's group norm (per row and channel, over each row's first ``valid``
    frames) folded into its kernel: ``(kernel (B, k, C_out), shift (B, C_out))`` in fp32, so that
    row ``b``'s normalised output is ``windows_b @ kernel[b] + shift[b]``. ``audio`` is ``(B, L)``
    fp32, ``valid`` each row's valid frames (a CPU tensor).

    A channel's conv output is ``x = w·u + b`` over the audio's windows ``u`` (``k`` samples),
    so its mean and variance over a row are ``w·ū + b`` and ``wᵀΣw``, from the windows' mean
    ``ū`` and ``k × k`` covariance ``Σ`` (float64 here, more exact than fp32 sums over 10⁵
    frames). The norm is then one affine map per channel, ``a·x + c``, which the kernel and
    bias absorb: the layer is one product and the activation, instead of the norm written out
    (mean, centred squares, scale): five passes over a 512-channel fp32 tensor.
    """
    norm = layer.norm
    frames = int(valid.max())  # valid on the CPU: no wait for the GPU here
    # A row too short for a frame gets a finite kernel no one reads; non_blocking: no wait for the GPU.
    valid = valid.clamp(min=1).to(audio.device, non_blocking=True)
    u = audio.as_strided((audio.shape[0], frames, layer.kernel), (audio.stride(0), layer.stride, 1)).double()
    inside = (torch.arange(frames, device=audio.device) < valid[:, None]).double()[..., None]
    n = valid.double()[:, None]
    u_mean = (u * inside).sum(1) / n
    d = (u - u_mean[:, None]) * inside
    covariance = d.transpose(1, 2) @ d / n[..., None]
    w = layer.weights(torch.float32)[0].double()
    b = layer.conv.bias.double() if layer.conv.bias is not None else torch.zeros_like(w[:, 0])
    mean = u_mean @ w.T + b
    scale = norm.weight.double() * torch.rsqrt(((w @ covariance) * w).sum(-1) + norm.eps)
    return (w * scale[..., None]).transpose(1, 2).float(), (norm.bias.double() + scale * (b - mean)).float()


class _MatmulEncoder(torch.nn.Module):
    """What both layouts share: the checked layers and the rows' valid lengths (:meth:`valid_lengths`)."""

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
        self._lengths: torch.Tensor | None = None

    @contextmanager
    def valid_lengths(self, samples: torch.Tensor) -> Iterator[None]:
        """Forwards in this block take row ``i`` to hold ``samples[i]`` valid samples (batch invariance)."""
        self._lengths = samples
        try:
            yield
        finally:
            self._lengths = None

    def _frames(self, samples: int) -> int:
        """The stack's output frames for ``samples`` input samples."""
        for layer in self.layers:
            samples = layer.frames(samples)
        return samples

    def _valid(self, rows: int, samples: int) -> torch.Tensor:
        """Each row's valid frames of the raw-audio layer: all of them outside :meth:`valid_lengths`."""
        first = self.layers[0]
        if self._lengths is None:
            return torch.full((rows,), first.frames(samples))
        return conv_output_frames(torch.as_tensor(self._lengths), first.kernel, first.stride)


def _compute_dtype(x: torch.Tensor) -> tuple[str, torch.dtype]:
    """``x``'s device type, and the dtype the stock layers compute in there (autocast's, if on)."""
    device = x.device.type
    return device, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class MatmulFeatureEncoder(_MatmulEncoder):
    """Drop-in for a wav2vec2-family ``FeatureEncoder`` (``conv_layers`` of conv → norm → activation)
    on CPUs.

    ``forward(input_values (B, L)) → (B, C, T)`` like the stock encoder. Inside :meth:`valid_lengths`
    a group norm takes its statistics from each row's valid frames alone and padded frames are zeros,
    as :class:`pipeline.model.invariance.ValidFramesGroupNorm` does for the stock layers. Raises
    :class:`UnsupportedEncoder` for layers it does not know.

    Each row goes through the whole stack ``chunk_frames`` output frames at a time, every layer
    computing just the frames the next one needs (neighbouring windows overlap by a few frames,
    computed twice): no layer's output for a whole batch is ever held, so a CPU replica, which hands
    its free heap back after each call, touches far fewer fresh pages.
    """

    def __init__(self, encoder: torch.nn.Module, chunk_frames: int = CHUNK_FRAMES):
        super().__init__(encoder)
        self.chunk_frames = chunk_frames

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        device, dtype = _compute_dtype(input_values)
        first = self.layers[0]
        with torch.autocast(device, enabled=False):
            # The raw-audio layer in fp32: ten multiply-adds per output, and a norm wants fp32 anyway.
            audio = input_values.float().contiguous()
            frames = self._frames(audio.shape[1])
            out = torch.empty(audio.shape[0], frames, self.layers[-1].out_channels, dtype=dtype, device=audio.device)
            for row, n in enumerate(self._valid(*audio.shape).tolist()):
                fold = None
                if first.norm_kind == "group" and n:
                    kernel, shift = fold_group_norm(first, audio[row : row + 1], torch.tensor([n]))
                    fold = kernel[0], shift[0]
                for start in range(0, frames, self.chunk_frames):
                    stop = min(frames, start + self.chunk_frames)
                    out[row, start:stop] = self._chunk(audio[row], start, stop, n, fold, dtype)
        return out.transpose(1, 2)

    def _chunk(self, audio: torch.Tensor, start: int, stop: int, valid: int,
               fold: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor:
        """Output frames ``start:stop`` of the stack over one row's samples, ``(stop - start, C)``.
        A first layer with a group norm takes it folded into ``fold`` (:func:`fold_group_norm`),
        and its frames from ``valid`` on are zeros."""
        for layer in reversed(self.layers[1:]):
            start, stop = layer.span(start, stop)
        first = self.layers[0]
        samples = audio[slice(*first.span(start, stop))]
        if first.norm_kind != "group":
            h = first(samples[:, None], dtype)
        elif fold is None:
            h = torch.zeros(stop - start, first.out_channels, dtype=dtype, device=audio.device)
        else:
            windows = samples.as_strided((stop - start, first.kernel), (first.stride, 1))
            h = first.activation(torch.addmm(fold[1], windows, fold[0]))
            if valid < stop:
                h[max(0, valid - start) :] = 0
            h = h.to(dtype)
        for layer in self.layers[1:]:
            h = layer(h, dtype)
        return h


class BatchedMatmulFeatureEncoder(_MatmulEncoder):
    """Drop-in for a wav2vec2-family ``FeatureEncoder`` on GPUs: the same contract as
    :class:`MatmulFeatureEncoder` (:meth:`valid_lengths`, output, exceptions), but the batch's rows are laid
    end to end and each layer runs over all of them at once.

    Rows are zero-padded to a multiple of the stack's total stride (320 samples for wav2vec2), so
    every layer gets a whole number of frames per row and the channels-last ``(rows * frames, C)``
    tensor of one layer is the next layer's input as it lies: a layer is ``⌈k/s⌉`` products of
    ``(rows * frames / s, s * C_in)`` by ``(s * C_in, C_out)`` and nothing is copied between
    layers. A row's last few frames then see the next row's first samples; they lie past its valid
    frames (which only ever see the row's valid samples, as in the stock layers) and past the
    frames the stock encoder returns for the batch, and are cut off at the end. Padded frames
    within a row are not zeros, unlike :class:`MatmulFeatureEncoder`'s: the model's mask hides them.
    """

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        device, dtype = _compute_dtype(input_values)
        rows, samples = input_values.shape
        first = self.layers[0]
        stride = math.prod(layer.stride for layer in self.layers)
        width = -(-samples // stride) * stride
        with torch.autocast(device, enabled=False):
            audio = F.pad(input_values.float(), (0, width - samples)).contiguous()  # fp32: as the chunked one
            if first.norm_kind == "group":
                kernel, shift = fold_group_norm(first, audio, self._valid(rows, samples))
                pieces = audio.view(rows, width // first.stride, first.stride)
                h = torch.baddbmm(shift[:, None], pieces, kernel[:, : first.stride])
                for q in range(1, -(-first.kernel // first.stride)):
                    part = kernel[:, q * first.stride : (q + 1) * first.stride]
                    h[:, :-q].baddbmm_(pieces[:, q:, : part.shape[1]], part)
                h = first.activation(h).to(dtype).view(-1, first.out_channels)
            else:
                h = first(audio.view(-1, 1), dtype, steps=audio.numel() // first.stride)
            # CUDA's autocast returns layer_norm's output in fp32 (the CPU's, in its input's dtype),
            # so there a last layer with a layer norm gives fp32, as the stock one does.
            last = self.layers[-1]
            out = torch.float32 if device == "cuda" and last.norm_kind == "layer" else dtype
            for layer in self.layers[1:]:
                h = layer(h, dtype, steps=h.shape[0] // layer.stride, out=out if layer is last else dtype)
        return h.view(rows, width // stride, -1)[:, : self._frames(samples)].transpose(1, 2)


# Frames of the positional conv's windows copied at once: at wav2vec2-base's 768 channels and
# kernel 128, ~200 KB a frame in bf16, so ~400 MB.
POSITIONAL_BLOCK_FRAMES = 2048


class MatmulPositionalConv(torch.nn.Module):
    """Drop-in for a wav2vec2-family ``PositionalConvEmbedding`` (grouped ``Conv1d`` over frames,
    "same" padding, activation), for GPUs: ``forward(hidden (B, T, C)) → (B, T, C)``. Raises
    :class:`UnsupportedEncoder` for a module with more than conv, padding and activation (e.g.
    HuBERT's batch-norm variant, Data2VecAudio's stack of convs).

    The rows are laid end to end with their zero padding between them, and each group's windows
    (``k * C/g`` consecutive numbers of the group-major input) are copied a block of frames at a time
    and multiplied by the group's kernel: one product per block, accumulated in fp32 inside the
    matmul and rounded once, as a conv is. Windows that straddle two rows are
    computed and dropped.
    """

    def __init__(self, embedding: torch.nn.Module, block_frames: int = POSITIONAL_BLOCK_FRAMES):
        super().__init__()
        conv = getattr(embedding, "conv", None)
        extra = {name for name, _ in embedding.named_children()} - {"conv", "padding", "activation"}
        if not isinstance(conv, torch.nn.Conv1d) or extra or not hasattr(getattr(embedding, "padding", None),
                                                                          "num_pad_remove"):
            raise UnsupportedEncoder(f"{type(embedding).__name__} is not a lone grouped conv ({sorted(extra)})")
        kernel = conv.kernel_size[0]
        if (conv.stride != (1,) or conv.dilation != (1,) or conv.padding != (kernel // 2,)
                or conv.padding_mode != "zeros" or conv.in_channels != conv.out_channels):
            raise UnsupportedEncoder(f"{type(embedding).__name__}: strided, dilated, not 'same'-padded or "
                                     "channel-changing conv")
        self.embedding = embedding  # kept as a submodule: its parameters stay the model's
        self.kernel, self.groups, self.pad = kernel, conv.groups, kernel // 2
        self.remove = embedding.padding.num_pad_remove
        self.activation = embedding.activation
        self.block_frames = block_frames
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In ``dtype``: the kernel per group ``(g, k * C_in/g, C_out/g)``, rows ordered (tap,
        channel), and the bias. Computed once per dtype and device, for a loaded model's inference
        (a weight-normed conv recomputes its weight on every call)."""
        conv = self.embedding.conv
        key = dtype, next(conv.parameters()).device
        if key not in self._weights:
            out_channels, width, _ = conv.weight.shape
            w = conv.weight.detach().view(self.groups, out_channels // self.groups, width, self.kernel)
            w = w.permute(0, 3, 2, 1).reshape(self.groups, self.kernel * width, -1).to(dtype).contiguous()
            b = conv.bias
            self._weights[key] = w, None if b is None else b.detach().to(dtype)
        return self._weights[key]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device, dtype = _compute_dtype(hidden_states)
        rows, frames, channels = hidden_states.shape
        groups = self.groups
        width = channels // groups
        span = frames + 2 * self.pad  # each row's frames with its zero padding
        outputs = rows * span - self.kernel + 1  # windows over the rows laid end to end
        with torch.autocast(device, enabled=False):
            kernel, bias = self.weights(dtype)
            x = F.pad(hidden_states.to(dtype), (0, 0, self.pad, self.pad))
            x = x.view(rows * span, groups, width).transpose(0, 1).contiguous()  # (g, rows*span, width)
            out = torch.zeros(groups, rows * span, kernel.shape[2], dtype=dtype, device=x.device)
            if bias is not None:
                out[:, :outputs] = bias.view(groups, 1, -1)
            for start in range(0, outputs, self.block_frames):
                n = min(self.block_frames, outputs - start)
                windows = x.as_strided((groups, n, kernel.shape[1]), (x.stride(0), width, 1),
                                       x.storage_offset() + start * width)
                out[:, start : start + n].baddbmm_(windows.contiguous(), kernel)  # bias added before the one rounding
            out = out.transpose(0, 1).reshape(rows, span, channels)
        return self.activation(out[:, : span - self.kernel + 1 - self.remove])


def _affine(norm: torch.nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps
