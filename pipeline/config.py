"""Typed job configuration: values-only YAML plus ``KEY=VALUE`` overrides, validated once.

Every error names the key, the bad value and what is allowed, e.g.
``inference.max_replicas = 0: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import bundled
from pipeline.errors import ConfigError

DEFAULT_MODEL = "facebook/wav2vec2-base-960h"
DEFAULT_DECODER = "pipeline.audio:decode"
AUTO = "auto"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    path: str | None = Field(
        None, description="Manifest (csv/jsonl/parquet), audio folder, HF dataset, @sample or @heldout")
    # auto: by the name (a glob, an audio file, a manifest's suffix) or the folder's contents
    format: Literal["auto", "csv", "jsonl", "parquet", "folder", "hf", "glob", "audio"] = "auto"
    hf_split: str | None = None
    hf_config: str | None = None
    audio_column: str = "audio"
    # Manifest paths must resolve (symlinks and ".." included) inside one of these folders; a row
    # that does not becomes a `not_allowed` error row. Empty: no restriction.
    allowed_roots: list[str] = []

    @field_validator("path")
    @classmethod
    def _known_bundled(cls, value: str | None) -> str | None:
        if value is not None:
            bundled.input_path(value)
        return value


class OutputConfig(_Section):
    path: str | None = None
    overwrite: bool = False
    rows_per_shard: int = Field(10_000, ge=1)
    max_retries: int = Field(3, ge=0)  # Ray's retries of a shard-writing task whose worker died
    # The job exits 1 (after committing everything) when at least this fraction of its rows are
    # error rows, so a scheduler notices a run that transcribed little; 1.0: when every row failed.
    max_error_fraction: float = Field(1.0, gt=0, le=1)
    # A finished run is transcribed again for its error rows only (e.g. files missing then, present now);
    # its other rows and shards stay as they are.
    retry_errors: bool = False
    # The words column (each word with its start, end and confidence); false leaves it out.
    words: bool = True
    # Write _report.html (pipeline.report) once the run is committed; `transcribe report OUT_DIR` any time.
    report: bool = False


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="Hub id, local folder, or @demo (the bundled model)")
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # safetensors only unless set: pickle can run code on load

    @field_validator("name")
    @classmethod
    def _known_bundled(cls, value: str) -> str:
        bundled.model_path(value)
        return value


class AudioConfig(_Section):
    # Checked against the header before decoding; longer files are cut into windows (inference.window_s).
    max_duration_s: float = Field(4 * 3600.0, gt=0)
    max_file_bytes: int = Field(2 * 1024**3, ge=1)  # checked with stat before opening


class DecodeConfig(_Section):
    rows_per_task: int = Field(16, ge=1)
    cpus_per_task: float = Field(1.0, gt=0)
    max_retries: int = Field(3, ge=0)  # Ray's retries of a decode task whose worker died
    # Decode in a child process per worker, so a file that crashes or hangs the decoder costs its
    # row only (pipeline.isolation); timeout_s and max_attempts bound each row.
    isolate: bool = True
    timeout_s: float = Field(300.0, gt=0)  # for one file, with room for multi-hour recordings
    max_attempts: int = Field(2, ge=1)
    # The function that decodes one file, ``module:function`` with pipeline.audio.decode's signature
    # (e.g. another codec's); importable by every worker.
    function: str = Field(DEFAULT_DECODER, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _auto(value: Any) -> Any:
    return None if value == AUTO else value


# A setting that may be "auto" (or null): sized when the job starts, from what Ray reports (resolve_resources).
AutoInt = Annotated[int | None, BeforeValidator(_auto)]
AutoFloat = Annotated[float | None, BeforeValidator(_auto)]


class InferenceConfig(_Section):
    # auto: one replica per GPU Ray reports, else one CPU replica (more, one thread each, ran slower).
    min_replicas: AutoInt = Field(None, ge=1)
    max_replicas: AutoInt = Field(None, ge=1)
    cpus_per_replica: AutoFloat = Field(None, gt=0)  # Ray's accounting; auto: 1
    gpus_per_replica: AutoFloat = Field(None, ge=0)  # auto: 1 where Ray reports GPUs, else 0
    # auto: a GPU replica's reserved CPUs; a CPU replica's share of its node's cores (decode tasks
    # run beside it on the same cores: its threads idle while they decode, they idle while it computes).
    torch_threads: AutoInt = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast dtype of the forward pass. auto: bf16 where the device computes it natively (GPUs from
    # Ampere on, CPUs with AVX-512 BF16 or AMX), else fp32; fp16 on GPUs only. The load-time probes run in fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The conv feature encoder (pipeline.model.invariance.CONV_ENCODERS): auto = matmul products
    # (CPUs in reduced precision: chunked; GPUs: batched, with the positional conv too), else stock.
    conv_encoder: Literal["auto", "stock", "chunked", "batched"] = "auto"
    rows_per_call: int = Field(64, ge=1)
    max_batch_samples: int = Field(1_600_000, ge=16_000)
    max_padding_waste: float = Field(0.05, ge=0)  # per batch: padded / real samples - 1
    # A file longer than window_s is cut into windows of window_s that overlap by the strides (left,
    # right; a number: both), rounded to the model's frame hop, as the transformers pipeline's
    # chunk_length_s and stride_length_s; the strides' frames are dropped, the rest stitched in order.
    # Shorter files run whole, as utterance corpora's do. The windows of all rows share padded batches.
    window_s: float = Field(40.0, gt=0)
    window_stride_s: float | tuple[float, float] = 4.0
    # Restarts of a replica that died, and retries of the rows it held; then the job fails instead
    # of retrying forever (Ray Data's default for actor pools).
    max_restarts: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check_pool(self) -> InferenceConfig:
        if self.min_replicas is not None and self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"inference.max_replicas = {self.max_replicas}: must be >= inference.min_replicas "
                f"({self.min_replicas})"
            )
        if self.precision == "fp16" and (self.gpus_per_replica == 0 or self.device == "cpu"):
            raise ValueError(
                "inference.precision = 'fp16': needs GPU replicas (inference.gpus_per_replica > 0); "
                "use bf16 on CPUs"
            )
        left, right = self.strides
        if min(left, right) < 0 or left + right >= self.window_s:
            raise ValueError(
                f"inference.window_stride_s = {self.window_stride_s}: strides of {left:g} s and {right:g} s "
                f"leave no centre in inference.window_s = {self.window_s:g}; make them non-negative and "
                "together shorter than the window"
            )
        if self.device == "cuda" and self.gpus_per_replica == 0:
            raise ValueError(
                "inference.device = cuda: needs inference.gpus_per_replica > 0 so Ray gives each "
                "replica a GPU"
            )
        return self


    @property
    def strides(self) -> tuple[float, float]:
        """The left and right strides in seconds."""
        if isinstance(self.window_stride_s, tuple):
            return self.window_stride_s
        return self.window_stride_s, self.window_stride_s


class DecodingConfig(_Section):
    # Greedy CTC decoding, or a beam search with a word n-gram LM (pyctcdecode + KenLM) in CPU tasks
    # after the replicas. lm: "auto" uses the checkpoint's own LM (its language_model/ folder, as
    # Wav2Vec2ProcessorWithLM saves it) where it has one, else greedy; "none": greedy; else a KenLM
    # model, ARPA or binary (a path every node reaches, a URI, or @demo-lm).
    lm: str = "auto"
    alpha: float | None = Field(None, ge=0)  # the LM's weight; null: the checkpoint's, else 0.5
    beta: float | None = None  # the bonus per word; null: the checkpoint's, else 1.0
    beam_width: int = Field(100, ge=1)
    unigrams: str | None = None  # the LM's words, one per line; null: read from an ARPA file
    hotwords: list[str] = []  # words or phrases the beam favours
    hotword_weight: float = 10.0
    rows_per_task: int = Field(64, ge=1)
    cpus_per_task: float = Field(1.0, gt=0)

    @field_validator("lm")
    @classmethod
    def _lm_exists(cls, value: str) -> str:
        if value in ("auto", "none"):
            return value
        path = bundled.lm_path(value)
        if "://" not in path and not Path(path).is_file():
            raise ValueError(f"decoding.lm = {value!r}: no such file; give a KenLM model (ARPA or binary), "
                             "'auto' or 'none'")
        return value

    @field_validator("unigrams")
    @classmethod
    def _unigrams_exist(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not Path(value).is_file():
            raise ValueError(f"decoding.unigrams = {value!r}: no such file; give a text file of words, one per line")
        return value


class RayConfig(_Section):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    # Ray Data's progress bars, one per operator; the job's own progress line (rows, audio, speed,
    # ETA, logged every ray.progress_every_s) is on unless --quiet.
    progress_bars: bool = False
    progress_every_s: float = Field(10.0, gt=0)


class JobConfig(_Section):
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    model: ModelConfig = ModelConfig()
    audio: AudioConfig = AudioConfig()
    decode: DecodeConfig = DecodeConfig()
    inference: InferenceConfig = InferenceConfig()
    decoding: DecodingConfig = DecodingConfig()
    ray: RayConfig = RayConfig()


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check the spelling; the README's Configs section lists every key)")
        elif not key or msg.startswith(key):
            lines.append(msg)
        else:
            lines.append(f"{key} = {e['input']!r}: {msg}")
    return "invalid config: " + "; ".join(lines)


def _set_key(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; the value is read as YAML (``2`` is an int, ``null`` is None), except a
    bundled ``@name``, which YAML cannot start a plain value with."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. inference.max_replicas=2")
    if raw.strip().startswith(bundled.PREFIX):
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> JobConfig:
    """Load YAML ``path``, apply ``--set`` ``overrides`` then dotted ``values``; validate once."""
    tree: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides or []:
        _set_key(tree, *parse_override(item))
    for key, value in values.items():
        if value is not None:
            _set_key(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def resolve_resources(cfg: JobConfig, node_cpus: float, gpus: float) -> JobConfig:
    """``cfg`` with every auto inference setting sized for a cluster whose largest node has
    ``node_cpus`` CPUs and which has ``gpus`` GPUs in all (what Ray reports when the job starts):
    one replica per GPU, one GPU each, where there are GPUs; else one CPU replica whose torch
    threads use the node's cores. Raises :class:`ConfigError` for settings that cannot hold there."""
    inf = cfg.inference
    gpus_per = inf.gpus_per_replica
    if gpus_per is None:
        gpus_per = 1.0 if inf.device == "cuda" or (gpus >= 1 and inf.device != "cpu") else 0.0
    # Ray does not hide GPUs from a replica it gives none, so one without a GPU is told to use the CPU.
    device = "cpu" if gpus_per == 0 and inf.device == "auto" else inf.device
    fitting = max(1, int(gpus // gpus_per)) if gpus_per else 1
    min_replicas = inf.min_replicas or min(fitting, inf.max_replicas or fitting)
    max_replicas = inf.max_replicas or max(min_replicas, fitting)
    cpus = inf.cpus_per_replica or 1.0
    threads = inf.torch_threads or (max(1, int(cpus)) if gpus_per else max(1, int(node_cpus) // max_replicas))
    sized = {"min_replicas": min_replicas, "max_replicas": max_replicas, "cpus_per_replica": cpus,
             "gpus_per_replica": gpus_per, "torch_threads": threads, "device": device}
    try:
        return cfg.model_copy(update={"inference": InferenceConfig.model_validate({**inf.model_dump(), **sized})})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, prefix="inference")) from None
