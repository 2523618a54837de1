"""The write step and the output protocol, without Ray: shards committed whole under names from
their ids, the folder's states, the commit's check, and what readers read."""

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import output, storage
from pipeline import schema as S
from pipeline.errors import JobError
from pipeline.output import MANIFEST_FILE, SHARD_PREFIX, SUMMARY_FILE, WORK_DIR, ShardWriter, State


def _rows(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({S.ID: ids, S.PATH: [f"/c/{i}.flac" for i in ids], S.TRANSCRIPT: [f"t {i}" for i in ids],
                     S.ERROR_KIND: [None] * n, S.ERROR: [None] * n, S.ERROR_STAGE: [None] * n,
                     S.DURATION_S: [1.5] * n, S.SAMPLE_RATE: [16_000] * n, S.NUM_CHANNELS: [1] * n,
                     S.REFERENCE: [None] * n, S.WER: [None] * n, S.CER: [None] * n, S.MODEL: ["m"] * n,
                     S.NUM_SAMPLES: [24_000] * n,
                     S.PADDED_SAMPLES: [24_000] * n, S.CONFIDENCE: [0.9] * n,
                     S.WORDS: [[{"word": "t", "start_s": 0.1, "end_s": 0.3, "confidence": 0.9}]] * n},
                    schema=S.OUTPUT_SCHEMA)


def _manifest(ids: list[str]) -> pa.Table:
    return pa.table({S.ID: ids, S.PATH: [f"/c/{i}.flac" for i in ids], S.DATASET_ROW: [None] * len(ids),
                     S.REFERENCE: [None] * len(ids)}, schema=S.MANIFEST_SCHEMA)


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path) -> Iterator[str]:
    """An output location: a local folder, or a prefix in fsspec's in-memory store (no rename, like
    an object store; the S3 server tests are in test_object_storage.py)."""
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    bucket = uuid.uuid4().hex
    yield f"memory://{bucket}/out"
    fs = fsspec.filesystem("memory")
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


def _names(location: str) -> list[str]:
    return sorted(f.base_name for f in storage.children(location))


def _json(location: str) -> dict:
    return json.loads(storage.read_bytes(location))


def test_a_file_is_replaced_whole_or_not_at_all(out):
    target = storage.join(out, "f.bin")
    if not storage.is_uri(out):
        os.makedirs(out)
    storage.write_bytes(target, b"old")

    def half_then_fail(fh):
        fh.write(b"new but cut")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write(target, half_then_fail)
    assert storage.read_bytes(target) == b"old"  # a reader never sees part of the new file
    storage.write_bytes(target, b"new")
    assert storage.read_bytes(target) == b"new"
    assert [n for n in _names(out) if not n.endswith(".tmp")] == ["f.bin"]


def test_shard_names_come_from_their_ids_so_a_retry_replaces_its_own_shard(out):
    if not storage.is_uri(out):
        os.makedirs(out)
    writer = ShardWriter(out)
    first = writer(_rows(["b", "a", "c"])).to_pylist()
    again = writer(_rows(["c", "a", "b"])).to_pylist()  # the same rows in another order: a retried task
    other = writer(_rows(["d"])).to_pylist()
    assert first == again and first[0]["rows"] == 3 and first[0]["shard"].startswith(SHARD_PREFIX)
    assert other[0]["shard"] != first[0]["shard"]
    assert _names(out) == sorted([first[0]["shard"], other[0]["shard"]])
    shard = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, first[0]["shard"]))))
    assert shard[S.ID].to_pylist() == ["c", "a", "b"]
    assert writer(_rows([])).num_rows == 0 and len(_names(out)) == 2


def test_a_run_goes_fresh_then_resume_then_done(out):
    manifest = _manifest(["a", "b", "c"])
    fp = output.fingerprint(manifest, {"model": "m"})
    assert fp != output.fingerprint(manifest, {"model": "other"}) != output.fingerprint(_manifest(["a", "b"]), {})
    assert output.prepare(out, False, fp) is State.FRESH
    assert output.begin(out, State.FRESH, fp, manifest) == manifest
    assert _json(storage.join(out, WORK_DIR, "input.json"))["fingerprint"] == fp
    ShardWriter(out)(_rows(["a"]))
    if not storage.is_uri(out):  # a local shard write cut off before its rename
        Path(out, f".{SHARD_PREFIX}x.parquet.1.tmp").write_bytes(b"cut off")

    assert output.prepare(out, False, fp) is State.RESUME  # killed here: the same job resumes
    todo = output.begin(out, State.RESUME, fp, manifest)
    assert todo[S.ID].to_pylist() == ["b", "c"] and not [n for n in _names(out) if n.endswith(".tmp")]
    with pytest.raises(JobError, match="holds an unfinished run of another input"):
        output.prepare(out, False, output.fingerprint(manifest, {"model": "other"}))

    ShardWriter(out)(_rows(["b", "c"]))
    summary = output.summarize(out, manifest, wall_s=2.0)
    assert (summary["rows_in"], summary["rows_out"], summary["lost"], summary["duplicated"]) == (3, 3, 0, 0)
    assert summary["audio_s_per_s"] == pytest.approx(4.5 / 2.0) and summary["padding_waste"] == 0.0
    shards = output.commit(out, {**summary, "fingerprint": fp})
    assert WORK_DIR not in _names(out) and len(shards) == 2
    assert _json(storage.join(out, MANIFEST_FILE))["rows"] == 3
    assert output.prepare(out, False, fp) is State.DONE
    assert output.finished_summary(out)["rows_out"] == 3
    assert sorted(output.read_output(out, [S.ID])[S.ID].to_pylist()) == ["a", "b", "c"]
    with pytest.raises(JobError, match="holds a finished run of another input"):
        output.prepare(out, False, "another")
    assert output.prepare(out, True, "another") is State.FRESH and _names(out) == []


def test_a_run_that_loses_or_duplicates_a_row_is_not_committed(out):
    manifest = _manifest(["a", "b"])
    output.begin(out, output.prepare(out, False, "fp"), "fp", manifest)
    writer = ShardWriter(out)
    writer(_rows(["a"]))
    copy = storage.read_bytes(storage.join(out, writer(_rows(["a"]))[0][0].as_py()))
    storage.write_bytes(storage.join(out, f"{SHARD_PREFIX}copy.parquet"), copy)
    summary = output.summarize(out, manifest, wall_s=1.0)
    assert (summary["lost"], summary["duplicated"]) == (1, 1)
    with pytest.raises(JobError, match="1 ids lost, 1 duplicated"):
        output.commit(out, summary)
    assert MANIFEST_FILE not in _names(out) and {SUMMARY_FILE, WORK_DIR} <= set(_names(out))


def test_another_jobs_files_or_an_unwritable_folder_are_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "data.parquet").write_bytes(b"")
    with pytest.raises(JobError, match=r"already holds files of another run \(data.parquet\).*overwrite=true"):
        output.prepare(str(tmp_path / "taken"), False, "fp")
    (tmp_path / "file").write_text("")
    with pytest.raises(JobError, match="exists and is not a folder"):
        output.prepare(str(tmp_path / "file"), False, "fp")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(JobError, match="not writable"):
            output.prepare(str(tmp_path / "ro"), False, "fp")


def test_a_relative_output_folder_and_model_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    """The shard writers and replicas run in Ray workers, whose working directory is not the driver's."""
    import shutil

    from helpers import ROOT

    from pipeline.bundled import model_path
    from pipeline.config import load_config
    from pipeline.engine import plan

    shutil.copytree(model_path("@demo"), tmp_path / "models" / "demo")
    monkeypatch.chdir(tmp_path)
    p = plan(load_config(ROOT / "configs" / "demo.yaml", ["output.path=rel/out", "model.name=models/demo"]))
    assert p.output == str(tmp_path / "rel" / "out") and os.path.isdir(p.output)
    # So is a relative model folder, for the replicas; the outputs keep its name as configured.
    assert (p.spec.name, p.spec.source) == ("models/demo", str(tmp_path / "models" / "demo"))


def test_a_run_whose_rows_mostly_failed_is_committed_and_then_fails():
    summary = {"rows_out": 4, "errors": 3, "errors_by_kind": {"not_found": 2, "decode_error": 1}}
    output.check_errors("/out", summary, 1.0)  # not every row failed
    with pytest.raises(JobError, match=r"^3 of 4 rows are error rows \(not_found 2, decode_error 1\), at least "
                                       r"output.max_error_fraction = 0.75 of them; the output is committed in /out"):
        output.check_errors("/out", summary, 0.75)
    output.check_errors("/out", {"rows_out": 0, "errors": 0, "errors_by_kind": {}}, 1.0)


def _finished(out: str, ids: list[str], errors: tuple[str, ...] = ()) -> tuple[str, str]:
    """A committed run of ``ids`` (one shard each pair; ``errors`` as error rows); its fingerprints."""
    manifest, settings = _manifest(ids), {"model": "m"}
    fp, same = output.fingerprint(manifest, settings), output.settings_fingerprint(settings)
    output.begin(out, output.prepare(out, False, fp, same), fp, manifest, same)
    writer = ShardWriter(out)
    for pair in [ids[i:i + 2] for i in range(0, len(ids), 2)]:
        rows = _rows(pair)
        kinds = pa.array(["not_found" if i in errors else None for i in pair], pa.string())
        writer(rows.set_column(rows.schema.get_field_index(S.ERROR_KIND), S.ERROR_KIND, kinds))
    output.commit(out, {**output.summarize(out, manifest, 1.0), "fingerprint": fp, "settings_fingerprint": same})
    return fp, same


def test_a_grown_input_adds_its_new_rows_to_a_finished_run(out):
    _, same = _finished(out, ["a", "b"])
    before = _names(out)
    grown = _manifest(["a", "b", "c"])
    fp = output.fingerprint(grown, {"model": "m"})
    assert output.prepare(out, False, fp, same) is State.UPDATE
    assert output.begin(out, State.UPDATE, fp, grown, same)[S.ID].to_pylist() == ["c"]
    assert sorted(output.read_output(out, [S.ID])[S.ID].to_pylist()) == ["a", "b"]  # readers: the last result
    assert output.prepare(out, False, fp, same) is State.RESUME  # killed here: it resumes
    ShardWriter(out)(_rows(["c"]))
    output.finish(out)
    summary = output.summarize(out, grown, 1.0)
    assert (summary["rows_out"], summary["lost"], summary["duplicated"]) == (3, 0, 0)
    output.commit(out, {**summary, "fingerprint": fp, "settings_fingerprint": same})
    assert set(before) - {SUMMARY_FILE} <= set(_names(out))  # the old shards stay as they were
    assert output.prepare(out, False, fp, same) is State.DONE
    assert output.prepare(out, False, fp, same, retry_errors=True) is State.DONE  # no error rows to retry
    moved = _manifest(["a", "b", "c"])
    moved = moved.set_column(1, S.PATH, pa.array(["/c/a.flac", "/elsewhere/b.flac", "/c/c.flac"]))
    for changed in [_manifest(["a", "c"]), moved]:
        fp = output.fingerprint(changed, {"model": "m"})
        assert output.prepare(out, False, fp, same) is State.UPDATE
        with pytest.raises(JobError, match="whose row 'b' (is not in the input|is now '/elsewhere/b.flac')"):
            output.begin(out, State.UPDATE, fp, changed, same)
    with pytest.raises(JobError, match="holds a finished run of another input"):
        output.prepare(out, False, "another", output.settings_fingerprint({"model": "other"}))


def test_retry_errors_transcribes_only_the_error_rows_again(out):
    fp, same = _finished(out, ["a", "b", "c", "d"], errors=("b",))
    manifest = _manifest(["a", "b", "c", "d"])
    untouched = [n for n in _names(out) if n.startswith(SHARD_PREFIX)
                 and "b" not in output._table(out, [n], [S.ID])[S.ID].to_pylist()]
    assert output.prepare(out, False, fp, same) is State.DONE
    assert output.prepare(out, False, fp, same, retry_errors=True) is State.UPDATE
    assert output.begin(out, State.UPDATE, fp, manifest, same, retry_errors=True)[S.ID].to_pylist() == ["b"]
    assert output.prepare(out, False, fp, same, retry_errors=True) is State.RESUME
    assert output.begin(out, State.RESUME, fp, manifest, same)[S.ID].to_pylist() == ["b"]  # resumed: still b
    ShardWriter(out)(_rows(["b"]))
    assert output.begin(out, State.RESUME, fp, manifest, same).num_rows == 0
    output.finish(out)
    summary = output.summarize(out, manifest, 1.0)
    assert (summary["rows_out"], summary["errors"], summary["lost"], summary["duplicated"]) == (4, 0, 0, 0)
    output.commit(out, {**summary, "fingerprint": fp, "settings_fingerprint": same})
    rows = {r[S.ID]: r[S.ERROR_KIND] for r in output.read_output(out, [S.ID, S.ERROR_KIND]).to_pylist()}
    assert rows == {"a": None, "b": None, "c": None, "d": None}
    shards = [n for n in _names(out) if n.startswith(SHARD_PREFIX)]
    assert set(untouched) < set(shards) and len(shards) == 3  # c+d as it was; a alone; b anew
    assert sorted(s["path"] for s in _json(storage.join(out, MANIFEST_FILE))["shards"]) == sorted(shards)
