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
from pipeline.scoring import corpus_scores

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
    UPDATE = "update"  # a finished run of the same settings: its input grew, or its error rows are retried


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


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """Same ``settings`` → same fingerprint, whatever the rows: a finished run's output may take more rows."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


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


def prepare(output: str, overwrite: bool, fingerprint: str, settings: str = "", retry_errors: bool = False) -> State:
    """Return the output's state for a job of ``fingerprint`` (its rows and settings) and ``settings``
    (:func:`settings_fingerprint`); clear the folder first with ``overwrite``; raise :class:`JobError`
    for another job's output or a folder it cannot write. A finished run of the same settings is
    ``update`` where the rows differ, or where ``retry_errors`` and it holds error rows."""
    check_folder(output)
    try:
        return _prepare(output, overwrite, fingerprint, settings, retry_errors)
    except (OSError, ValueError) as exc:
        raise JobError(f"--output {output}: not writable ({storage.reason(exc)})") from None


def _prepare(output: str, overwrite: bool, fingerprint: str, settings: str, retry_errors: bool) -> State:
    found = {f.base_name for f in storage.children(output)}
    ours = sorted(n for n in found if n.endswith(".parquet") or _is_temporary(n) or n in (SUMMARY_FILE, MANIFEST_FILE))
    if overwrite:
        for name in ours:
            storage.delete(storage.join(output, name))
        storage.delete_folder(storage.join(output, WORK_DIR))
        found, ours = found - {*ours, WORK_DIR}, []
    state = State.FRESH
    if WORK_DIR in found:  # first: an unfinished update keeps the previous run's _manifest.json
        state, ok = State.RESUME, _work(output)["fingerprint"] == fingerprint
    elif MANIFEST_FILE in found and SUMMARY_FILE in found:
        summary = finished_summary(output)
        if summary.get("fingerprint") == fingerprint:
            state, ok = (State.UPDATE if retry_errors and summary.get("errors") else State.DONE), True
        else:
            state, ok = State.UPDATE, bool(settings) and summary.get("settings_fingerprint") == settings
    elif ours:
        raise JobError(
            f"--output {output}: already holds files of another run ({ours[0]}); choose another "
            "folder or --set output.overwrite=true to replace them"
        )
    if state is not State.FRESH and not ok:
        what = "an unfinished" if state is State.RESUME else "a finished"
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


def _work(output: str) -> dict[str, Any]:
    """The unfinished run's record: its ``fingerprint``, and in an update the committed shards it
    ``replaces`` (those holding the error rows it ``redo``\\es)."""
    return {"replaces": [], "redo": [], **_read_json(storage.join(output, WORK_DIR, FINGERPRINT_FILE))}


def _write_work(output: str, record: dict[str, Any]) -> None:
    work = storage.join(output, WORK_DIR)
    if storage.is_uri(output):  # one object, whole or absent: the _work prefix always holds its record
        _write_json(storage.join(work, FINGERPRINT_FILE), record)
        return
    # Made whole, then renamed: a _work folder always holds its record.
    staging = os.path.join(output, f".{WORK_DIR}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    _write_json(os.path.join(staging, FINGERPRINT_FILE), record)
    os.replace(staging, work)


def begin(output: str, state: State, fingerprint: str, manifest: pa.Table, settings: str = "",
          retry_errors: bool = False) -> pa.Table:
    """Start (``fresh``, ``update``) or continue (``resume``) a run in ``output``; return the rows
    still to transcribe. An update first checks that every committed row is still in ``manifest``
    with the same path; it transcribes the new rows, and with ``retry_errors`` the error rows again."""
    record: dict[str, Any] = {"fingerprint": fingerprint, "settings": settings, "replaces": [], "redo": []}
    if state is State.FRESH:
        _write_work(output, record)
        return manifest
    if state is State.UPDATE:
        committed = _table(output, _committed_shards(output), [S.ID, S.PATH, S.ERROR_KIND], with_shard=True)
        _check_still_in(output, committed, manifest)
        if retry_errors:
            errors = committed.filter(pc.is_valid(committed[S.ERROR_KIND]))
            record["redo"] = sorted(errors[S.ID].to_pylist())
            record["replaces"] = sorted(set(errors["shard"].to_pylist()))
        _write_work(output, record)
    else:
        record = _work(output)
        for f in storage.children(output):
            if _is_temporary(f.base_name):  # a local shard whose write was cut off
                storage.delete(storage.join(output, f.base_name))
    live, replaced = _split(output, record)
    kept = _without_redone(_table(output, replaced, [S.ID]), record)[S.ID]  # rewritten by finish, not redone
    done = pa.concat_arrays([_table(output, live, [S.ID])[S.ID].combine_chunks(), kept.combine_chunks()])
    return manifest.filter(pc.invert(pc.is_in(manifest[S.ID], value_set=done)))


def _without_redone(table: pa.Table, record: dict[str, Any]) -> pa.Table:
    """``table`` less the rows an update redoes."""
    return table.filter(pc.invert(pc.is_in(table[S.ID], value_set=pa.array(record["redo"], pa.string()))))


def _check_still_in(output: str, committed: pa.Table, manifest: pa.Table) -> None:
    """Raise :class:`JobError` unless each committed row's id is in ``manifest`` with the same path."""
    paths = dict(zip(manifest[S.ID].to_pylist(), manifest[S.PATH].to_pylist(), strict=True))
    for row_id, path in zip(committed[S.ID].to_pylist(), committed[S.PATH].to_pylist(), strict=True):
        if paths.get(row_id) != path:
            what = "is not in the input" if row_id not in paths else f"is now {paths[row_id]!r}, not {path!r}"
            raise JobError(
                f"--output {output}: holds a finished run of this model and settings whose row {row_id!r} "
                f"{what}; an output can take new rows, not lose or change rows: choose another folder "
                "or --set output.overwrite=true"
            )


def finish(output: str) -> None:
    """After an update's rows are written: each shard it replaces is written again without the rows
    it redid (the old one is deleted by :func:`commit`, after ``_manifest.json`` no longer lists it)."""
    record = _work(output)
    writer = ShardWriter(output)
    for name in _split(output, record)[1]:
        writer(_without_redone(_table(output, [name], None), record))


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
    ``_manifest.json`` (every live shard with its rows), delete the shards an update replaced, and
    drop ``_work``; return the shards. A run that breaks the invariant gets its summary but no new
    manifest, and raises :class:`JobError`."""
    if summary["lost"] or summary["duplicated"]:
        # No _manifest.json: readers must not take it for a result.
        _write_json(storage.join(output, SUMMARY_FILE), summary)
        raise JobError(
            f"output breaks the one-row-per-input invariant: {summary['lost']} ids lost, "
            f"{summary['duplicated']} duplicated (see {storage.join(output, SUMMARY_FILE)})"
        )
    record = _work(output)
    footers = _footers(output, _split(output, record)[0])
    _write_json(storage.join(output, SUMMARY_FILE), summary)
    _write_json(storage.join(output, MANIFEST_FILE), {
        "shards": [{"path": name, "rows": footer.num_rows} for name, footer in footers.items()],
        "rows": sum(footer.num_rows for footer in footers.values()),
    })
    for name in record["replaces"]:
        storage.delete(storage.join(output, name))
    storage.delete_folder(storage.join(output, WORK_DIR))
    return list(footers)


def _shards(output: str) -> list[str]:
    return sorted(f.base_name for f in storage.children(output)
                  if f.base_name.startswith(SHARD_PREFIX) and f.base_name.endswith(".parquet"))


def _split(output: str, record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The shards in ``output`` from one listing: those the run's result is made of, and those the
    unfinished update of ``record`` replaces."""
    replaced = set(record["replaces"])
    names = _shards(output)
    return [n for n in names if n not in replaced], [n for n in names if n in replaced]


def _live_shards(output: str) -> list[str]:
    """The shards the run's result is made of: all but those an unfinished update replaces."""
    try:
        record = _work(output)
    except FileNotFoundError:  # no unfinished run
        return _shards(output)
    return _split(output, record)[0]


def _committed_shards(output: str) -> list[str]:
    """The shards ``_manifest.json`` lists (while a first run is unfinished: every shard so far)."""
    manifest = storage.join(output, MANIFEST_FILE)
    if storage.info(manifest).type == pafs.FileType.File:
        return [s["path"] for s in _read_json(manifest)["shards"]]
    return _shards(output)


def _table(output: str, names: list[str], columns: list[str] | None, with_shard: bool = False) -> pa.Table:
    """The rows of the shards ``names`` (with ``with_shard``, a ``shard`` column naming each row's)."""
    if not names:
        table = S.OUTPUT_SCHEMA.empty_table().select(columns or S.OUTPUT_SCHEMA.names)
        return table.append_column("shard", pa.array([], pa.string())) if with_shard else table
    fs, folder = storage.resolve(output)
    dataset = pads.dataset([f"{folder}/{name}" for name in names], format="parquet", filesystem=fs)
    if not with_shard:
        return storage.retried(lambda: dataset.to_table(columns=columns))
    fragments = list(dataset.get_fragments())
    tables = [storage.retried(lambda fragment=fragment: fragment.to_table(columns=columns)) for fragment in fragments]
    shards = [pa.array([f.path.rsplit("/", 1)[-1]] * t.num_rows, pa.string())
              for f, t in zip(fragments, tables, strict=True)]
    return pa.concat_tables(tables).append_column("shard", pa.chunked_array(shards, pa.string()))


def _footers(output: str, names: list[str]) -> dict[str, pq.FileMetaData]:
    """Each shard's Parquet footer (rows, key-value metadata), by name, in name order."""
    fs, folder = storage.resolve(output)
    return {name: storage.retried(lambda name=name: pq.read_metadata(f"{folder}/{name}", filesystem=fs))
            for name in names}


def _precision_as_run(footers: dict[str, pq.FileMetaData]) -> str | None:
    """The precision the replicas ran in, from the shards' metadata: one name, or several joined by
    ``+`` where replicas on different devices resolved ``auto`` differently; None without shards."""
    found = {json.loads(f.metadata[S.METADATA_KEY]).get("precision")
             for f in footers.values() if f.metadata and S.METADATA_KEY in f.metadata}
    return "+".join(sorted(str(p) for p in found)) or None


def read_output(output: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The job's result in the folder or URI ``output`` as one table: the shards ``_manifest.json``
    lists (while a first run is unfinished, every shard so far), none of the ``_``-prefixed side files."""
    output = location(output)
    return _table(output, _committed_shards(output), columns)


def summarize(output: str, manifest: pa.Table, wall_s: float) -> dict[str, Any]:
    """Counts and rates computed from the shards actually written, checked against ``manifest``, the
    precision the replicas ran in, and the corpus scores where rows have references
    (:func:`pipeline.scoring.corpus_scores`; null when none has)."""
    live = _live_shards(output)
    out = _table(output, live, [S.ID, S.ERROR_KIND, S.DURATION_S, S.NUM_SAMPLES, S.PADDED_SAMPLES, S.REFERENCE,
                                S.TRANSCRIPT])
    ids_in = manifest[S.ID]
    lost = int(pc.sum(pc.invert(pc.is_in(ids_in, value_set=out[S.ID].combine_chunks()))).as_py() or 0)
    duplicated = out.num_rows - len(pc.unique(out[S.ID]))
    kinds = pc.value_counts(out[S.ERROR_KIND].drop_null().combine_chunks()).to_pylist()
    ok = pc.is_null(out[S.ERROR_KIND])
    transcribed = int(pc.sum(ok).as_py() or 0)
    audio_s = float(pc.sum(out[S.DURATION_S]).as_py() or 0.0)
    real = int(pc.sum(pc.filter(out[S.NUM_SAMPLES], ok)).as_py() or 0)
    padded = int(pc.sum(pc.filter(out[S.PADDED_SAMPLES], ok)).as_py() or 0)
    footers = _footers(output, live)
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
        "scores": corpus_scores(out[S.REFERENCE].to_pylist(), out[S.TRANSCRIPT].to_pylist(),
                                out[S.DURATION_S].to_pylist()),
    }
