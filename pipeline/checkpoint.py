"""What the driver knows of a checkpoint and of the replicas that load it, without torch.

Where the checkpoint comes from (:class:`ModelSpec`), its feature extractor's settings
(:func:`load_front_end`) and the CPU replicas' process settings (:data:`CPU_REPLICA_ENV`).
``pipeline.model``, the replicas' code, imports torch and transformers' models: ~2.5 s and ~300 MB
that the driver does without (2-core CPU: the demo job's driver imported for 3.5-3.8 s before).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Wav2Vec2FeatureExtractor
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import cached_file

from pipeline import bundled


@dataclass(frozen=True)
class ModelSpec:
    """Where a checkpoint comes from and how far it is trusted."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # pickle (.bin) weights can run code when loaded

    @property
    def source(self) -> str:
        """What ``from_pretrained`` gets: ``@demo`` resolved where this runs (driver or actor)."""
        return bundled.model_path(self.name)

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


# Settings for CPU replica processes, as environment variables, read when the process starts or
# when the library first needs them.
# glibc: read before any thread exists (``mallopt`` later does not reach the arenas of threads
# already running, and Ray calls a replica from a pool thread). Without them glibc gives every block
# over 32 MiB back to the kernel and maps the next one afresh, so each large activation of a CPU
# forward pass is paid for again in page faults: inside the job on the 2-core CPU the replica's bf16
# forward passes ran ~12% faster with these (one pair of runs; alone, the chunked matmul encoder runs
# as fast without them). The heap keeps its high-water mark and never shrinks: a process whose
# allocations vary widely in size can fragment it (the benchmark's seed path grew to 24 GB on 30
# minutes of audio), so this is for the replicas, which hand the free pages back after each call
# (:meth:`pipeline.model.CTCTranscriber.release_memory`).
# oneDNN and ideep (PyTorch's wrapper of it) each keep what they build per matmul shape, up to 1024
# entries by default, and nearly every batch has shapes of its own, a dozen or so per forward pass:
# a bf16 wav2vec2-base replica's live heap grew by ~330 MB over the first 80 batches of distinct
# lengths and its heap by ~1.2 GB. With both at 64 the live heap stays within ~70 MB of its start
# and the speed is the same (the shapes rarely repeat, so few lookups hit either way).
CPU_REPLICA_ENV = {
    "MALLOC_ARENA_MAX": "1",  # one heap for all threads: a thread's own arena maps large blocks anyway
    "MALLOC_MMAP_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TOP_PAD_": str(256 << 20),
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
    "LRU_CACHE_CAPACITY": "64",  # ideep's cache
}
