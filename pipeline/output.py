"""Step 3, write, and the output protocol: every input row ends in exactly one committed row.

The output folder (a local folder, or a prefix in an object store: :mod:`pipeline.storage`) of a
job holds:

- ``part-<digest>.parquet``: the shards. :class:`ShardWriter` writes each whole
  (:func:`pipeline.storage.write`: on disk by rename, in an object store as one upload), so a reader
  sees a whole shard or none; the name is a digest of the shard's ids, so a retried write replaces
  its own file instead of adding a second copy of its rows. (Ray Data's ``write_parquet`` writes in
  place.)
- ``_work/input.json`` while a run is unfinished: the job's :func:`fingerprint` (its input rows and
  the settings that change transcripts).
- ``_manifest.json``, written last, whole: the shards of a finished, checked run and their row
  counts; its presence says the output is complete. ``_summary.json`` beside it: the run's counts.

A run finds the folder in one of three :class:`State`\\ s (:func:`prepare`): ``fresh`` (empty or
new), ``resume`` (an unfinished run of the same fingerprint: only the rows no shard holds are
transcribed), ``done`` (a finished run of the same fingerprint: nothing to do). Another job's files
are refused unless ``output.overwrite`` clears them first. :func:`commit` checks that no id is lost
or duplicated before it writes ``_manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline import storage
from pipeline.errors import JobError

SHARD_PREFIX = "part-"  # output shards: part-<digest of their ids>.parquet
SUMMARY_FILE = "_summary.json"
MANIFEST_FILE = "_manifest.json"  # the shards of a finished run: what readers should read
WORK_DIR = "_work"  # present while a run is unfinished; holds the fingerprint it must match
FINGERPRINT_FILE = "input.json"


class State(Enum):
    """What the output folder holds for this job (:func:`prepare`)."""

    FRESH = "fresh"
    RESUME = "resume"
    DONE = "done"


def _read_json(location: str) -> Any:
    return json.loads(storage.read_bytes(location))


def _write_json(location: str, value: Any) -> None:
    storage.write_bytes(location, (json.dumps(value, indent=2) + "\n").encode())


class ShardWriter:
    """Output rows → one Parquet shard per call, written whole (:func:`pipeline.storage.write`)
    into the output folder or prefix; returns ``(shard, rows)``."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return pa.table({"shard": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        digest = hashlib.sha256("\0".join(sorted(table[S.ID].to_pylist())).encode()).hexdigest()[:32]
        name = f"{SHARD_PREFIX}{digest}.parquet"
        storage.write(storage.join(self.folder, name), lambda fh: pq.write_table(table, fh))
        return pa.table({"shard": [name], "rows": [table.num_rows]})


def fingerprint(manifest: pa.Table, settings: dict[str, Any]) -> str:
    """Same rows (ids and paths) and same ``settings`` → same fingerprint: what resuming relies on."""
    h = hashlib.sha256()
    for column in (S.ID, S.PATH):
        for value in manifest[column].to_pylist():
            h.update(value.encode() + b"\0")
    h.update(json.dumps({**settings, "rows": manifest.num_rows}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def location(output: str | os.PathLike) -> str:
    """The output folder as the job addresses it: a URI as given, a local path made absolute."""
    return storage.absolute(os.fspath(output))


def check_folder(output: str) -> None:
    """Raise :class:`JobError` where ``output`` cannot be an output folder (before any slow work)."""
    try:
        found = storage.info(output)
    except (OSError, ValueError) as exc:
        raise JobError(f"--output {output}: cannot reach it ({storage.reason(exc)})") from None
    if found.type == pafs.FileType.File:
        raise JobError(f"--output {output}: exists and is not a folder")


def _is_temporary(name: str) -> bool:
    return name.startswith(f".{SHARD_PREFIX}") and name.endswith(".tmp")  # a local shard whose write was cut off


def prepare(output: str, overwrite: bool, fingerprint: str) -> State:
    """Return the output's state for a job of ``fingerprint``; clear the folder first with
    ``overwrite``; raise :class:`JobError` for another job's output or a folder it cannot write."""
    check_folder(output)
    try:
        return _prepare(output, overwrite, fingerprint)
    except (OSError, ValueError) as exc:
        raise JobError(f"--output {output}: not writable ({storage.reason(exc)})") from None


def _prepare(output: str, overwrite: bool, fingerprint: str) -> State:
    found = {f.base_name for f in storage.children(output)}
    ours = sorted(n for n in found if n.endswith(".parquet") or _is_temporary(n) or n in (SUMMARY_FILE, MANIFEST_FILE))
    if overwrite:
        for name in ours:
            storage.delete(storage.join(output, name))
        storage.delete_folder(storage.join(output, WORK_DIR))
        found, ours = found - {*ours, WORK_DIR}, []
    state = State.FRESH
    if MANIFEST_FILE in found and SUMMARY_FILE in found:
        state, theirs = State.DONE, _read_json(storage.join(output, SUMMARY_FILE)).get("fingerprint")
    elif WORK_DIR in found:
        state, theirs = State.RESUME, _read_json(storage.join(output, WORK_DIR, FINGERPRINT_FILE)).get("fingerprint")
    elif ours:
        raise JobError(
            f"--output {output}: already holds files of another run ({ours[0]}); choose another "
            "folder or --set output.overwrite=true to replace them"
        )
    if state is not State.FRESH and theirs != fingerprint:
        what = "a finished" if state is State.DONE else "an unfinished"
        raise JobError(
            f"--output {output}: holds {what} run of another input, model, audio settings, precision or "
            "decoder; choose another folder or --set output.overwrite=true to replace it"
        )
    if not storage.is_uri(output):
        os.makedirs(output, exist_ok=True)
    probe = storage.join(output, "_write_check")  # fails here, not after the whole run
    storage.write_bytes(probe, b"")
    storage.delete(probe)
    return state


def begin(output: str, state: State, fingerprint: str, manifest: pa.Table) -> pa.Table:
    """Start (``fresh``) or continue (``resume``) a run in ``output``; return the rows still to transcribe."""
    work = storage.join(output, WORK_DIR)
    if state is State.FRESH:
        if storage.is_uri(output):  # one object, whole or absent: the _work prefix always holds its fingerprint
            _write_json(storage.join(work, FINGERPRINT_FILE), {"fingerprint": fingerprint})
            return manifest
        # Made whole, then renamed: a _work folder always holds its fingerprint.
        staging = os.path.join(output, f".{WORK_DIR}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging)
        _write_json(os.path.join(staging, FINGERPRINT_FILE), {"fingerprint": fingerprint})
        os.replace(staging, work)
        return manifest
    for f in storage.children(output):
        if _is_temporary(f.base_name):
            storage.delete(storage.join(output, f.base_name))
    done = read_output(output, [S.ID])[S.ID].combine_chunks()
    return manifest.filter(pc.invert(pc.is_in(manifest[S.ID], value_set=done)))


def check_errors(output: str, summary: dict[str, Any], max_fraction: float) -> None:
    """Raise :class:`JobError` when at least ``max_fraction`` of a committed run's rows are error rows."""
    rows, errors = summary["rows_out"], summary["errors"]
    if rows and errors / rows >= max_fraction:
        by_kind = sorted(summary["errors_by_kind"].items(), key=lambda kv: -kv[1])
        common = ", ".join(f"{kind} {n}" for kind, n in by_kind[:3])
        raise JobError(
            f"{errors} of {rows} rows are error rows ({common}), at least output.max_error_fraction = "
            f"{max_fraction:g} of them; the output is committed in {output} (see {SUMMARY_FILE})"
        )


def finished_summary(output: str) -> dict[str, Any]:
    """The summary of the finished run in ``output``."""
    return _read_json(storage.join(output, SUMMARY_FILE))


def commit(output: str, summary: dict[str, Any]) -> list[str]:
    """Check the run's ``summary`` (no id lost or duplicated), then write ``_summary.json`` and, last,
    ``_manifest.json`` (every shard with its rows), and drop ``_work``; return the shards. A run that
    breaks the invariant gets its summary but no manifest, and raises :class:`JobError`."""
    if summary["lost"] or summary["duplicated"]:
        # No _manifest.json: readers must not take it for a result.
        _write_json(storage.join(output, SUMMARY_FILE), summary)
        raise JobError(
            f"output breaks the one-row-per-input invariant: {summary['lost']} ids lost, "
            f"{summary['duplicated']} duplicated (see {storage.join(output, SUMMARY_FILE)})"
        )
    footers = _footers(output)
    _write_json(storage.join(output, SUMMARY_FILE), summary)
    _write_json(storage.join(output, MANIFEST_FILE), {
        "shards": [{"path": name, "rows": footer.num_rows} for name, footer in footers.items()],
        "rows": sum(footer.num_rows for footer in footers.values()),
    })
    storage.delete_folder(storage.join(output, WORK_DIR))
    return list(footers)


def _shards(output: str) -> list[str]:
    return sorted(f.base_name for f in storage.children(output)
                  if f.base_name.startswith(SHARD_PREFIX) and f.base_name.endswith(".parquet"))


def _footers(output: str) -> dict[str, pq.FileMetaData]:
    """Each shard's Parquet footer (rows, key-value metadata), by name, in name order."""
    fs, folder = storage.resolve(output)
    return {name: storage.retried(lambda name=name: pq.read_metadata(f"{folder}/{name}", filesystem=fs))
            for name in _shards(output)}


def _precision_as_run(footers: dict[str, pq.FileMetaData]) -> str | None:
    """The precision the replicas ran in, from the shards' metadata: one name, or several joined by
    ``+`` where replicas on different devices resolved ``auto`` differently; None without shards."""
    found = {json.loads(f.metadata[S.METADATA_KEY]).get("precision")
             for f in footers.values() if f.metadata and S.METADATA_KEY in f.metadata}
    return "+".join(sorted(str(p) for p in found)) or None


def read_output(output: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The job's result in the folder or URI ``output`` as one table: the shards ``_manifest.json``
    lists (while a run is unfinished, every shard so far), none of the ``_``-prefixed side files."""
    output = location(output)
    manifest = storage.join(output, MANIFEST_FILE)
    if storage.info(manifest).type == pafs.FileType.File:
        names = [s["path"] for s in _read_json(manifest)["shards"]]
    else:
        names = _shards(output)
    if not names:
        return S.OUTPUT_SCHEMA.empty_table().select(columns or S.OUTPUT_SCHEMA.names)
    fs, folder = storage.resolve(output)
    files = [f"{folder}/{name}" for name in names]
    return storage.retried(lambda: pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns))


def summarize(output: str, manifest: pa.Table, wall_s: float) -> dict[str, Any]:
    """Counts and rates computed from the shards actually written, checked against ``manifest``, and
    the precision the replicas ran in."""
    out = read_output(output, [S.ID, S.ERROR_KIND, S.DURATION_S, S.NUM_SAMPLES, S.PADDED_SAMPLES])
    ids_in = manifest[S.ID]
    lost = int(pc.sum(pc.invert(pc.is_in(ids_in, value_set=out[S.ID].combine_chunks()))).as_py() or 0)
    duplicated = out.num_rows - len(pc.unique(out[S.ID]))
    kinds = pc.value_counts(out[S.ERROR_KIND].drop_null().combine_chunks()).to_pylist()
    ok = pc.is_null(out[S.ERROR_KIND])
    transcribed = int(pc.sum(ok).as_py() or 0)
    audio_s = float(pc.sum(out[S.DURATION_S]).as_py() or 0.0)
    real = int(pc.sum(pc.filter(out[S.NUM_SAMPLES], ok)).as_py() or 0)
    padded = int(pc.sum(pc.filter(out[S.PADDED_SAMPLES], ok)).as_py() or 0)
    footers = _footers(output)
    return {
        "rows_in": manifest.num_rows,
        "rows_out": out.num_rows,
        "transcribed": transcribed,
        "errors": out.num_rows - transcribed,
        "errors_by_kind": {k["values"]: k["counts"] for k in kinds},
        "lost": lost,
        "duplicated": duplicated,
        "audio_hours": audio_s / 3600,
        "wall_s": wall_s,
        "audio_s_per_s": audio_s / wall_s if wall_s > 0 else math.nan,
        "padding_waste": (padded - real) / real if real else 0.0,
        "shards": len(footers),
        "precision": _precision_as_run(footers),
    }
