"""Loading a checkpoint for inference: device, precision, and the precision fixes a forward needs.

- :func:`load_model`: feature extractor, tokenizer and CTC model through the ``Auto`` classes, so a
  hub id and a local folder take the same path; safetensors only unless pickle is allowed.
- Precision: ``auto`` resolved per device (:func:`resolve_precision`); autocast to :data:`PRECISIONS`;
  fp32 means IEEE fp32 on GPUs (:func:`ieee_fp32`); linear weights stored in the autocast dtype
  (:func:`cast_linear_weights`); on CPUs the positional conv kept in fp32 where this torch build
  computes it wrongly in reduced precision (:func:`guard_positional_conv`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend

# Not AutoProcessor: a checkpoint that decodes with an LM names Wav2Vec2ProcessorWithLM, which it
# cannot load without pyctcdecode and kenlm, and whose batch_decode takes logits, not ids.
from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

from pipeline.model.spec import ModelSpec

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Attention kernels a GPU replica may use: not cuDNN's (torch's first choice on recent GPUs), which
# builds a graph for each new shape, and nearly every batch has a shape of its own.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Largest error of the positional conv under CPU autocast, relative to max(1, max |output|), that
# still counts as right: bf16's own rounding gives ~0.006, a wrong kernel about 1.
POSITIONAL_CONV_TOLERANCE = 0.1


def resolve_device(device: str) -> torch.device:
    """``auto`` follows what the process was given: a visible GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device = cuda, but this process sees no GPU")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU from Ampere on, a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``inference.precision`` for ``device``: ``auto`` is bf16 where it is native, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def load_model(spec: ModelSpec, device: torch.device):
    """``(feature_extractor, tokenizer, model)`` for ``spec``, the model in eval mode on ``device``."""
    feature_extractor = AutoFeatureExtractor.from_pretrained(spec.source, **spec.kwargs())
    tokenizer = AutoTokenizer.from_pretrained(spec.source, **spec.kwargs())
    model = AutoModelForCTC.from_pretrained(spec.source, use_safetensors=not spec.allow_pickle_weights,
                                            **spec.kwargs())
    return feature_extractor, tokenizer, model.to(device).eval()


@contextmanager
def ieee_fp32(on: bool) -> Iterator[None]:
    """While ``on``, fp32 on a GPU means IEEE fp32: TF32 off for cuDNN's convs (on by torch's
    default) and cuBLAS's matmuls, whose TF32 rounding changes transcripts. Restored afterwards.
    Through torch's ``fp32_precision`` settings: reading the older ``allow_tf32`` flags raises once
    anything in the process has set the newer ones differently for convs and RNNs."""
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


def relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want|`` relative to ``max(1, max |want|)``: what the load-time probes compare."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def positional_conv(model) -> torch.nn.Module | None:
    """The transformer encoder's positional conv embedding, where the model has one."""
    return getattr(getattr(model.base_model, "encoder", None), "pos_conv_embed", None)


def positional_conv_in_fp32(model) -> None:
    """Run the encoder's positional conv outside autocast, in fp32 (see :func:`guard_positional_conv`)."""
    conv = positional_conv(model)
    if conv is None:
        return
    forward = conv.forward

    def fp32_forward(hidden_states, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(hidden_states.float(), *args, **kwargs)

    conv.forward = fp32_forward


def guard_positional_conv(model, dtype: torch.dtype) -> bool:
    """Keep the encoder's positional conv in ``dtype`` under CPU autocast where this torch build
    computes it right, else run it in fp32; return whether it now runs in fp32.

    oneDNN's grouped conv1d in bf16 is right for some shapes and wrong for others (wav2vec2-base's
    is right, the demo model's garbles every transcript), so a probe on random frames, autocast
    against fp32, decides for each model.
    """
    conv = positional_conv(model)
    if conv is None:
        return False
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn((2, 300, model.config.hidden_size), generator=generator)
    try:
        with torch.inference_mode():
            want = conv(hidden)
            with torch.autocast("cpu", dtype=dtype):
                got = conv(hidden).float()
        deviation = relative_deviation(got, want)
    except Exception as exc:  # noqa: BLE001 - a conv the probe cannot call keeps fp32
        log.info("positional conv in fp32: the probe failed (%s)", exc)
    else:
        if deviation <= POSITIONAL_CONV_TOLERANCE:
            return False
        log.info("positional conv in fp32: in %s it deviates by %.3g on a probe", dtype, deviation)
    positional_conv_in_fp32(model)
    return True


def cast_linear_weights(model, dtype: torch.dtype) -> int:
    """Store every ``nn.Linear``'s weight and bias in ``dtype``, for forwards under autocast to
    ``dtype`` only; return how many layers. Autocast would cast them on every forward (its cache
    lives for one autocast context) and compute with exactly these values, so the logits are the
    same bit for bit; the weights take half the memory."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for layer in layers:
        layer.to(dtype)
    return len(layers)
