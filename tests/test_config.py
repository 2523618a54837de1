from pathlib import Path

import pytest

from pipeline.config import DEFAULT_MODEL, InferenceConfig, load_config, resolve_resources
from pipeline.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    # The demo runs offline on the bundled model; every other config uses the production default.
    assert cfg.model.name == ("@demo" if path.stem == "demo" else DEFAULT_MODEL)


def test_the_benchmarks_gpu_job_runs_the_gpu_config(tmp_path):
    """jobs.benchmark --device cuda reads configs/gpu-cluster.yaml, on the benchmark's corpus and model."""
    from jobs.benchmark import job_config

    gpu = load_config(CONFIGS[0].parent / "gpu-cluster.yaml")
    bench = job_config("model", tmp_path / "corpus", tmp_path / "out", "bf16", ["inference.max_replicas=1"], "cuda")
    assert bench.inference.model_dump() == {**gpu.inference.model_dump(), "max_replicas": 1}
    assert (bench.decode, bench.audio) == (gpu.decode, gpu.audio)
    assert (bench.input.path, bench.input.allowed_roots, bench.model.name) == (str(tmp_path / "corpus"), [], "model")
    cpu = job_config("model", tmp_path / "corpus", tmp_path / "out", "bf16", [])
    assert cpu.inference.model_dump() == {**InferenceConfig().model_dump(), "precision": "bf16"}


def test_the_configs_conv_encoders_are_the_models():
    """config.py cannot import the model code (torch): the two lists are kept equal here."""
    from typing import get_args

    from pipeline.model.invariance import CONV_ENCODERS

    assert get_args(InferenceConfig.model_fields["conv_encoder"].annotation) == ("auto", "stock", *CONV_ENCODERS)


def test_names_of_shipped_configs():
    assert {p.stem for p in CONFIGS} >= {"demo", "librispeech", "gpu-cluster"}


def test_overrides_are_yaml_typed_and_win_over_the_file():
    cfg = load_config(CONFIGS[0], ["inference.max_replicas=3", "model.revision=null", "output.overwrite=false"])
    assert cfg.inference.max_replicas == 3 and cfg.model.revision is None and cfg.output.overwrite is False
    assert load_config(overrides=["model.name=x"], **{"model.name": "y"}).model.name == "y"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inference.max_replicas=0"], "inference.max_replicas = 0: Input should be greater than or equal to 1"),
        (["inference.precision=fp16", "inference.gpus_per_replica=0"],
         "inference.precision = 'fp16': needs GPU replicas (inference.gpus_per_replica > 0)"),
        (["inference.precision=int8"],
         "inference.precision = 'int8': Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        (["inference.conv_encoder=cudnn"],
         "inference.conv_encoder = 'cudnn': Input should be 'auto', 'stock', 'chunked' or 'batched'"),
        (["inference.min_replicas=4", "inference.max_replicas=1"],
         "inference.max_replicas = 1: must be >= inference.min_replicas (4)"),
        (["inference.torch_threads=none"], "inference.torch_threads = 'none': Input should be a valid integer"),
        (["input.format=xml"], "input.format = 'xml': Input should be 'auto', 'csv', 'jsonl', 'parquet', 'folder'"),
        (["inference.devise=cpu"], "inference.devise: unknown key"),
        (["inference.device=cuda", "inference.gpus_per_replica=0"],
         "inference.device = cuda: needs inference.gpus_per_replica > 0"),
        (["output.rows_per_shard=many"], "output.rows_per_shard = 'many': Input should be a valid integer"),
        (["output.max_retries=-1"], "output.max_retries = -1: Input should be greater than or equal to 0"),
        (["decode.timeout_s=0"], "decode.timeout_s = 0: Input should be greater than 0"),
        (["decode.max_attempts=0"], "decode.max_attempts = 0: Input should be greater than or equal to 1"),
        (["input.allowed_roots=/data"], "input.allowed_roots = '/data': Input should be a valid list"),
        (["maxreplicas"], "expected KEY=VALUE"),
        (["model=3"], "model = 3: Input should be a valid dictionary"),
    ],
)
def test_errors_name_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("cpus, gpus, sized", [
    (2, 0, (1, 1, 1.0, 0.0, 2, "cpu")),  # one CPU replica whose threads use the node's cores
    (16, 1, (1, 1, 1.0, 1.0, 1, "auto")),  # one replica per GPU
    (16, 8, (8, 8, 1.0, 1.0, 1, "auto")),
    (16, 0.5, (1, 1, 1.0, 0.0, 16, "cpu")),  # a GPU share is no GPU to size replicas by
])
def test_auto_settings_are_sized_from_what_ray_reports(cpus, gpus, sized):
    inf = resolve_resources(load_config(), cpus, gpus).inference
    assert (inf.min_replicas, inf.max_replicas, inf.cpus_per_replica, inf.gpus_per_replica, inf.torch_threads,
            inf.device) == sized


def test_set_settings_are_kept_and_auto_ones_fit_them():
    cfg = load_config(overrides=["inference.max_replicas=2", "inference.cpus_per_replica=4", "inference.device=cpu"])
    inf = resolve_resources(cfg, 16, 8).inference
    assert (inf.min_replicas, inf.max_replicas, inf.gpus_per_replica, inf.torch_threads) == (1, 2, 0.0, 8)
    gpu = resolve_resources(load_config(CONFIGS[0].parent / "gpu-cluster.yaml"), 16, 1).inference
    assert (gpu.min_replicas, gpu.max_replicas, gpu.cpus_per_replica, gpu.torch_threads) == (1, 8, 4.0, 4)
    with pytest.raises(ConfigError, match=r"inference.precision = 'fp16': needs GPU replicas"):
        resolve_resources(load_config(overrides=["inference.precision=fp16"]), 2, 0)
    with pytest.raises(ConfigError, match=r"inference.precision = 'fp16': needs GPU replicas"):
        load_config(overrides=["inference.precision=fp16", "inference.device=cpu"])
    # Asked for GPUs where Ray reports none: GPU replicas still (the resource check then says so).
    cuda = resolve_resources(load_config(overrides=["inference.device=cuda"]), 16, 0).inference
    assert (cuda.gpus_per_replica, cuda.device) == (1.0, "cuda")
    assert load_config(overrides=["inference.max_replicas=auto"]).inference.max_replicas is None
