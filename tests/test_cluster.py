"""The job as a scheduled batch job on a Ray cluster of two nodes on this machine, each started with
``ray start`` as a user does (token authentication on, the dashboard on 127.0.0.1), submitted with
``ray job submit``: rows spread over both nodes, a node killed mid-run loses nothing, and a driver
without the cluster's token is told what to do in one line."""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT

from pipeline import schema as S
from pipeline.output import MANIFEST_FILE, SHARD_PREFIX, SUMMARY_FILE, read_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
JOB = ["--model", "@demo", "--input", "@heldout", "--set", "decode.rows_per_task=1", "--set",
       "inference.rows_per_call=2", "--set", "output.rows_per_shard=2", "--set", "inference.precision=fp32",
       "--set", "ray.progress_bars=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodes:
    """A head (the dashboard and job API on 127.0.0.1) and a worker node, 2 CPUs each."""

    def __init__(self) -> None:
        """Start the nodes; this process's environment must hold the token (:func:`cluster`)."""
        self.gcs, self.dashboard_port = _free_port(), _free_port()
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = {**os.environ,
                    # A dead node is noticed within ~2 s, not Ray's default ~30 s.
                    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
        self.env.pop("RAY_ADDRESS", None)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.worker: subprocess.Popen | None = None
        self.head = self._start("--head", f"--port={self.gcs}", "--include-dashboard=true",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                f"--temp-dir={self.temp}")
        try:
            self._wait(self._dashboard_up, "the head's dashboard")
            self.worker = self.start_worker()
        except BaseException:
            self.stop()
            raise

    def _start(self, *args: str) -> subprocess.Popen:
        # Ports of our own: Ray's fixed defaults (e.g. the dashboard agent's 52365) are taken by the
        # test session's Ray and by the other node, and a node whose agent cannot bind takes no jobs.
        ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port")]
        return subprocess.Popen([RAY, "start", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", *ports, *args], env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_worker(self) -> subprocess.Popen:
        worker = self._start(f"--address=127.0.0.1:{self.gcs}")
        self._wait(lambda: len(self.alive_nodes()) == 2, "the worker node")
        return worker

    @staticmethod
    def _wait(ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, f"{what} did not start within {timeout:g} s"
            time.sleep(0.5)

    def _dashboard_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:
            return True  # it answers: 401 without the token
        except OSError:
            return False
        return True

    def _ray(self, *args: str) -> subprocess.CompletedProcess:
        """The ``ray`` command line against this cluster. Not Ray's Python clients in this process: it
        may hold the test session's own Ray and token, which they would use instead."""
        return subprocess.run([RAY, *args, "--address", self.dashboard], env=self.env, capture_output=True,
                              text=True, timeout=120)

    def _list(self, resource: str, *args: str) -> list[dict]:
        """``ray list RESOURCE`` as JSON."""
        proc = self._ray("list", resource, "--format", "json", *args)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        # Nothing until the state API answers, some seconds after the head starts.
        return json.loads(lines[-1]) if proc.returncode == 0 and lines else []

    def worker_node(self) -> str:
        (node,) = [n["node_id"] for n in self._list("nodes") if n["state"] == "ALIVE" and not n["is_head_node"]]
        return node

    def alive_nodes(self) -> list[str]:
        return [n["node_id"] for n in self._list("nodes") if n["state"] == "ALIVE"]

    def submit(self, submission_id: str, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
        """``ray job submit`` of the ``transcribe`` command line from the checkout, as the README shows
        it (``--working-dir .``: the job's relative paths, e.g. ``--config configs/…``, resolve there)."""
        command = [RAY, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                   "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
                   *([] if wait else ["--no-wait"]), "--", "transcribe", *args]
        for _ in range(60):  # the job agent starts some seconds after the dashboard
            proc = subprocess.Popen(command, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                stdout, stderr = proc.communicate(timeout=300 if wait else 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                raise AssertionError(f"ray job submit did not return:\n{stdout[-2000:]}\n{stderr[-2000:]}") from None
            if "No available agent" not in stdout + stderr:
                return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
            time.sleep(0.5)
        raise AssertionError("the job API never accepted the job")

    def tasks_by_node(self, submission_id: str) -> dict[str, set[str]]:
        (job_id,) = [j["job_id"] for j in self._list("jobs") if j.get("submission_id") == submission_id]
        by_name: dict[str, set[str]] = collections.defaultdict(set)
        for task in self._list("tasks", "--filter", f"job_id={job_id}", "--detail", "--limit", "10000"):
            if task.get("node_id"):
                by_name[task["name"]].add(task["node_id"])
        return by_name

    def status(self, submission_id: str) -> str:
        found = [j["status"] for j in self._list("jobs") if j.get("submission_id") == submission_id]
        return found[0] if found else "UNKNOWN"

    def wait_for(self, submission_id: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(submission_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, (f"{submission_id} still {status} after {timeout:g} s:\n"
                                                 + self.logs(submission_id)[-3000:])
            time.sleep(0.5)
        return status

    def logs(self, submission_id: str) -> str:
        return self._ray("job", "logs", submission_id).stdout

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                _kill(proc, signal.SIGTERM)
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill(proc: subprocess.Popen, sig: int) -> None:
    """Signal the node's whole process group (``ray start --block``, its raylet and workers)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    # For the nodes, and this process's clients of the job and state APIs.
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    nodes = None
    try:
        nodes = TwoNodes()
        yield nodes
    finally:
        if nodes is not None:
            nodes.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_each_id_once(out: Path, rows: int) -> None:
    counts = collections.Counter(read_output(out)[S.ID].to_pylist())
    assert len(counts) == rows and set(counts.values()) == {1}, counts
    listed = sorted(s["path"] for s in json.loads((out / MANIFEST_FILE).read_text())["shards"])
    assert sorted(p.name for p in out.glob(f"{SHARD_PREFIX}*.parquet")) == listed


def test_a_submitted_job_runs_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "out"
    proc = cluster.submit("spread", "--config", "configs/demo.yaml", *JOB, "--output", str(out), wait=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cluster.wait_for("spread", timeout=300) == "SUCCEEDED", cluster.logs("spread")[-3000:]
    assert_each_id_once(out, 40)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (summary["rows_out"], summary["errors"], summary["lost"], summary["duplicated"]) == (40, 0, 0, 0)
    nodes = cluster.tasks_by_node("spread")
    assert nodes["MapBatches(CountedDecodeStage)"] == set(cluster.alive_nodes()), nodes  # rows decoded on both


def test_a_node_killed_mid_run_loses_no_row(cluster, tmp_path):
    """The worker node dies (its raylet and every worker on it, SIGKILL) once shards are committed:
    Ray retries its tasks and restarts its replica on the head, and the job finishes there."""
    out = tmp_path / "out"
    proc = cluster.submit("node-kill", *JOB, "--output", str(out), wait=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    deadline = time.monotonic() + 300
    while len(list(out.glob(f"{SHARD_PREFIX}*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.status("node-kill") == "RUNNING", cluster.logs("node-kill")[-3000:]
    killed = cluster.worker_node()
    _kill(cluster.worker, signal.SIGKILL)
    status = cluster.wait_for("node-kill")
    try:
        assert status == "SUCCEEDED", cluster.logs("node-kill")[-3000:]
        assert_each_id_once(out, 40)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        assert (summary["rows_out"], summary["lost"], summary["duplicated"]) == (40, 0, 0)
        cluster._wait(lambda: killed not in cluster.alive_nodes(), "the killed node's death")  # it was killed
        ran = cluster.tasks_by_node("node-kill")
        assert killed in ran["MapBatches(CountedDecodeStage)"], ran  # the dead node held some of the job's work
    finally:
        cluster.worker = cluster.start_worker()  # for the tests after this one


def test_a_driver_without_the_clusters_token_is_told_what_to_do(cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.transcribe", "--address", f"127.0.0.1:{cluster.gcs}", *JOB,
         "--output", str(tmp_path / "out")], cwd=ROOT, env={**env, "RAY_AUTH_MODE": "disabled"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert re.match(rf"transcribe: error: ray.address = 127.0.0.1:{cluster.gcs}: the cluster uses Ray's token "
                    r"authentication and refused this process \(RAY_AUTH_MODE = disabled\); set "
                    r"RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN", last), last
    assert "Traceback" not in stderr
