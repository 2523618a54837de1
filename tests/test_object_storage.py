"""The job on an S3-compatible object store: a real server (moto's) on 127.0.0.1, the command line as
a user runs it with the standard AWS variables, input and output as ``s3://`` URIs; the same rows as
on disk, nothing lost through a server restart or a killed driver."""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pytest
from faulty_decoder import FUNCTION, HANG_MARKER
from helpers import start_transcribe
from moto.server import ThreadedMotoServer

from pipeline import schema as S
from pipeline.bundled import input_path
from pipeline.errors import ErrorKind
from pipeline.output import MANIFEST_FILE, SHARD_PREFIX, SUMMARY_FILE, WORK_DIR, read_output

pytestmark = pytest.mark.integration

HELDOUT = Path(input_path("@heldout")).parent
FP32 = ["--config", "configs/demo.yaml", "--set", "inference.precision=fp32", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1 in this process (its objects outlive a restart), and the AWS
    variables that point the job, and this process's readers, at it."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.secret = f"secret-{secrets.token_hex(8)}"  # must never appear in what the job prints or writes
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": self.secret,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def client(self):
        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key=self.secret)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # read_output in this process reads through the same chain
    client = server.client()
    client.create_bucket(Bucket="corpus")
    for f in sorted(HELDOUT.iterdir()):
        if f.name != "manifest.csv":
            client.upload_file(str(f), "corpus", f"clips/{f.name}")
    # The bundled manifest, its paths relative to its own location, plus a row whose object is missing.
    lines = (HELDOUT / "manifest.csv").read_text().splitlines()
    rows = [",".join([r.split(",")[0], "clips/" + r.split(",")[1], *r.split(",")[2:]]) for r in lines[1:]]
    body = "\n".join([lines[0], *rows, "gone,clips/gone.flac,GONE,16k,none"]) + "\n"
    client.put_object(Bucket="corpus", Key="sets/manifest.csv", Body=body.replace(",clips/", ",../clips/").encode())
    yield server
    server.server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def transcribe(s3: S3Server, *args: str, **kw):
    """The command line, with the AWS variables (the fixture put them in this process's environment)."""
    assert os.environ["AWS_ENDPOINT_URL"] == s3.env["AWS_ENDPOINT_URL"]
    return start_transcribe(*args, **kw)


def run(s3: S3Server, *args: str, timeout: float = 300) -> str:
    proc = transcribe(s3, *args)
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    assert s3.secret not in stdout + stderr
    return stderr


def by_name(table) -> dict[str, str]:
    """Transcripts by file name (ids differ between a manifest and a folder listing)."""
    return {p.rsplit("/", 1)[-1]: t for p, t in zip(table[S.PATH].to_pylist(), table[S.TRANSCRIPT].to_pylist(),
                                                     strict=True)}


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory) -> dict[str, str]:
    """The same clips transcribed from the bundled manifest on disk, to a local folder."""
    out = tmp_path_factory.mktemp("disk") / "out"
    proc = start_transcribe(*FP32, "--output", str(out))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return by_name(read_output(out))


def test_a_manifest_in_object_storage_to_an_output_in_object_storage(s3, on_disk):
    out = "s3://results/manifest-run"
    s3.client().create_bucket(Bucket="results")
    run(s3, *FP32, "--input", "s3://corpus/sets/manifest.csv", "--output", out)
    table = read_output(out)
    assert table.num_rows == 41 and len(set(table[S.ID].to_pylist())) == 41
    gone = table.filter(pc.equal(table[S.ID], "gone")).to_pylist()[0]
    assert gone[S.PATH] == "s3://corpus/clips/gone.flac"  # relative to the manifest's own location
    assert (gone[S.ERROR_KIND], gone[S.ERROR_STAGE]) == (ErrorKind.NOT_FOUND, "decode")
    assert gone[S.ERROR] == "not_found: s3://corpus/clips/gone.flac: no such object"
    ok = table.filter(pc.is_null(table[S.ERROR_KIND]))
    assert by_name(ok) == on_disk  # the same transcripts, row for row, as from the local disk

    keys = s3.keys("results", "manifest-run/")
    shards = [k for k in keys if k.startswith(f"manifest-run/{SHARD_PREFIX}")]
    listed = json.loads(s3.client().get_object(Bucket="results", Key=f"manifest-run/{MANIFEST_FILE}")["Body"].read())
    assert sorted(f"manifest-run/{s['path']}" for s in listed["shards"]) == shards and listed["rows"] == 41
    assert f"manifest-run/{SUMMARY_FILE}" in keys and not [k for k in keys if f"/{WORK_DIR}/" in k]
    summary = s3.client().get_object(Bucket="results", Key=f"manifest-run/{SUMMARY_FILE}")["Body"].read().decode()
    assert s3.secret not in summary  # the effective config it records holds no credential

    stderr = run(s3, *FP32, "--input", "s3://corpus/sets/manifest.csv", "--output", out, "--set",
                 "output.overwrite=false")
    assert "nothing to do" in stderr and s3.keys("results", "manifest-run/") == keys
    other = transcribe(s3, *FP32, "--input", "s3://corpus/sets/manifest.csv", "--output", out,
                       "--set", "output.overwrite=false", "--set", "audio.max_duration_s=30")
    _, stderr = other.communicate(timeout=120)
    assert other.returncode == 1 and "holds a finished run of another input" in stderr.strip().splitlines()[-1]


def test_a_prefix_as_input_through_a_server_restart(s3, on_disk, tmp_path):
    """Every object below the prefix is a row; the server goes away for seconds mid-run and every
    read and write is retried: no error row, nothing lost."""
    out = "s3://restart/out"
    s3.client().create_bucket(Bucket="restart")
    slow = ["--set", "decode.rows_per_task=1", "--set", "inference.rows_per_call=2", "--set", "output.rows_per_shard=2"]
    proc = transcribe(s3, *FP32, *slow, "--input", "s3://corpus/clips/", "--output", out)
    deadline = time.monotonic() + 120
    while not [k for k in s3.keys("restart") if SHARD_PREFIX in k] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the server could be restarted"
    s3.server.stop()
    time.sleep(10)  # longer than the AWS SDK's own retries last (~6 s): the job's retries must bridge it
    s3.server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3.port, verbose=False)
    s3.server.start()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    table = read_output(out)
    assert table.num_rows == 40 and table[S.ERROR_KIND].null_count == 40, table.filter(
        pc.is_valid(table[S.ERROR_KIND]))[S.ERROR].to_pylist()
    assert sorted(table[S.ID].to_pylist()) == sorted(on_disk)  # ids: the keys below the prefix
    assert by_name(table) == on_disk


def test_a_killed_driver_resumes_on_object_storage(s3):
    """Killed mid-run, the same command transcribes only the rows no shard holds."""
    client = s3.client()
    client.create_bucket(Bucket="resume")
    names = sorted(f.name for f in HELDOUT.iterdir() if f.suffix == ".flac")[:12]
    hanging = [f"zz{HANG_MARKER}{i}.flac" for i in range(3)]  # sorted last: the run is busy with them
    for name, source in [*zip(names, names, strict=True), *((h, names[0]) for h in hanging)]:
        client.copy_object(Bucket="resume", Key=f"in/{name}", CopySource={"Bucket": "corpus", "Key": f"clips/{source}"})
    args = [*FP32, "--input", "s3://resume/in/", "--output", "s3://resume/out", "--set", "output.overwrite=false",
            "--set", f"decode.function={FUNCTION}", "--set", "decode.rows_per_task=2",
            "--set", "output.rows_per_shard=2", "--set", "inference.rows_per_call=2"]
    first = transcribe(s3, *args, "--set", "decode.timeout_s=60", start_new_session=True)
    deadline = time.monotonic() + 120
    while len([k for k in s3.keys("resume", "out/") if SHARD_PREFIX in k]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done_before = read_output("s3://resume/out").num_rows
    assert 0 < done_before < 15 and not [k for k in s3.keys("resume", "out/") if k.endswith(SUMMARY_FILE)]

    run(s3, *args, "--set", "decode.timeout_s=2")
    summary = json.loads(client.get_object(Bucket="resume", Key=f"out/{SUMMARY_FILE}")["Body"].read())
    assert summary["resumed"] and (summary["rows_out"], summary["lost"], summary["duplicated"]) == (15, 0, 0)
    assert summary["errors_by_kind"] == {ErrorKind.TIMEOUT: 3}
    counts = collections.Counter(read_output("s3://resume/out")[S.ID].to_pylist())
    assert set(counts) == {*names, *hanging} and set(counts.values()) == {1}
