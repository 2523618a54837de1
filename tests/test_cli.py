"""The command line as a user runs it: a real subprocess, real exit codes and messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import jiwer
import pytest
from helpers import start_transcribe, write_tone_clips

from pipeline import schema as S
from pipeline.output import SUMMARY_FILE, read_output

DEMO_MAX_CER = 0.04  # measured 2.28% over all 40 clips (pipeline/models/demo-wav2vec2/TRAINING.md)


def transcribe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = start_transcribe(*args)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_the_driver_plans_a_job_without_importing_torch(tmp_path):
    """The driver reads the manifest and the model's front end without torch or transformers'
    model code (pipeline.model.spec reads only the feature extractor's settings)."""
    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.engine import plan\n"
        f"p = plan(load_config('configs/demo.yaml', ['output.path={tmp_path / 'out'}']))\n"
        "assert p.front_end.sampling_rate == 16000 and p.front_end.do_normalize, p.front_end\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('transformers.models.wav2vec2.model')))\n"
    )
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_console_script_is_declared():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "transcribe"]
    assert ep.value == "jobs.transcribe:main"


@pytest.mark.integration
def test_joins_a_cluster_with_address(ray_cluster, layer_model, tmp_path):
    write_tone_clips(tmp_path / "clips", [1.0, 2.0, 0.5])
    out = tmp_path / "out"
    proc = transcribe("--input", str(tmp_path / "clips"), "--output", str(out), "--model", str(layer_model),
                      "--address", ray_cluster, "--quiet", "--set", "inference.rows_per_call=2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["rows_in"], summary["rows_out"], summary["errors"]) == (3, 3, 0)
    assert sorted(read_output(out)[S.ID].to_pylist()) == ["clip000.flac", "clip001.flac", "clip002.flac"]


@pytest.mark.integration
def test_demo_config_transcribes_the_heldout_clips_offline(tmp_path):
    """The README's run command: bundled model, bundled clips, Ray in-process, no download."""
    out = tmp_path / "demo"
    proc = transcribe("--config", "configs/demo.yaml", "--output", str(out), "--set", "ray.progress_every_s=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "Started a local Ray instance" in proc.stderr
    # progress is visible while it runs, one line at a time
    assert re.search(r"progress: \d+ of 40 rows \(\d+%\), [\d.]+ h of audio, \d+ audio s/s, ETA ", proc.stderr)
    table = read_output(out)
    assert table.num_rows == 40 and table[S.ERROR].null_count == 40
    assert set(table[S.MODEL].to_pylist()) == {"@demo"}
    cer = jiwer.cer(table[S.REFERENCE].to_pylist(), table[S.TRANSCRIPT].to_pylist())
    print(f"demo CER over the held-out clips: {cer:.2%}")
    assert cer < DEMO_MAX_CER  # real English words, not noise
    # Timed from the command's start: its imports and config are the "setup" phase, before the plan.
    summary = json.loads((out / SUMMARY_FILE).read_text())
    phases = summary["phases_s"]
    assert list(phases) == ["setup", "plan", "ray_start", "run", "ray_stop"] and phases["setup"] > 0.3
    assert sum(phases.values()) == pytest.approx(summary["wall_s"], abs=0.01)
    assert phases["setup"] + phases["plan"] + phases["ray_start"] < summary["replicas"]["first_batch_s"]
    rerun = transcribe("--config", "configs/demo.yaml", "--output", str(out), "-q")
    assert rerun.returncode == 0, rerun.stderr  # demo.yaml sets output.overwrite


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--input", "@sample", "--set", "inference.max_replicas=0"], 2,
         "transcribe: error: invalid config: inference.max_replicas = 0: Input should be greater than or equal to 1"),
        (["--input", "@sample", "--set", "decode.rows_per_tsk=3"], 2, "decode.rows_per_tsk: unknown key"),
        (["--input", "@sample", "--model", "/no/such/model"], 1,
         "model.name = '/no/such/model': cannot load its feature extractor"),
        (["--input", "@sample", "--model", "@nope"], 2,
         "model.name = '@nope': unknown bundled name; use one of @demo"),
        (["--input", "/no/such/manifest.csv"], 1, "--input /no/such/manifest.csv: no such file"),
        (["--input", "@sample", "--set", "decode.function=no_such_module:decode"], 1,
         "decode.function = 'no_such_module:decode': cannot import it (No module named 'no_such_module')"),
        (["--input", "@sample", "--set", "decode.function=pipeline.audio"], 2,
         "decode.function = 'pipeline.audio': String should match pattern"),
    ],
)
def test_systemic_failures_exit_nonzero_with_one_line(args, code, message, tmp_path):
    proc = transcribe(*args, "--output", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr
    assert not (tmp_path / "out" / "_summary.json").exists()


def test_output_that_is_a_file_is_refused(tmp_path, group_model):
    (tmp_path / "taken").write_text("x")
    proc = transcribe("--input", "@sample", "--output", str(tmp_path / "taken"), "--model", str(group_model))
    assert proc.returncode == 1
    assert "exists and is not a folder" in proc.stderr


@pytest.mark.integration
def test_a_run_where_every_row_failed_exits_1_after_committing_and_again_on_rerun(tmp_path):
    """A scheduler must notice a run that transcribed nothing (output.max_error_fraction, default 1.0)."""
    (tmp_path / "m.csv").write_text("id,path\na,gone/a.wav\nb,gone/b.wav\n")
    args = ("--input", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out"), "--model", "@demo", "-q")
    for _ in range(2):  # the rerun finds the finished output, and fails again
        proc = transcribe(*args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"transcribe: error: 2 of 2 rows are error rows (not_found 2), at least output.max_error_fraction = 1 "
            f"of them; the output is committed in {tmp_path / 'out'} (see _summary.json)")
    assert (tmp_path / "out" / "_manifest.json").exists()


@pytest.mark.parametrize("offline, reason", [
    (None, "http://127.0.0.1:9 is unreachable (Connection refused); run once where the hub is reachable, or pass "
           "--model DIR (a local checkpoint folder)"),
    ("1", "HF_HUB_OFFLINE is set; download it once with network, or pass --model DIR"),
])
def test_a_hub_model_neither_cached_nor_reachable_fails_at_once(tmp_path, monkeypatch, offline, reason):
    """Instead of the hub client's minute of retries: one line, within seconds."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    started = time.monotonic()
    proc = transcribe("--input", "@sample", "--output", str(tmp_path / "out"), "--model", "nobody/nothing",
                      timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 30
    assert proc.stderr.strip().splitlines() == [
        f"transcribe: error: model.name = 'nobody/nothing': not in the local Hugging Face cache, and {reason}"]


@pytest.mark.integration
def test_quiet_prints_warnings_and_the_summary_only(tmp_path):
    """--quiet: no INFO lines (Ray's, Ray Data's, the job's), no progress, no "Loading weights" bars
    from the replicas, no notice of token authentication. (Ray's C++ core still prints one line on
    the replicas' constructor arguments: ray-project/ray#53727.)"""
    proc = transcribe("--input", "@sample", "--output", str(tmp_path / "out"), "--model", "@demo", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows_out"] == 6
    assert not re.search(r"\bINFO\b", proc.stderr), proc.stderr
    for noise in ("Loading weights", "Token authentication", "Progress bars disabled", "progress:"):
        assert noise not in proc.stderr, noise
    assert len(proc.stderr.strip().splitlines()) <= 1, proc.stderr
    again = transcribe("--input", "@sample", "--output", str(tmp_path / "out"), "--model", "@demo", "-q")
    assert again.returncode == 0 and json.loads(again.stdout)["already_complete"] is True  # not a new run's
    assert "already holds the finished result of this job (6 rows); nothing to do" in again.stderr
