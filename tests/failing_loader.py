"""A test-only transcriber loader for ``run_job(load=...)`` that fails in every replica, as a model
present on the driver's disk but not on the workers' would (importable by Ray's workers: conftest
puts tests/ on their PYTHONPATH)."""

from __future__ import annotations

MISSING = "/models/on-the-driver-only/model.safetensors"


class FailingLoader:
    def __call__(self):
        raise FileNotFoundError(2, "No such file or directory", MISSING)

    def __repr__(self) -> str:
        return "FailingLoader()"
