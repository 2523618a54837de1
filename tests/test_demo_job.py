"""What only a trained model can show, through the whole job: the bundled demo model on its held-out
clips. Resampling, downmixing, lossy codecs and batching must leave real words intact."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from pipeline import bundled
from pipeline import schema as S
from pipeline.config import load_config
from pipeline.engine import run_job
from pipeline.model.reference import Reference
from pipeline.output import read_output
from tools import demo_model

pytestmark = pytest.mark.integration  # a real local Ray cluster

HELDOUT = Path(bundled.input_path("@heldout"))
# Thresholds set from the measured figures (printed by the tests; see TRAINING.md) plus a margin.
MAX_CER_16K, MAX_WER_16K = 0.035, 0.10  # measured 2.77%, 7.87% (issue 3 target: 3%, 10%)
MAX_CER_CONVERTED_VS_ORIGINAL = 0.04  # measured 2.29% (8 kHz), 0% (others)
MAX_BF16_CER_VS_FP32 = 0.02  # measured 0 of 40 changed (3 with the stage-1 weights)


def run(ray_cluster, manifest: Path, out: Path, *overrides: str) -> dict[str, dict]:
    """The job on the demo model on CPU replicas in fp32, as the seed path runs, unless ``overrides``
    say otherwise."""
    cfg = load_config(overrides=["ray.progress_bars=false", "inference.device=cpu", "inference.precision=fp32",
                                 *overrides],
                      **{"input.path": str(manifest), "output.path": str(out), "model.name": "@demo"})
    run_job(cfg)
    return {r[S.ID]: r for r in read_output(out).to_pylist()}


@pytest.fixture(scope="module")
def heldout_run(ray_cluster, tmp_path_factory) -> dict[str, dict]:
    return run(ray_cluster, HELDOUT, tmp_path_factory.mktemp("demo") / "out")


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return demo_model.read_manifest(HELDOUT)


def test_heldout_error_rates_through_the_job_and_the_seed_path(heldout_run, manifest):
    assert len(heldout_run) == len(manifest) == 40
    assert all(r[S.ERROR] is None for r in heldout_run.values())
    originals = [m for m in manifest if m["condition"] == "16k"]
    refs = [m["text"] for m in originals]
    job = [heldout_run[m["id"]][S.TRANSCRIPT] for m in originals]
    seed = Reference.from_pretrained(bundled.model_path("@demo")).transcribe(
        [demo_model.load_for_reference(HELDOUT.parent / m["path"]) for m in originals])
    cer, wer = jiwer.cer(refs, job), jiwer.wer(refs, job)
    all_cer = jiwer.cer([m["text"] for m in manifest], [heldout_run[m["id"]][S.TRANSCRIPT] for m in manifest])
    print(f"\ndemo model, {len(originals)} held-out 16 kHz clips through the job: CER {cer:.2%}, WER {wer:.2%}; "
          f"seed code path: CER {jiwer.cer(refs, seed):.2%}, WER {jiwer.wer(refs, seed):.2%}; "
          f"all 40 clips through the job: CER {all_cer:.2%}")
    assert cer <= MAX_CER_16K and wer <= MAX_WER_16K
    # The job's decode (soundfile, soxr, float32 normalisation) and its batches change nothing.
    assert jiwer.cer(seed, job) <= 0.01


def test_converted_copies_read_like_their_16k_originals(heldout_run, manifest):
    converted = [m for m in manifest if m["condition"] != "16k"]
    assert {m["condition"] for m in converted} == {"8k", "44k_stereo", "mp3", "ogg"}
    for condition in ("8k", "44k_stereo", "mp3", "ogg"):
        rows = [m for m in converted if m["condition"] == condition]
        originals = [heldout_run[m["id"][: len("heldout-00")]][S.TRANSCRIPT] for m in rows]
        copies = [heldout_run[m["id"]][S.TRANSCRIPT] for m in rows]
        drift = jiwer.cer(originals, copies)
        print(f"{condition}: CER vs the 16 kHz originals {drift:.2%}")
        assert drift <= MAX_CER_CONVERTED_VS_ORIGINAL, list(zip(originals, copies, strict=True))
    stereo = [r for r in heldout_run.values() if r[S.ID].endswith("44k-stereo")]
    assert {(r[S.SAMPLE_RATE], r[S.NUM_CHANNELS]) for r in stereo} == {(44_100, 2)}
    assert {r[S.SAMPLE_RATE] for r in heldout_run.values() if r[S.ID].endswith("-8k")} == {8_000}


def test_shuffled_manifest_two_actors_and_small_batches_give_identical_transcripts(
        heldout_run, ray_cluster, tmp_path):
    table = pacsv.read_csv(HELDOUT)
    absolute = pc.binary_join_element_wise(str(HELDOUT.parent) + "/", table["path"], "")
    table = table.set_column(table.schema.get_field_index("path"), "path", absolute)
    table = table.take(np.random.default_rng(1).permutation(table.num_rows))
    shuffled = tmp_path / "shuffled.csv"
    pacsv.write_csv(table, shuffled)
    rows = run(ray_cluster, shuffled, tmp_path / "out", "inference.min_replicas=2", "inference.max_replicas=2",
               "inference.cpus_per_replica=0.5", "inference.max_batch_samples=100000",
               "inference.rows_per_call=5")
    assert {k: r[S.TRANSCRIPT] for k, r in rows.items()} == {k: r[S.TRANSCRIPT] for k, r in heldout_run.items()}


def test_bf16_changes_few_transcripts(heldout_run, ray_cluster, tmp_path):
    """bf16 autocast (fast on CPUs with AVX-512 bf16) against fp32: count and bound the changes."""
    rows = run(ray_cluster, HELDOUT, tmp_path / "out", "inference.precision=bf16")
    changed = [k for k, r in heldout_run.items() if rows[k][S.TRANSCRIPT] != r[S.TRANSCRIPT]]
    drift = jiwer.cer([heldout_run[k][S.TRANSCRIPT] for k in sorted(rows)],
                      [rows[k][S.TRANSCRIPT] for k in sorted(rows)])
    print(f"\nbf16 vs fp32: {len(changed)} of {len(rows)} transcripts change, CER between them {drift:.2%}")
    assert drift <= MAX_BF16_CER_VS_FP32
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["precision"] == "bf16"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_replica_job_agrees_with_the_cpu_job(heldout_run, ray_cluster, tmp_path, precision):
    """The whole job with one GPU replica, against the CPU fp32 job. Run on a GPU machine:
    ``python -m pytest -m gpu``. fp32 must give the same transcripts; bf16/fp16 may change a few."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("marked gpu, but torch sees no CUDA device")
    rows = run(ray_cluster, HELDOUT, tmp_path / "out", "inference.gpus_per_replica=1", "inference.device=cuda",
               "inference.cpus_per_replica=1", f"inference.precision={precision}",
               "inference.max_batch_samples=12800000")
    assert set(rows) == set(heldout_run) and all(r[S.ERROR] is None for r in rows.values())
    ids = sorted(rows)
    changed = [k for k in ids if rows[k][S.TRANSCRIPT] != heldout_run[k][S.TRANSCRIPT]]
    drift = jiwer.cer([heldout_run[k][S.TRANSCRIPT] for k in ids], [rows[k][S.TRANSCRIPT] for k in ids])
    print(f"\njob on {torch.cuda.get_device_name()} in {precision} vs the CPU job in fp32: "
          f"{len(changed)} of {len(ids)} transcripts change, CER between them {drift:.2%}")
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["precision"] == precision
    if precision == "fp32":
        assert not changed
    assert drift <= MAX_BF16_CER_VS_FP32
