"""What the driver knows of a checkpoint without importing torch: where it comes from
(:class:`ModelSpec`), its feature extractor's settings (:func:`load_front_end`), and how a replica
loads it (:class:`TranscriberLoader`).

The rest of ``pipeline.model`` imports torch and transformers' models, seconds of imports and
hundreds of MB that the driver and the decode workers do without.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from transformers import Wav2Vec2FeatureExtractor
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import cached_file

from pipeline import bundled
from pipeline.config import InferenceConfig

if TYPE_CHECKING:
    from pipeline.model.transcriber import CTCTranscriber

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where a checkpoint comes from and how far it is trusted."""

    name: str  # as configured: a hub id, a local folder or a bundled @name
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # pickle (.bin) weights can run code when loaded
    folder: str | None = None  # a local folder's absolute path, settled on the driver (see located)

    @property
    def source(self) -> str:
        """What ``from_pretrained`` gets: the absolute folder, or ``@demo`` resolved where this runs
        (driver or actor), or the hub id."""
        return self.folder or bundled.model_path(self.name)

    def located(self) -> ModelSpec:
        """This spec with a relative local folder made absolute: a replica's working directory is not
        the driver's."""
        if self.name.startswith(bundled.PREFIX) or not Path(self.name).is_dir():
            return self
        return dataclasses.replace(self, folder=str(Path(self.name).absolute()))

    def check_local_weights(self) -> None:
        """Raise ``ValueError`` for a local folder that holds only pickle weights, unless allowed.

        (Hub ids are checked where the weights load: ``use_safetensors=True`` refuses them there.)
        """
        folder = Path(self.source)
        if self.allow_pickle_weights or not folder.is_dir() or any(folder.glob("*.safetensors")):
            return
        pickled = sorted(f.name for f in folder.glob("*.bin")) or ["no weights at all"]
        raise ValueError(
            f"model.name = {self.name!r}: no safetensors weights in {folder} (found {', '.join(pickled)}); "
            "pickle weights can run code when loaded: convert them to safetensors, or set "
            "model.allow_pickle_weights=true if you trust this checkpoint"
        )

    def kwargs(self) -> dict:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


@dataclass(frozen=True)
class FrontEnd:
    """What the decode stage needs to know of the model's feature extractor."""

    sampling_rate: int
    do_normalize: bool
    hop: int = 320  # input samples per output frame (the conv strides' product)
    min_samples: int = 400  # the conv stack's receptive field: fewer samples give no frame


# The model types whose checkpoints transformers' AutoFeatureExtractor reads as a
# Wav2Vec2FeatureExtractor when their settings name no class (its table of them imports torch;
# tests/test_model.py checks these against it): the wav2vec2 family this job runs.
WAV2VEC2_FAMILY = frozenset({"wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat",
                             "sew", "sew-d", "wav2vec2-conformer"})


def load_front_end(spec: ModelSpec) -> FrontEnd:
    """Read only the feature extractor's settings (a small JSON file, local or from the hub), e.g.
    on the driver. The wav2vec2 family's feature extractor is read without importing torch; any
    other kind, or a checkpoint's own class (``auto_map``), goes through ``AutoFeatureExtractor``,
    which imports it."""
    settings, _ = FeatureExtractionMixin.get_feature_extractor_dict(spec.source, revision=spec.revision)
    config = _model_config(spec)  # read once: for a hub checkpoint each read may be a request
    if _reads_as_wav2vec2(settings, config):
        fe = Wav2Vec2FeatureExtractor.from_dict(settings)
    else:
        from transformers import AutoFeatureExtractor  # imported here: it imports torch

        fe = AutoFeatureExtractor.from_pretrained(spec.source, **spec.kwargs())
    kernel, stride = config.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2)), config.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))
    return FrontEnd(sampling_rate=int(fe.sampling_rate), do_normalize=bool(getattr(fe, "do_normalize", False)),
                    hop=math.prod(stride), min_samples=receptive_field(kernel, stride))


def receptive_field(conv_kernel: Sequence[int], conv_stride: Sequence[int]) -> int:
    """Fewest input samples that give one output frame of a conv stack."""
    field = 1
    for kernel, stride in zip(reversed(conv_kernel), reversed(conv_stride), strict=True):
        field = (field - 1) * stride + kernel
    return field


def _model_config(spec: ModelSpec) -> dict:
    """The checkpoint's config.json (its conv stack), or nothing where it has none."""
    try:
        return json.loads(Path(cached_file(spec.source, "config.json", revision=spec.revision)).read_text())
    except Exception:  # noqa: BLE001 - the family's defaults then; the replica's load reports a real problem
        return {}


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_available(spec: ModelSpec, timeout_s: float = 3.0) -> None:
    """Raise ``ValueError`` at once for a hub model that is neither in the local cache nor reachable:
    the hub client would retry for most of a minute before failing."""
    if spec.folder or spec.name.startswith(bundled.PREFIX) or not _HUB_ID.fullmatch(spec.name):
        return  # a local folder (or a path that is none: loading it says so)
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec.name, "config.json", revision=spec.revision), str):
        return
    where = f"model.name = {spec.name!r}: not in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{where}, and HF_HUB_OFFLINE is set; download it once with network, or pass --model DIR")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct connection says nothing
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"{where}, and {constants.ENDPOINT} is unreachable ({exc.strerror or exc}); run once where "
                         "the hub is reachable, or pass --model DIR (a local checkpoint folder)") from None


def has_language_model(spec: ModelSpec) -> bool:
    """Whether the checkpoint ships a beam-search decoder with an n-gram LM, as
    ``Wav2Vec2ProcessorWithLM.save_pretrained`` writes one (``alphabet.json`` and ``language_model/``)."""
    if spec.folder or spec.name.startswith(bundled.PREFIX):
        folder = Path(spec.source)
        return (folder / "alphabet.json").is_file() and (folder / "language_model").is_dir()
    try:
        cached_file(spec.source, "alphabet.json", revision=spec.revision)
        return True
    except Exception:  # noqa: BLE001 - no such file (or no hub): no LM of its own
        return False


def ctc_labels(spec: ModelSpec) -> list[str]:
    """The checkpoint's CTC vocabulary in id order as pyctcdecode reads it: the blank (the pad
    token) as "", the word delimiter as " ", every other token as written."""
    from transformers import AutoTokenizer  # imported here: only an LM decoder needs it

    tokenizer = AutoTokenizer.from_pretrained(spec.source, **spec.kwargs())
    size = _model_config(spec).get("vocab_size") or len(tokenizer)  # the model's output width
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    return ["" if t == tokenizer.pad_token else " " if t == delimiter else t for t in tokens]


def _reads_as_wav2vec2(settings: dict, config: dict) -> bool:
    """Whether ``AutoFeatureExtractor`` would build a plain ``Wav2Vec2FeatureExtractor`` from ``settings``
    (the checkpoint's preprocessor settings) and ``config`` (its config.json)."""
    if "auto_map" in settings:
        return False
    if "feature_extractor_type" in settings:
        return settings["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    # as AutoFeatureExtractor does then: the model's type, from its config.json (none: it decides)
    return config.get("model_type") in WAV2VEC2_FAMILY


@dataclass(frozen=True)
class TranscriberLoader:
    """Picklable: what a replica calls to load its :class:`~pipeline.model.transcriber.CTCTranscriber`
    (torch is imported there, in the replica, not where this is built)."""

    spec: ModelSpec
    inference: InferenceConfig
    threads: int | None  # torch's CPU threads; None: torch's default

    def __call__(self) -> CTCTranscriber:
        started = time.perf_counter()
        from transformers.utils import logging as transformers_logging

        from pipeline.model.transcriber import CTCTranscriber

        if not log.isEnabledFor(logging.INFO):  # quiet: not transformers' "Loading weights" bars either
            transformers_logging.disable_progress_bar()
        imported = time.perf_counter()
        log.info("torch and transformers imported in %.1f s", imported - started)
        transcriber = CTCTranscriber.from_config(self.spec, self.inference, self.threads)
        log.info("model loaded and probed in %.1f s", time.perf_counter() - imported)
        return transcriber
