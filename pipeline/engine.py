"""The one module that knows Ray: maps the pure steps onto Ray Data and runs the job.

    manifest (driver) → DecodeStage (CPU tasks) → TranscribeStage (actor pool) → ShardWriter (tasks)

Every ``map_batches`` argument lives here, so Ray API churn touches this file alone. The output
protocol (what is written, committed and resumed) is :mod:`pipeline.output`'s.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.util.annotations import RayDeprecationWarning

import pipeline
from pipeline import bundled, output, report, storage
from pipeline import schema as S
from pipeline.config import DEFAULT_DECODER, JobConfig, resolve_resources
from pipeline.decode import DecodeStage
from pipeline.errors import ConfigError, JobError, ManifestError
from pipeline.isolation import import_function
from pipeline.lm import LanguageModel, LMDecodeStage
from pipeline.manifest import read_manifest
from pipeline.memory import CPU_REPLICA_ENV, environ
from pipeline.model.spec import (
    FrontEnd,
    ModelSpec,
    TranscriberLoader,
    check_available,
    ctc_labels,
    has_language_model,
    load_front_end,
)
from pipeline.output import ShardWriter, State
from pipeline.transcribe import (
    CallSpan,
    ReplicaStart,
    Transcriber,
    TranscribeStage,
    decode_shortfall,
    replica_timing,
)
from pipeline.windows import Windowing

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything settled on the driver before Ray does any work (the config's auto settings are
    sized once Ray has started: :func:`sized_config`)."""

    cfg: JobConfig
    manifest: pa.Table
    front_end: FrontEnd
    spec: ModelSpec
    output: str  # an absolute local folder or a URI
    fingerprint: str  # of the input rows and the settings that change transcripts
    settings_fingerprint: str  # of those settings alone: an output of the same ones may take new rows
    state: State
    windowing: Windowing  # how long recordings are cut, in the model's samples
    lm: LanguageModel | None  # the n-gram LM decoding step's; None: greedy decoding in the replicas
    load: Callable[[], Transcriber] | None = None  # builds each replica's transcriber; None: the configured model

    def decode_stage(self, tally: Any = None) -> DecodeStage:
        """The job's decode stage: the model's rate and normalisation, the config's limits and
        isolation; with ``tally`` (a :class:`Tally`), one that adds its tasks' audio and time to it."""
        args = (self.front_end, self.cfg.input, self.cfg.audio, self.cfg.decode, self.windowing.length)
        return DecodeStage(*args) if tally is None else CountedDecodeStage(tally, self.cfg.decode.cpus_per_task, *args)

    def transcribe_stage_kwargs(self) -> dict[str, Any]:
        """The job's ``TranscribeStage`` arguments, for each replica to construct it with."""
        return {
            "load": self.load or TranscriberLoader(self.spec, self.cfg.inference, self.cfg.inference.torch_threads),
            "inference": self.cfg.inference,
            "model_name": self.spec.name,
            "metadata": metadata(self),
            "windowing": self.windowing,
            "words": self.cfg.output.words,
            "lm": self.lm is not None,
            "log_level": logging.getLogger("pipeline").getEffectiveLevel(),
        }


def plan(cfg: JobConfig, load: Callable[[], Transcriber] | None = None) -> Plan:
    """Read the manifest and the model's front end, settle the output's state; raise before any work.
    ``load``: another transcriber for the replicas (see :func:`run_job`)."""
    if not cfg.output.path:
        raise JobError("output.path is not set: pass --output OUT_DIR")
    out = output.location(cfg.output.path)  # absolute: the writers do not share this process's working directory
    output.check_folder(out)
    try:
        import_function(cfg.decode.function)
    except (ImportError, AttributeError) as exc:
        raise JobError(f"decode.function = {cfg.decode.function!r}: cannot import it ({exc}); name a "
                       "module:function importable on every worker, e.g. pipeline.audio:decode") from None
    try:
        manifest = read_manifest(cfg.input)
    except ManifestError as exc:
        raise JobError(str(exc)) from None
    spec = ModelSpec(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code,
                     cfg.model.allow_pickle_weights).located()
    try:
        spec.check_local_weights()
        check_available(spec)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    try:
        front_end = load_front_end(spec)
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all mean "cannot load"
        raise JobError(f"model.name = {spec.name!r}: cannot load its feature extractor ({exc})") from None
    windowing = _windowing(cfg, front_end)
    lm = language_model(cfg, spec)
    # What changes transcripts or the shards' columns: the model, the audio limits, the windows, the
    # precision, the words column and another decoder than the default.
    settings = {"model": cfg.model.model_dump(), "audio": cfg.audio.model_dump(), "precision": cfg.inference.precision,
                "windows": [windowing.length, windowing.left, windowing.right], "words": cfg.output.words,
                "decoding": "greedy" if lm is None else dataclasses.asdict(lm)}
    if cfg.decode.function != DEFAULT_DECODER:
        settings["decoder"] = cfg.decode.function
    if load is not None:
        settings["transcriber"] = repr(load)
    fingerprint, same_settings = output.fingerprint(manifest, settings), output.settings_fingerprint(settings)
    state = output.prepare(out, cfg.output.overwrite, fingerprint, same_settings, cfg.output.retry_errors)
    return Plan(cfg, manifest, front_end, spec, out, fingerprint, same_settings, state, windowing, lm, load)


def language_model(cfg: JobConfig, spec: ModelSpec) -> LanguageModel | None:
    """The LM decoding step's settings (``decoding``), checked; None for greedy decoding."""
    d = cfg.decoding
    if d.lm == "none" or (d.lm == "auto" and not has_language_model(spec)):
        return None
    if d.lm == "auto" and not LanguageModel.installed():
        log.warning("%s ships an n-gram LM, but pyctcdecode or kenlm is not installed: decoding greedily "
                    "(pip install '.[lm]' && pip install --no-deps pyctcdecode==0.5.0 to use it)", spec.name)
        return None
    try:
        labels = tuple(ctc_labels(spec))
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all mean "cannot load"
        raise JobError(f"model.name = {spec.name!r}: cannot load its tokenizer for the LM ({exc})") from None
    where = {"checkpoint": spec.source, "revision": spec.revision} if d.lm == "auto" else {
        "file": d.lm if d.lm.startswith(bundled.PREFIX) else storage.absolute(d.lm)}
    unigrams = None if d.unigrams is None else storage.absolute(d.unigrams)
    lm = LanguageModel(labels, **where, alpha=d.alpha, beta=d.beta, beam_width=d.beam_width, unigrams=unigrams,
                       hotwords=tuple(d.hotwords), hotword_weight=d.hotword_weight)
    lm.check()
    return lm


def _windowing(cfg: JobConfig, front_end: FrontEnd) -> Windowing:
    """The config's windows in the model's samples; raise :class:`ConfigError` where the model's
    frames leave them unusable."""
    inf, rate = cfg.inference, front_end.sampling_rate
    w = Windowing.of(inf.window_s, inf.strides, rate, front_end.hop, front_end.do_normalize)
    if w.length < front_end.min_samples:
        raise ConfigError(f"inference.window_s = {inf.window_s:g}: shorter than the model's receptive field "
                          f"({front_end.min_samples / rate:.3f} s); make it at least a few seconds")
    if w.left < front_end.min_samples:  # else a recording's last window can be a few samples, too few for a frame
        raise ConfigError(f"inference.window_stride_s = {inf.window_stride_s}: the left stride must be at least the "
                          f"model's receptive field ({front_end.min_samples / rate:.3f} s), rounded to its frames")
    if w.step <= 0:
        raise ConfigError(f"inference.window_stride_s = {inf.window_stride_s}: rounded to the model's frames "
                          f"({front_end.hop / rate:g} s), the strides leave no centre in inference.window_s = "
                          f"{inf.window_s:g}; shorten them")
    return w


def metadata(p: Plan) -> dict[str, Any]:
    """What the Parquet files and the summary record about how they were made (the precision as
    configured; each replica records the one it runs in its shards, and the summary reads them)."""
    return {
        "model": p.spec.name,
        "model_revision": p.spec.revision,
        "precision": p.cfg.inference.precision,
        "conv_encoder": p.cfg.inference.conv_encoder,  # as configured: auto resolves per replica (its log says how)
        "corpus_transcribe": pipeline.__version__,
        # The driver's, from package metadata: it imports neither.
        "transformers": importlib.metadata.version("transformers"),
        "torch": importlib.metadata.version("torch"),
        "ray": ray.__version__,
    }


def cluster_address(cfg: JobConfig) -> str | None:
    """The Ray cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it for
    the job's entrypoint); None: start Ray in this process."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(cfg: JobConfig) -> Iterator[bool]:
    """Join the :func:`cluster_address`, use the Ray this process already runs, or start Ray
    in-process (and shut it down after); yield whether every Ray worker starts with ``CPU_REPLICA_ENV``."""
    if ray.is_initialized():
        yield False
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    # Bars off is the job's default (it logs its own progress line): Ray Data need not warn of it.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if logging.getLogger("pipeline").getEffectiveLevel() > logging.INFO:  # --quiet: Ray's own lines too
        kwargs["logging_level"] = logging.WARNING
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read where Ray Data configures its logging
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address := cluster_address(cfg):
        try:
            # Ship this package to the cluster's workers, which may not have it installed.
            ray.init(address=address, runtime_env={"py_modules": [str(Path(pipeline.__file__).parent)]},
                     **kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise JobError(_join_failure(address, exc)) from None
        workers_have_env = False
    else:
        # The raylet inherits it, so every worker does (a runtime_env would cost each replica a
        # slower start); this process keeps its own.
        with environ(CPU_REPLICA_ENV):
            # "local": a new instance even where `ray start` left one on this machine (Ray would join it).
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, **kwargs)
        workers_have_env = True
    try:
        yield workers_have_env
    finally:
        ray.shutdown()


def sized_config(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its auto settings sized from what Ray reports now (:func:`resolve_resources`);
    raises :class:`ConfigError` for settings that cannot hold on this cluster."""
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
    sized = resolve_resources(cfg, node_cpus, ray.cluster_resources().get("GPU", 0.0))
    inf = sized.inference
    log.info("%d-%d replicas, each %g CPUs, %g GPUs and %d torch threads", inf.min_replicas, inf.max_replicas,
             inf.cpus_per_replica, inf.gpus_per_replica, inf.torch_threads)
    return sized


def check_resources(cfg: JobConfig) -> None:
    """Fail fast where the pool cannot start beside one decode task: Ray Data would wait forever.
    Joining a cluster only warns, since its autoscaler may still add nodes."""
    inf, have = cfg.inference, ray.cluster_resources()
    for resource, per_replica, extra, key in [
        ("CPU", inf.cpus_per_replica, cfg.decode.cpus_per_task, "inference.cpus_per_replica"),
        ("GPU", inf.gpus_per_replica, 0.0, "inference.gpus_per_replica"),
    ]:
        need = inf.min_replicas * per_replica + extra
        if need > have.get(resource, 0.0) + 1e-9:
            message = (
                f"inference.min_replicas = {inf.min_replicas}: {inf.min_replicas} replicas x {per_replica:g} "
                f"{resource}s ({key}) plus one decode task need {need:g} {resource}s, the cluster has "
                f"{have.get(resource, 0.0):g}; lower inference.min_replicas or {key}"
            )
            if cluster_address(cfg):
                log.warning("%s (waiting for the cluster to grow)", message)
            else:
                raise JobError(message)


@contextmanager
def _retries_through_remote_args() -> Iterator[None]:
    # Ray 2.60 deprecates map_batches(**ray_remote_args), removed in 2.64 (pyproject.toml caps ray
    # below it), but names no parameter for what the job passes through it: the retries.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        yield


def decode_dataset(p: Plan, manifest: pa.Table, tally: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """Manifest rows → decode tasks, as a lazy Dataset of decoded rows (the job's first step);
    ``tally``: a :class:`Tally` the tasks add their audio and time to."""
    rows = p.cfg.decode.rows_per_task
    # from_blocks, not from_arrow: one block per decode task, its metadata read here (from_arrow runs
    # a Ray task per block for it, taking the workers Ray prestarted for the replicas).
    ds = ray.data.from_blocks([manifest.slice(i, rows) for i in range(0, manifest.num_rows, rows)])
    with _retries_through_remote_args():
        return ds.map_batches(
            p.decode_stage(tally),
            batch_format="pyarrow",
            batch_size=rows,
            num_cpus=p.cfg.decode.cpus_per_task,
            max_retries=p.cfg.decode.max_retries,
            udf_modifying_row_count=False,
        )


def build_dataset(p: Plan, manifest: pa.Table, workers_have_env: bool = False,
                  tally: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """Manifest rows → decode tasks → inference actor pool (→ LM tasks) → shard writers, as one lazy
    Dataset whose rows name the shards written. ``workers_have_env``: Ray's workers already start with
    ``CPU_REPLICA_ENV``, else CPU replicas are given it. ``tally``: a :class:`Tally` the decode tasks
    and the replicas report to."""
    cfg, inf = p.cfg, p.cfg.inference
    ds = decode_dataset(p, manifest, tally)
    with _retries_through_remote_args():
        ds = ds.map_batches(
            TranscribeStage if tally is None else CountedTranscribeStage,
            fn_constructor_kwargs=p.transcribe_stage_kwargs() | ({} if tally is None else {"tally": tally}),
            compute=ray.data.ActorPoolStrategy(min_size=inf.min_replicas, max_size=inf.max_replicas),
            batch_format="pyarrow",
            batch_size=inf.rows_per_call,
            num_cpus=inf.cpus_per_replica,
            num_gpus=inf.gpus_per_replica,
            max_restarts=inf.max_restarts,
            max_task_retries=inf.max_restarts,
            runtime_env=None if workers_have_env or inf.gpus_per_replica else {"env_vars": CPU_REPLICA_ENV},
            udf_modifying_row_count=False,
        )
        if p.lm is not None:
            ds = ds.map_batches(
                LMDecodeStage(p.lm, p.windowing),
                batch_format="pyarrow",
                batch_size=cfg.decoding.rows_per_task,
                num_cpus=cfg.decoding.cpus_per_task,
                max_retries=cfg.decode.max_retries,
                udf_modifying_row_count=False,
            )
        # No CPU for the writer: it is light, and with one it waited behind decode tasks holding every
        # CPU the replicas left, so a file hanging its decoder held back all committed output.
        return ds.map_batches(
            ShardWriter(p.output),
            batch_format="pyarrow",
            batch_size=cfg.output.rows_per_shard,
            num_cpus=0,
            max_retries=cfg.output.max_retries,
        )


@ray.remote(num_cpus=0)
class Tally:
    """Rows and audio seconds transcribed so far (the progress line's source), each replica's call
    spans, and the decode tasks' audio and CPU time (the summary's ``replicas``:
    :func:`pipeline.transcribe.replica_timing`)."""

    def __init__(self):
        self.rows, self.audio_s = 0, 0.0
        self.spans: dict[str, list[CallSpan]] = {}
        self.starts: dict[str, ReplicaStart] = {}
        self.decoded_audio_s = self.decode_cpu_s = 0.0

    def decoded(self, audio_s: float, cpu_s: float) -> None:
        self.decoded_audio_s += audio_s
        self.decode_cpu_s += cpu_s

    def started(self, replica: str, start: ReplicaStart) -> None:
        self.starts[replica] = start

    def add(self, rows: int, audio_s: float, replica: str = "", span: CallSpan | None = None) -> None:
        self.rows += rows
        self.audio_s += audio_s
        if span is not None:
            self.spans.setdefault(replica, []).append(span)

    def totals(self) -> tuple[int, float]:
        return self.rows, self.audio_s

    def timing(self, since: float) -> dict[str, Any]:
        return replica_timing(self.spans, since, self.starts, (self.decoded_audio_s, self.decode_cpu_s))


def _tell(tally_call: Callable[[], Any], lost: str) -> None:
    """Make one :class:`Tally` call and wait for it (~1 ms), so the driver's last read of the tally
    sees it; a tally that is unreachable costs the run its ``lost`` figures, never a row."""
    try:
        ray.get(tally_call())
    except Exception as exc:  # noqa: BLE001 - progress and timings must never fail rows
        log.warning("the progress tally is unreachable (%s): %s will be incomplete", exc, lost)


class CountedDecodeStage(DecodeStage):
    """The job's decode stage, adding each call's decoded audio and the CPU seconds it held (the
    call's time times ``cpus``, ``decode.cpus_per_task``) to a :class:`Tally`: decode's measured
    speed per CPU. The call's time leaves out the task's start and its block's transfers, so the
    speed is an upper bound and the CPUs a replica needs a lower one."""

    def __init__(self, tally: Any, cpus: float, *args: Any):
        super().__init__(*args)
        self.tally, self.cpus = tally, cpus

    def __call__(self, table: pa.Table) -> pa.Table:
        clock = time.perf_counter()
        out = super().__call__(table)
        seconds = time.perf_counter() - clock
        audio_s = pc.sum(pc.if_else(pc.is_null(out[S.ERROR_KIND]), out[S.DURATION_S], 0.0)).as_py() or 0.0
        _tell(lambda: self.tally.decoded.remote(float(audio_s), seconds * self.cpus), "decode timings")
        return out


class CountedTranscribeStage(TranscribeStage):
    """The replica's stage, adding each call's rows and audio to a :class:`Tally` (in the replica:
    a separate counting step would cost the job more worker processes and seconds)."""

    def __init__(self, tally: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.tally = tally
        self.name = f"{platform.node()}:{os.getpid()}"
        tally.started.remote(self.name, self.start)

    def __call__(self, table: pa.Table) -> pa.Table:
        out = super().__call__(table)
        _tell(lambda: self.tally.add.remote(table.num_rows, float(pc.sum(table[S.DURATION_S]).as_py() or 0.0),
                                            self.name, self.last_span), "progress and timings")
        return out


@contextmanager
def progress_line(rows: int, every_s: float) -> Iterator[Any]:
    """A :class:`Tally`, and a thread that logs one progress line from it every ``every_s`` seconds
    (rows done, audio, speed, ETA) until the block ends; nothing when INFO is not logged (--quiet)."""
    tally = Tally.remote()
    if not log.isEnabledFor(logging.INFO):
        yield tally
        return
    done, started = threading.Event(), time.perf_counter()

    def report() -> None:
        while not done.wait(every_s):
            n, audio_s = ray.get(tally.totals.remote())
            n = min(n, rows)  # rows a restarted replica redid count twice
            elapsed = time.perf_counter() - started
            eta = f"{(rows - n) * elapsed / n / 60:.1f} min" if n else "unknown"
            log.info("progress: %s of %s rows (%.0f%%), %.2f h of audio, %.0f audio s/s, ETA %s",
                     f"{n:,}", f"{rows:,}", 100 * n / rows, audio_s / 3600, audio_s / elapsed, eta)

    thread = threading.Thread(target=report, name="progress", daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        done.set()
        thread.join(timeout=every_s + 5)


def run_job(cfg: JobConfig, load: Callable[[], Transcriber] | None = None,
            started_at: float | None = None) -> dict[str, Any]:
    """Run the whole job; return the summary also written to ``OUT_DIR/_summary.json``. ``load``
    (picklable) builds each replica's transcriber instead of the configured model, e.g. a stand-in.
    ``started_at``: when the command started (wall-clock), where that was before this call (the
    command line's process start): the summary's times count from it, the first phase ``setup``.

    Resumable and exactly-once (:mod:`pipeline.output`): the same command after a crash transcribes
    only the rows no shard holds; after a finished run it does nothing. (Ray Data's
    ``CheckpointConfig`` is not used: on Ray 2.60 its resume adds filter actors that reserve a CPU
    each, which deadlocks a small node, and it needs a file reader as the source.)
    """
    started, started_wall = time.perf_counter(), time.time()
    setup_s = max(0.0, started_wall - started_at) if started_at is not None else None
    if setup_s is not None:  # count from the command's start
        started, started_wall = started - setup_s, started_wall - setup_s
    p = plan(cfg, load)
    if p.state is State.DONE:
        summary = output.finished_summary(p.output)
        log.warning("%s already holds the finished result of this job (%d rows); nothing to do",
                    p.output, summary["rows_out"])
        output.check_errors(p.output, summary, cfg.output.max_error_fraction)
        return {**summary, "already_complete": True}
    # where the job's time goes, phase by phase
    marks = [("setup", started + setup_s)] if setup_s is not None else []
    marks.append(("plan", time.perf_counter()))
    with ray_session(cfg) as workers_have_env:
        p.cfg = cfg = sized_config(cfg)
        check_resources(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        hardware = cluster_hardware()
        # Only now, with the settings known to hold: a run refused here leaves no _work behind.
        todo = output.begin(p.output, p.state, p.fingerprint, p.manifest, p.settings_fingerprint,
                            cfg.output.retry_errors)
        if p.state is State.RESUME:
            log.info("resuming an unfinished run: %d of %d rows are already in %s",
                     p.manifest.num_rows - todo.num_rows, p.manifest.num_rows, p.output)
        elif p.state is State.UPDATE:
            log.info("updating the finished run in %s: %d rows to transcribe (new rows%s)", p.output,
                     todo.num_rows, ", and error rows again" if cfg.output.retry_errors else "")
        log.info("%d rows from %s; model %s", todo.num_rows, cfg.input.path, p.spec.name)
        marks.append(("ray_start", time.perf_counter()))
        replicas: dict[str, Any] = {}
        if todo.num_rows:
            try:
                with progress_line(todo.num_rows, cfg.ray.progress_every_s) as tally:
                    for _ in build_dataset(p, todo, workers_have_env, tally).iter_batches(batch_size=None):
                        pass
                    try:
                        replicas = ray.get(tally.timing.remote(started_wall))
                        # An upper bound on decode's CPUs: LM tasks and other jobs may have taken some.
                        beside = hardware["cpus"] - replicas.get("replicas", 0) * cfg.inference.cpus_per_replica
                        if advice := decode_shortfall(replicas, beside):
                            log.warning("%s", advice)
                    except Exception as exc:  # noqa: BLE001 - every shard is written: timings must not fail it
                        log.warning("the replicas' timings were not collected (%s)", exc)
            except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in many types
                raise JobError(f"the job failed: {_root_cause(exc)}") from exc
        marks.append(("run", time.perf_counter()))
    marks.append(("ray_stop", time.perf_counter()))
    output.finish(p.output)
    # metadata first: the shards' precision as run replaces the one configured.
    summary = {**metadata(p), **output.summarize(p.output, p.manifest, time.perf_counter() - started),
               "resumed": p.state is State.RESUME, "updated": p.state is State.UPDATE,
               "fingerprint": p.fingerprint, "settings_fingerprint": p.settings_fingerprint,
               "config": cfg.model_dump(), "hardware": hardware, "replicas": replicas,
               "phases_s": {name: round(end - start, 3) for (_, start), (name, end) in
                            zip([(None, started), *marks], marks, strict=False)}}
    shards = output.commit(p.output, summary)
    log.info("committed %d shards to %s", len(shards), storage.join(p.output, output.MANIFEST_FILE))
    if cfg.output.report:
        try:
            log.info("report: %s", report.write(p.output))
        except Exception as exc:  # noqa: BLE001 - the run is committed; a report that fails must not undo that
            log.warning("the report was not written (%s: %s); `transcribe report %s` tries again",
                        type(exc).__name__, exc, p.output)
    output.check_errors(p.output, summary, cfg.output.max_error_fraction)
    return summary


def cluster_hardware() -> dict[str, Any]:
    """What Ray reports of the cluster the job runs on: nodes, CPUs, GPUs and their kind, memory."""
    resources = ray.cluster_resources()
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0), "accelerators": ", ".join(kinds) or "none",
            "memory_gib": round(resources.get("memory", 0) / 2**30, 1), "driver": platform.platform()}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (Python's chain and Ray's ``cause``)."""
    found: list[BaseException] = []
    while exc is not None and all(exc is not e for e in found):
        found.append(exc)
        exc = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__
        exc = exc if isinstance(exc, BaseException) else None
    return found


def _join_failure(address: str, exc: BaseException) -> str:
    """One line for a cluster this process could not join, saying what to do."""
    text = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    if "AuthenticationError" in text or "InvalidAuthToken" in text or "authentication token" in text.lower():
        return (f"ray.address = {address}: the cluster uses Ray's token authentication and refused this "
                f"process (RAY_AUTH_MODE = {os.environ.get('RAY_AUTH_MODE', 'unset')}); set RAY_AUTH_MODE=token "
                "and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on "
                "the head prints it), or use --address auto on one of the cluster's nodes")
    return f"ray.address = {address}: cannot join the Ray cluster there ({_root_cause(exc)})"


# "SomeError: message" lines in the text of Ray's errors, which carry a worker's traceback as text.
_ERROR_LINE = re.compile(r"^\s*(?:\x1b\[\d+m)?((?:\w+\.)*\w*(?:Error|Exception|Exit|Interrupt)): (.+)$", re.M)
_WRAPPERS = ("RayTaskError", "ActorDiedError", "SystemException", "UserCodeException", "RayActorError")


def _root_cause(exc: BaseException) -> str:
    """The first error a worker raised, as ``Type: message``, from Ray's wrapped errors: the
    innermost non-Ray exception, else the last such line in their text."""
    chain = _chain(exc)
    for e in reversed(chain):
        if not type(e).__module__.startswith("ray") and str(e).strip():
            return f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    for e in reversed(chain):
        lines = [m for m in _ERROR_LINE.findall(str(e)) if not m[0].split(".")[-1].startswith(_WRAPPERS)]
        if lines:
            name, message = lines[-1]
            return f"{name.split('.')[-1]}: {message.strip()}"
    last = chain[-1]
    return f"{type(last).__name__}: {(str(last).strip().splitlines() or [''])[-1]}"
