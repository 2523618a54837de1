"""Session fixtures: one local Ray cluster, small real models, real audio files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).parent)
sys.path.insert(0, TESTS)

from helpers import make_ctc_model  # noqa: E402

# Keep the tests offline and quiet: no hub look-ups, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray's workers and the decoding processes import the test-only decoder (faulty_decoder) from here;
# set before Ray starts, so its workers inherit it.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session; yields its address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def group_model(tmp_path_factory) -> Path:
    """wav2vec2-base-960h's kind: group-norm front end, no attention mask."""
    return make_ctc_model(tmp_path_factory.mktemp("models") / "group", norm="group")


@pytest.fixture(scope="session")
def layer_model(tmp_path_factory) -> Path:
    """The large/lv60 kind: layer-norm front end, attention mask."""
    return make_ctc_model(tmp_path_factory.mktemp("models") / "layer", norm="layer")
