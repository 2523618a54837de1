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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
    if _reads_as_wav2vec2(spec, settings):
        fe = Wav2Vec2FeatureExtractor.from_dict(settings)
    else:
        from transformers import AutoFeatureExtractor  # imported here: it imports torch

        fe = AutoFeatureExtractor.from_pretrained(spec.source, **spec.kwargs())
    return FrontEnd(sampling_rate=int(fe.sampling_rate), do_normalize=bool(getattr(fe, "do_normalize", False)))


def _reads_as_wav2vec2(spec: ModelSpec, settings: dict) -> bool:
    """Whether ``AutoFeatureExtractor`` would build a plain ``Wav2Vec2FeatureExtractor`` from ``settings``."""
    if "auto_map" in settings:
        return False
    if "feature_extractor_type" in settings:
        return settings["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    try:  # as AutoFeatureExtractor does then: the model's type, from its config.json
        config = cached_file(spec.source, "config.json", revision=spec.revision)
        return json.loads(Path(config).read_text()).get("model_type") in WAV2VEC2_FAMILY
    except Exception:  # noqa: BLE001 - AutoFeatureExtractor then decides, and raises what it raises
        return False


@dataclass(frozen=True)
class TranscriberLoader:
    """Picklable: what a replica calls to load its :class:`~pipeline.model.transcriber.CTCTranscriber`
    (torch is imported there, in the replica, not where this is built)."""

    spec: ModelSpec
    inference: InferenceConfig
    threads: int | None  # torch's CPU threads; None: torch's default

    def __call__(self) -> CTCTranscriber:
        started = time.perf_counter()
        from pipeline.model.transcriber import CTCTranscriber

        imported = time.perf_counter()
        log.info("torch and transformers imported in %.1f s", imported - started)
        transcriber = CTCTranscriber.from_config(self.spec, self.inference, self.threads)
        log.info("model loaded and probed in %.1f s", time.perf_counter() - imported)
        return transcriber
