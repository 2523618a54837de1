"""The one module that knows Ray: maps the pure stages onto Ray Data and runs the job.

Every ``map_batches`` argument lives here, so Ray API churn touches this file alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.util.annotations import RayDeprecationWarning

import pipeline
from pipeline import schema as S
from pipeline.config import JobConfig
from pipeline.manifest import ManifestError, read_manifest
from pipeline.checkpoint import CPU_REPLICA_ENV, FrontEnd, ModelSpec, load_front_end
from pipeline.stages import SHARD_PREFIX, DecodeStage, ShardWriter, TranscribeStage, commit_file

log = logging.getLogger(__name__)

SUMMARY_FILE = "_summary.json"
MANIFEST_FILE = "_manifest.json"  # the shards of a finished run: what readers should read
WORK_DIR = "_work"  # present while a run is unfinished; holds the fingerprint it must match


class JobError(RuntimeError):
    """A systemic failure: the job cannot run or its output breaks an invariant."""


@dataclass
class Plan:
    """Everything settled on the driver before Ray does any work."""

    cfg: JobConfig
    manifest: pa.Table
    front_end: FrontEnd
    spec: ModelSpec
    output: Path
    fingerprint: str  # of the input rows and the settings that change transcripts
    state: str  # "fresh", "resume" (an unfinished run of the same job) or "done" (a finished one)


def plan(cfg: JobConfig) -> Plan:
    """Read the manifest and the model's front end, settle the output's state; raise before any work."""
    if not cfg.output.path:
        raise JobError("output.path is not set: pass --output OUT_DIR")
    output = Path(cfg.output.path)
    if output.exists() and not output.is_dir():
        raise JobError(f"--output {output}: exists and is not a folder")
    try:
        manifest = read_manifest(cfg.input)
    except ManifestError as exc:
        raise JobError(str(exc)) from None
    spec = ModelSpec(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code,
                     cfg.model.allow_pickle_weights)
    try:
        spec.check_local_weights()
    except ValueError as exc:
        raise JobError(str(exc)) from None
    try:
        front_end = load_front_end(spec)
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all mean "cannot load"
        raise JobError(f"model.name = {spec.name!r}: cannot load its feature extractor ({exc})") from None
    fingerprint = _fingerprint(cfg, manifest)
    state = _prepare_output(output, cfg.output.overwrite, fingerprint)
    return Plan(cfg, manifest, front_end, spec, output, fingerprint, state)


def _fingerprint(cfg: JobConfig, manifest: pa.Table) -> str:
    """Same rows, model and decoding settings → same fingerprint: what resuming may rely on."""
    h = hashlib.sha256()
    for column in (S.ID, S.PATH):
        for value in manifest[column].to_pylist():
            h.update(value.encode() + b"\0")
    settings = {"model": cfg.model.model_dump(), "audio": cfg.audio.model_dump(),
                "precision": cfg.inference.precision, "rows": manifest.num_rows}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _prepare_output(output: Path, overwrite: bool, fingerprint: str) -> str:
    """Return the output's state; clear it first with ``overwrite``; refuse another job's output."""
    work, summary_file = output / WORK_DIR, output / SUMMARY_FILE
    ours = [*output.glob("*.parquet"), *output.glob(f".{SHARD_PREFIX}*.tmp"), summary_file,
            output / MANIFEST_FILE] if output.is_dir() else []
    ours = [p for p in ours if p.exists()]
    if overwrite:
        for p in ours:
            p.unlink()
        shutil.rmtree(work, ignore_errors=True)
        ours = []
    state = "fresh"
    if (output / MANIFEST_FILE).exists() and summary_file.exists():
        state, found = "done", json.loads(summary_file.read_text()).get("fingerprint")
    elif work.is_dir():
        state, found = "resume", json.loads((work / "input.json").read_text()).get("fingerprint")
    elif ours:
        raise JobError(
            f"--output {output}: already holds files of another run ({ours[0].name}); choose another "
            "folder or --set output.overwrite=true to replace them"
        )
    if state != "fresh" and found != fingerprint:
        what = "a finished" if state == "done" else "an unfinished"
        raise JobError(
            f"--output {output}: holds {what} run of another input, model or audio settings; choose "
            "another folder or --set output.overwrite=true to replace it"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / "_write_check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise JobError(f"--output {output}: not writable ({exc.strerror})") from None
    return state


def metadata(p: Plan) -> dict[str, Any]:
    """What the Parquet files and the summary record about how they were made."""
    return {
        "model": p.spec.name,
        "model_revision": p.spec.revision,
        "precision": p.cfg.inference.precision,
        "conv_encoder": p.cfg.inference.conv_encoder,  # as configured: auto resolves per replica (its log says how)
        "corpus_transcribe": pipeline.__version__,
        # The driver's (from package metadata: it imports neither; see pipeline.checkpoint).
        "transformers": importlib.metadata.version("transformers"),
        "torch": importlib.metadata.version("torch"),
        "ray": ray.__version__,
    }


def _init_ray(cfg: JobConfig) -> bool:
    """Join ``ray.address`` or start Ray in-process; return whether this call started it.

    Ray started here hands ``CPU_REPLICA_ENV`` to all its processes through the raylet's
    environment (decode workers and Ray's own keep their freed memory too: small heaps here);
    elsewhere only the CPU replicas get it, as their runtime environment, which costs each job
    ~1.6 s more to start them (measured on the 2-core CPU).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.ray.address:
        # Ship this package to the cluster's workers, which may not have it installed.
        kwargs["runtime_env"] = {"py_modules": [str(Path(pipeline.__file__).parent)]}
        ray.init(address=cfg.ray.address, **kwargs)
        return True
    with mock.patch.dict(os.environ, CPU_REPLICA_ENV):  # the raylet inherits it; this process keeps its own
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    return True


def _check_resources(cfg: JobConfig) -> None:
    """Fail fast where the pool cannot start beside one decode task: Ray Data would wait forever.

    Joining a cluster only warns, since its autoscaler may still add nodes.
    """
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
            if cfg.ray.address:
                log.warning("%s (waiting for the cluster to grow)", message)
            else:
                raise JobError(message)


def decode_stage(p: Plan) -> DecodeStage:
    """The job's decode stage: the model's rate and normalisation, the config's limits and isolation."""
    cfg = p.cfg
    return DecodeStage(
        p.front_end.sampling_rate, p.front_end.do_normalize, cfg.audio.max_duration_s,
        max_file_bytes=cfg.audio.max_file_bytes, allowed_roots=tuple(cfg.input.allowed_roots),
        isolate=cfg.decode.isolate, timeout_s=cfg.decode.timeout_s, max_attempts=cfg.decode.max_attempts,
    )


def transcribe_stage_kwargs(p: Plan) -> dict[str, Any]:
    """The job's ``TranscribeStage`` arguments, for each replica to construct it with."""
    inf = p.cfg.inference
    return {
        "spec": p.spec,
        "max_batch_samples": inf.max_batch_samples,
        "max_padding_waste": inf.max_padding_waste,
        "device": inf.device,
        "threads": p.cfg.threads_per_replica,
        "precision": inf.precision,
        "conv_encoder": inf.conv_encoder,
        "metadata": metadata(p),
        "log_level": logging.getLogger("pipeline").getEffectiveLevel(),
    }


def build_dataset(p: Plan, manifest: pa.Table, workers_have_env: bool = False) -> ray.data.Dataset:
    """Manifest rows → decode tasks → inference actor pool → shard writers, as one lazy Dataset
    whose rows name the shards written. ``workers_have_env``: Ray's workers already start with
    ``CPU_REPLICA_ENV`` (Ray started in this process), else CPU replicas are given it."""
    cfg = p.cfg
    rows = cfg.decode.rows_per_task
    blocks = [manifest.slice(i, rows) for i in range(0, manifest.num_rows, rows)]
    # from_blocks, not from_arrow: it keeps one block per decode task, and reads the blocks'
    # metadata here; from_arrow runs a Ray task per block for it, which took Ray's prestarted
    # workers, so the replica waited for a new process (first batch 4-6 s later on 2 CPUs).
    ds = ray.data.from_blocks(blocks)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates map_batches(**ray_remote_args), removed in 2.64 (pyproject.toml caps ray
        # below it), but names no parameter for what the job passes through it: the retries below.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        ds = ds.map_batches(
            decode_stage(p),
            batch_format="pyarrow",
            batch_size=rows,
            num_cpus=cfg.decode.cpus_per_task,
            max_retries=cfg.decode.max_retries,
            udf_modifying_row_count=False,
        )
        inf = cfg.inference
        ds = ds.map_batches(
            TranscribeStage,
            fn_constructor_kwargs=transcribe_stage_kwargs(p),
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
        # The writer asks for no CPU: it is light, and with one it waited behind decode tasks that
        # held every CPU the replicas left (a file hanging its decoder held back all committed output).
        return ds.map_batches(
            ShardWriter(str(p.output)),
            batch_format="pyarrow",
            batch_size=cfg.output.rows_per_shard,
            num_cpus=0,
            max_retries=cfg.output.max_retries,
        )


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the whole job; return the summary also written to ``OUT_DIR/_summary.json``.

    Resumable: every shard is committed alone by rename, so a run that dies leaves whole shards
    and ``OUT_DIR/_work``; the same command again transcribes only the rows no shard holds. A
    finished run is left as it is. (Ray Data's ``CheckpointConfig`` is not used: on Ray 2.60 its
    resume adds a pool of filter actors that reserve a CPU each, which deadlocked a 2-CPU node
    whose CPUs the replicas and decode tasks already take; it also needs a file reader as the
    source, so the manifest, HF audio bytes included, would be copied to disk first.)
    """
    started = time.perf_counter()
    p = plan(cfg)
    if p.state == "done":
        summary = json.loads((p.output / SUMMARY_FILE).read_text())
        log.warning("%s already holds the finished result of this job (%d rows); nothing to do",
                    p.output, summary["rows_out"])
        return {**summary, "already_complete": True}
    work = p.output / WORK_DIR
    todo = p.manifest
    if p.state == "fresh":
        # Made whole, then renamed: a _work folder always holds its fingerprint.
        staging = p.output / f".{WORK_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _write_atomic(staging / "input.json", {"fingerprint": p.fingerprint})
        os.replace(staging, work)
    else:
        for orphan in p.output.glob(f".{SHARD_PREFIX}*.tmp"):  # a shard whose write was cut off
            orphan.unlink()
        done = read_output(p.output, [S.ID])[S.ID].combine_chunks()
        todo = p.manifest.filter(pc.invert(pc.is_in(p.manifest[S.ID], value_set=done)))
        log.info("resuming an unfinished run: %d of %d rows are already in %s", p.manifest.num_rows - todo.num_rows,
                 p.manifest.num_rows, p.output)
    log.info("%d rows from %s; model %s", todo.num_rows, cfg.input.path, p.spec.name)
    own_ray = _init_ray(cfg)
    try:
        _check_resources(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        if todo.num_rows:
            try:
                for _ in build_dataset(p, todo, own_ray and not cfg.ray.address).iter_batches(batch_size=None):
                    pass
            except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in many types
                raise JobError(f"the job failed: {_root_cause(exc)}") from exc
    finally:
        if own_ray:
            ray.shutdown()
    summary = summarize(p, time.perf_counter() - started)
    summary["resumed"] = p.state == "resume"
    if summary["lost"] or summary["duplicated"]:
        # No _manifest.json: readers must not take this output for a result.
        _write_atomic(p.output / SUMMARY_FILE, summary)
        raise JobError(
            f"output breaks the one-row-per-input invariant: {summary['lost']} ids lost, "
            f"{summary['duplicated']} duplicated (see {p.output / SUMMARY_FILE})"
        )
    shards = _commit(p.output)
    _write_atomic(p.output / SUMMARY_FILE, summary)
    shutil.rmtree(work)
    log.info("committed %d shards to %s", len(shards), p.output / MANIFEST_FILE)
    return summary


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"


def _write_atomic(path: Path, value: Any) -> None:
    """Write JSON by rename (:func:`pipeline.stages.commit_file`)."""
    commit_file(str(path), lambda fh: fh.write((json.dumps(value, indent=2) + "\n").encode()))


def _commit(output: Path) -> list[str]:
    """Write ``_manifest.json``, last: every shard (each committed alone, by rename) with its rows.
    Its presence is what says the output is complete and checked."""
    shards = sorted(f.name for f in output.glob(f"{SHARD_PREFIX}*.parquet"))
    rows = {name: pq.ParquetFile(output / name).metadata.num_rows for name in shards}
    _write_atomic(output / MANIFEST_FILE, {
        "shards": [{"path": name, "rows": rows[name]} for name in shards],
        "rows": sum(rows.values()),
    })
    return shards


def read_output(output: Path | str, columns: list[str] | None = None) -> pa.Table:
    """The job's result as one table: the shards ``_manifest.json`` lists (while a run is
    unfinished, every shard so far), none of the ``_``-prefixed side files."""
    output = Path(output)
    if (output / MANIFEST_FILE).exists():
        listed = json.loads((output / MANIFEST_FILE).read_text())["shards"]
        files = [str(output / s["path"]) for s in listed]
    else:
        files = sorted(str(f) for f in output.glob(f"{SHARD_PREFIX}*.parquet"))
    if not files:
        return S.OUTPUT_SCHEMA.empty_table().select(columns or S.OUTPUT_SCHEMA.names)
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def summarize(p: Plan, wall_s: float) -> dict[str, Any]:
    """Counts and rates computed from the shards actually written, checked against the input."""
    out = read_output(p.output, [S.ID, S.ERROR_KIND, S.DURATION_S, S.NUM_SAMPLES, S.PADDED_SAMPLES])
    ids_in = p.manifest[S.ID]
    lost = int(pc.sum(pc.invert(pc.is_in(ids_in, value_set=out[S.ID].combine_chunks()))).as_py() or 0)
    duplicated = out.num_rows - len(pc.unique(out[S.ID]))
    kinds = pc.value_counts(out[S.ERROR_KIND].drop_null().combine_chunks()).to_pylist()
    ok = pc.is_null(out[S.ERROR_KIND])
    audio_s = float(pc.sum(out[S.DURATION_S]).as_py() or 0.0)
    real = int(pc.sum(pc.filter(out[S.NUM_SAMPLES], ok)).as_py() or 0)
    padded = int(pc.sum(pc.filter(out[S.PADDED_SAMPLES], ok)).as_py() or 0)
    return {
        "rows_in": p.manifest.num_rows,
        "rows_out": out.num_rows,
        "transcribed": int(pc.sum(ok).as_py() or 0),
        "errors": out.num_rows - int(pc.sum(ok).as_py() or 0),
        "errors_by_kind": {k["values"]: k["counts"] for k in kinds},
        "lost": lost,
        "duplicated": duplicated,
        "audio_hours": audio_s / 3600,
        "wall_s": wall_s,
        "audio_s_per_s": audio_s / wall_s if wall_s > 0 else math.nan,
        "padding_waste": (padded - real) / real if real else 0.0,
        "shards": len(list(p.output.glob(f"{SHARD_PREFIX}*.parquet"))),
        "fingerprint": p.fingerprint,
        **metadata(p),
        "config": p.cfg.model_dump(),
    }
