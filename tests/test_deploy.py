"""deploy/: the KubeRay RayJob runs a command line our parser accepts, on pods sized for
configs/gpu-cluster.yaml, from the image deploy/Dockerfile builds. No Kubernetes here: the files are
read and checked against the code."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from helpers import ROOT
from packaging.specifiers import SpecifierSet

from jobs.transcribe import config, parse_args
from pipeline import storage

RAYJOB = ROOT / "deploy" / "rayjob.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def rayjob() -> dict:
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return job


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_the_entrypoint_is_a_valid_command_line_against_object_storage(rayjob, monkeypatch):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "transcribe"
    monkeypatch.chdir(ROOT)  # the image's working directory holds configs/ as the checkout does
    cfg = config(parse_args(argv[1:]))
    assert storage.is_uri(cfg.input.path) and storage.is_uri(cfg.output.path)
    roots = cfg.input.allowed_roots
    assert roots and any(cfg.input.path.startswith(root) for root in roots)  # the manifest's rows may be read
    assert cfg.ray.address is None  # Ray's job API sets RAY_ADDRESS: the job joins the RayJob's cluster


def test_pods_match_the_gpu_cluster_config(rayjob, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = config(parse_args(shlex.split(rayjob["spec"]["entrypoint"])[1:]))
    inf, decode = cfg.inference, cfg.decode
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == inf.gpus_per_replica == 1  # one replica per GPU worker
    assert _cpus(limits["cpu"]) >= inf.cpus_per_replica + decode.cpus_per_task  # and CPUs left to decode
    assert (group["minReplicas"], group["maxReplicas"]) == (inf.min_replicas, inf.max_replicas)
    assert worker["resources"]["requests"] == limits
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no decode or replica on the head
    assert head["image"] == worker["image"]
    for container in (head, worker):  # credentials from a secret, on every pod that reads or writes
        assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["s3-credentials"]


def test_the_image_installs_the_package_with_the_cluster_extra_and_ray_matches(rayjob):
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["transcribe"\]$', text, re.M)
    assert 'pip install --no-cache-dir ".[cluster]"' in text
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    assert {"pipeline", "jobs", "configs", "pyproject.toml"} <= copied
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[argv.index("--config") + 1].split("/")[0] in copied
    image_ray = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)-", text).group(1)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == image_ray
    pin = re.search(r'"ray\[data\]([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert image_ray in SpecifierSet(pin)  # the image's Ray is one the package accepts
