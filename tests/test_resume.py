"""Killed processes lose no row: a SIGKILLed driver resumes, a killed inference actor is replaced.

Both runs are slowed by files that hang the decoder until ``decode.timeout_s`` (the test-only
decode function, ``faulty_decoder``), so there is time to kill something mid-run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faulty_decoder import FUNCTION, HANG_MARKER
from helpers import start_transcribe, write_tone_clips

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.engine import run_job
from pipeline.errors import ErrorKind, JobError
from pipeline.output import MANIFEST_FILE, SHARD_PREFIX, SUMMARY_FILE, WORK_DIR, read_output

pytestmark = pytest.mark.integration  # a real local Ray cluster

SETTINGS = [f"decode.function={FUNCTION}", "decode.timeout_s=2", "decode.rows_per_task=3", "output.rows_per_shard=3",
            "inference.rows_per_call=3", "ray.progress_bars=false"]


def slow_corpus(root: Path, clips: int = 24, hanging: int = 5) -> tuple[Path, set[str]]:
    """``clips`` short clips, ``hanging`` of them named so that their decode hangs (→ timeout rows).

    The hanging ones sort last: the run is still busy with them for seconds after its first shards
    are committed. (Sorted first, they could finish together, after which the fast rows took
    under a second: a killer polling for committed shards then sometimes found the run complete.)
    """
    paths = write_tone_clips(root / "clips", [0.5 + 0.1 * (i % 7) for i in range(clips)])
    for i in range(hanging):
        paths[i * 4].rename(paths[i * 4].with_name(f"zz{HANG_MARKER}{i}.flac"))
    files = sorted((root / "clips").iterdir())
    (root / "manifest.csv").write_text("id,path\n" + "".join(f"{f.stem},clips/{f.name}\n" for f in files))
    return root / "manifest.csv", {f.stem for f in files}


def committed_shards(out: Path) -> int:
    return len(list(out.glob(f"{SHARD_PREFIX}*.parquet")))


def assert_each_id_once(out: Path, ids: set[str]) -> None:
    counts = collections.Counter(read_output(out)[S.ID].to_pylist())
    assert set(counts) == ids and set(counts.values()) == {1}, counts
    on_disk = sorted(f.name for f in out.glob("*.parquet"))
    assert not list(out.glob(".*.tmp"))
    listed = sorted(s["path"] for s in json.loads((out / MANIFEST_FILE).read_text())["shards"])
    assert on_disk == listed  # no orphan shard beside the committed ones
    assert not (out / WORK_DIR).exists()


def replica_pids() -> list[int]:
    """Processes of the inference replicas (Ray titles them ``ray::MapWorker(...TranscribeStage...)``;
    the state API would need the dashboard, which the test cluster does not start)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"TranscribeStage" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def transcribe(manifest: Path, out: Path, *args: str, **kw) -> subprocess.Popen:
    settings = [arg for item in SETTINGS for arg in ("--set", item)]
    return start_transcribe("--input", str(manifest), "--output", str(out), "--model", "@demo",
                            "--set", "ray.num_cpus=2", *settings, *args, **kw)


def test_sigkilled_driver_resumes_and_a_finished_run_writes_nothing(tmp_path):
    manifest, ids = slow_corpus(tmp_path)
    out = tmp_path / "out"
    # Hangs of 60 s keep the first run busy until it is killed, and would hold back every shard
    # if a decode task stuck in a file could starve the shard writer of a CPU (it once did).
    first = transcribe(manifest, out, "--set", "decode.timeout_s=60", start_new_session=True)
    deadline = time.monotonic() + 120
    while committed_shards(out) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the run ended before it could be killed: " + first.communicate()[1][-2000:]
    os.kill(first.pid, signal.SIGKILL)  # the driver only; its Ray processes notice and exit
    first.wait()
    done_before = len(read_output(out))
    assert 0 < done_before < len(ids) and not (out / SUMMARY_FILE).exists()

    second = transcribe(manifest, out)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["resumed"] and summary["rows_out"] == len(ids) and summary["lost"] == summary["duplicated"] == 0
    assert summary["errors_by_kind"] == {ErrorKind.TIMEOUT: 5}
    assert_each_id_once(out, ids)
    print(f"\nkilled after {done_before} of {len(ids)} rows; the rerun wrote the other {len(ids) - done_before}")

    files = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    third = transcribe(manifest, out)
    _, stderr = third.communicate(timeout=300)
    assert third.returncode == 0 and "nothing to do" in stderr, stderr[-2000:]
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == files


def test_a_killed_inference_actor_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    manifest, ids = slow_corpus(tmp_path)
    out = tmp_path / "out"
    cfg = load_config(overrides=SETTINGS, **{"input.path": str(manifest), "output.path": str(out),
                                             "model.name": "@demo"})
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(cfg)), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while committed_shards(out) < 2 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    actors = replica_pids()
    assert job.is_alive() and len(actors) == 1, actors
    os.kill(actors[0], signal.SIGKILL)
    job.join(timeout=300)
    assert "summary" in result, "the job did not finish"
    summary = result["summary"]
    assert summary["rows_out"] == len(ids) and summary["lost"] == summary["duplicated"] == 0
    assert_each_id_once(out, ids)


def test_an_output_that_breaks_the_invariant_gets_no_manifest(ray_cluster, tmp_path):
    """A duplicated shard (as if copied in by hand) is caught at commit: exit with an error, and no
    _manifest.json, so no reader takes the folder for a result."""
    paths = write_tone_clips(tmp_path / "clips", [0.6, 0.8, 1.0, 1.2])
    out = tmp_path / "out"
    cfg = load_config(overrides=["ray.progress_bars=false", "output.rows_per_shard=2"],
                      **{"input.path": str(tmp_path / "clips"), "output.path": str(out), "model.name": "@demo"})
    assert run_job(cfg)["rows_out"] == len(paths)
    # Turn the finished run back into an unfinished one that holds a duplicated shard.
    fingerprint = json.loads((out / SUMMARY_FILE).read_text())["fingerprint"]
    (out / MANIFEST_FILE).unlink()
    (out / SUMMARY_FILE).unlink()
    (out / WORK_DIR).mkdir()
    (out / WORK_DIR / "input.json").write_text(json.dumps({"fingerprint": fingerprint}))
    shard = sorted(out.glob(f"{SHARD_PREFIX}*.parquet"))[0]
    (out / f"{SHARD_PREFIX}copy.parquet").write_bytes(shard.read_bytes())
    with pytest.raises(JobError, match=r"0 ids lost, 2 duplicated"):
        run_job(cfg)
    assert not (out / MANIFEST_FILE).exists()
    assert json.loads((out / SUMMARY_FILE).read_text())["duplicated"] == 2


def test_a_grown_corpus_and_retried_errors_update_a_finished_run(tmp_path):
    """A file missing at the first run is there now, and the corpus grew: the rerun with
    --retry-errors transcribes that row and the new one only; shards without error rows stay."""
    paths = write_tone_clips(tmp_path / "clips", [0.5 + 0.1 * i for i in range(8)])
    late = paths[3].rename(tmp_path / "late.flac")  # not there yet at the first run
    manifest, out = tmp_path / "manifest.csv", tmp_path / "out"
    rows = [f"{p.stem},clips/{p.name}\n" for p in paths[:7]]
    manifest.write_text("id,path\n" + "".join(rows))
    args = ["--input", str(manifest), "--output", str(out), "--model", "@demo", "--set", "output.rows_per_shard=2",
            "--set", "inference.rows_per_call=2", "--set", "decode.rows_per_task=2", "-q"]
    first = start_transcribe(*args)
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    before = read_output(out).to_pylist()
    assert {r[S.ID]: r[S.ERROR_KIND] for r in before if r[S.ERROR_KIND]} == {paths[3].stem: ErrorKind.NOT_FOUND}
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob(f"{SHARD_PREFIX}*.parquet")}
    held_error = [n for n in stamps if paths[3].stem in pq.read_table(out / n)[S.ID].to_pylist()]

    late.rename(paths[3])
    manifest.write_text("id,path\n" + "".join([*rows, f"{paths[7].stem},clips/{paths[7].name}\n"]))
    second = start_transcribe(*args, "--retry-errors")
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-2000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["updated"] and (summary["rows_out"], summary["errors"], summary["lost"], summary["duplicated"]) \
        == (8, 0, 0, 0)
    assert_each_id_once(out, {p.stem for p in paths})
    after = {f.name: f.stat().st_mtime_ns for f in out.glob(f"{SHARD_PREFIX}*.parquet")}
    assert {n: after[n] for n in stamps if n not in held_error} == {n: t for n, t in stamps.items()
                                                                     if n not in held_error}  # untouched
    assert not set(held_error) & set(after)  # the shard that held the error row was replaced
    old = {r[S.ID]: r[S.TRANSCRIPT] for r in before if not r[S.ERROR_KIND]}
    new = {r[S.ID]: r[S.TRANSCRIPT] for r in read_output(out).to_pylist()}
    assert {k: new[k] for k in old} == old
