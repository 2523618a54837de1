"""Step 3, write, and the output protocol: every input row ends in exactly one committed row.

The output folder of a job holds:

- ``part-<digest>.parquet``: the shards. :class:`ShardWriter` writes each whole under a hidden
  temporary name and renames it into place (:func:`commit_file`), so a reader sees a whole shard or
  none; the name is a digest of the shard's ids, so a retried write replaces its own file instead of
  adding a second copy of its rows. (Ray Data's ``write_parquet`` writes in place.)
- ``_work/input.json`` while a run is unfinished: the job's :func:`fingerprint` (its input rows and
  the settings that change transcripts).
- ``_manifest.json``, written last, by rename: the shards of a finished, checked run and their row
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
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import schema as S
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


def commit_file(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file by rename: ``write`` fills a hidden ``.<name>.<pid>.tmp`` beside it, which is
    synced and renamed over ``path``, so a reader sees the old file or the new one, never part of one."""
    folder, name = os.path.split(str(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    commit_file(path, lambda fh: fh.write((json.dumps(value, indent=2) + "\n").encode()))


class ShardWriter:
    """Output rows → one Parquet shard per call, committed by rename; returns ``(shard, rows)``."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return pa.table({"shard": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        digest = hashlib.sha256("\0".join(sorted(table[S.ID].to_pylist())).encode()).hexdigest()[:32]
        name = f"{SHARD_PREFIX}{digest}.parquet"
        commit_file(os.path.join(self.folder, name), lambda fh: pq.write_table(table, fh))
        return pa.table({"shard": [name], "rows": [table.num_rows]})


def fingerprint(manifest: pa.Table, settings: dict[str, Any]) -> str:
    """Same rows (ids and paths) and same ``settings`` → same fingerprint: what resuming relies on."""
    h = hashlib.sha256()
    for column in (S.ID, S.PATH):
        for value in manifest[column].to_pylist():
            h.update(value.encode() + b"\0")
    h.update(json.dumps({**settings, "rows": manifest.num_rows}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def check_folder(output: Path) -> None:
    """Raise :class:`JobError` where ``output`` cannot be an output folder (before any slow work)."""
    if output.exists() and not output.is_dir():
        raise JobError(f"--output {output}: exists and is not a folder")


def prepare(output: Path, overwrite: bool, fingerprint: str) -> State:
    """Return the output's state for a job of ``fingerprint``; clear the folder first with
    ``overwrite``; raise :class:`JobError` for another job's output or a folder it cannot write."""
    check_folder(output)
    work, summary_file = output / WORK_DIR, output / SUMMARY_FILE
    ours = [*output.glob("*.parquet"), *output.glob(f".{SHARD_PREFIX}*.tmp"), summary_file,
            output / MANIFEST_FILE] if output.is_dir() else []
    ours = [p for p in ours if p.exists()]
    if overwrite:
        for p in ours:
            p.unlink()
        shutil.rmtree(work, ignore_errors=True)
        ours = []
    state = State.FRESH
    if (output / MANIFEST_FILE).exists() and summary_file.exists():
        state, found = State.DONE, json.loads(summary_file.read_text()).get("fingerprint")
    elif work.is_dir():
        state, found = State.RESUME, json.loads((work / FINGERPRINT_FILE).read_text()).get("fingerprint")
    elif ours:
        raise JobError(
            f"--output {output}: already holds files of another run ({ours[0].name}); choose another "
            "folder or --set output.overwrite=true to replace them"
        )
    if state is not State.FRESH and found != fingerprint:
        what = "a finished" if state is State.DONE else "an unfinished"
        raise JobError(
            f"--output {output}: holds {what} run of another input, model, audio settings, precision or "
            "decoder; choose another folder or --set output.overwrite=true to replace it"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / "_write_check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise JobError(f"--output {output}: not writable ({exc.strerror})") from None
    return state


def begin(output: Path, state: State, fingerprint: str, manifest: pa.Table) -> pa.Table:
    """Start (``fresh``) or continue (``resume``) a run in ``output``; return the rows still to transcribe."""
    if state is State.FRESH:
        # Made whole, then renamed: a _work folder always holds its fingerprint.
        staging = output / f".{WORK_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _write_json(staging / FINGERPRINT_FILE, {"fingerprint": fingerprint})
        os.replace(staging, output / WORK_DIR)
        return manifest
    for orphan in output.glob(f".{SHARD_PREFIX}*.tmp"):  # a shard whose write was cut off
        orphan.unlink()
    done = read_output(output, [S.ID])[S.ID].combine_chunks()
    return manifest.filter(pc.invert(pc.is_in(manifest[S.ID], value_set=done)))


def check_errors(output: Path, summary: dict[str, Any], max_fraction: float) -> None:
    """Raise :class:`JobError` when at least ``max_fraction`` of a committed run's rows are error rows."""
    rows, errors = summary["rows_out"], summary["errors"]
    if rows and errors / rows >= max_fraction:
        by_kind = sorted(summary["errors_by_kind"].items(), key=lambda kv: -kv[1])
        common = ", ".join(f"{kind} {n}" for kind, n in by_kind[:3])
        raise JobError(
            f"{errors} of {rows} rows are error rows ({common}), at least output.max_error_fraction = "
            f"{max_fraction:g} of them; the output is committed in {output} (see {SUMMARY_FILE})"
        )


def finished_summary(output: Path) -> dict[str, Any]:
    """The summary of the finished run in ``output``."""
    return json.loads((output / SUMMARY_FILE).read_text())


def commit(output: Path, summary: dict[str, Any]) -> list[str]:
    """Check the run's ``summary`` (no id lost or duplicated), then write ``_summary.json`` and, last,
    ``_manifest.json`` (every shard with its rows), and drop ``_work``; return the shards. A run that
    breaks the invariant gets its summary but no manifest, and raises :class:`JobError`."""
    if summary["lost"] or summary["duplicated"]:
        _write_json(output / SUMMARY_FILE, summary)  # no _manifest.json: readers must not take it for a result
        raise JobError(
            f"output breaks the one-row-per-input invariant: {summary['lost']} ids lost, "
            f"{summary['duplicated']} duplicated (see {output / SUMMARY_FILE})"
        )
    footers = _footers(output)
    _write_json(output / SUMMARY_FILE, summary)
    _write_json(output / MANIFEST_FILE, {
        "shards": [{"path": name, "rows": footer.num_rows} for name, footer in footers.items()],
        "rows": sum(footer.num_rows for footer in footers.values()),
    })
    shutil.rmtree(output / WORK_DIR)
    return list(footers)


def _shards(output: Path) -> list[str]:
    return sorted(f.name for f in output.glob(f"{SHARD_PREFIX}*.parquet"))


def _footers(output: Path) -> dict[str, pq.FileMetaData]:
    """Each shard's Parquet footer (rows, key-value metadata), by name, in name order."""
    return {name: pq.read_metadata(output / name) for name in _shards(output)}


def _precision_as_run(footers: dict[str, pq.FileMetaData]) -> str | None:
    """The precision the replicas ran in, from the shards' metadata: one name, or several joined by
    ``+`` where replicas on different devices resolved ``auto`` differently; None without shards."""
    found = {json.loads(f.metadata[S.METADATA_KEY]).get("precision")
             for f in footers.values() if f.metadata and S.METADATA_KEY in f.metadata}
    return "+".join(sorted(str(p) for p in found)) or None


def read_output(output: Path | str, columns: list[str] | None = None) -> pa.Table:
    """The job's result as one table: the shards ``_manifest.json`` lists (while a run is
    unfinished, every shard so far), none of the ``_``-prefixed side files."""
    output = Path(output)
    if (output / MANIFEST_FILE).exists():
        listed = json.loads((output / MANIFEST_FILE).read_text())["shards"]
        files = [str(output / s["path"]) for s in listed]
    else:
        files = [str(output / name) for name in _shards(output)]
    if not files:
        return S.OUTPUT_SCHEMA.empty_table().select(columns or S.OUTPUT_SCHEMA.names)
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def summarize(output: Path, manifest: pa.Table, wall_s: float) -> dict[str, Any]:
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
