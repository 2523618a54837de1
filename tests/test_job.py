"""The whole job on a real local Ray cluster: real files in, real Parquet out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import write_tone_clips

from pipeline import schema as S
from pipeline.config import InputConfig, load_config
from pipeline.engine import build_dataset, plan, run_job, sized_config
from pipeline.errors import ErrorKind, JobError, Stage
from pipeline.manifest import read_manifest
from pipeline.model.reference import Reference
from pipeline.output import SUMMARY_FILE, read_output

pytestmark = pytest.mark.integration  # a real local Ray cluster

# 22 utterances from 25 ms (the model's minimum) to 12 s, so batches mix very unequal lengths.
DURATIONS = [0.025, 0.05, 0.3, 0.5, 0.8, 1.0, 1.3, 1.7, 2.0, 2.4, 2.9, 3.3, 3.8, 4.2, 5.0, 5.5, 6.1, 7.0,
             8.2, 9.0, 10.5, 12.0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A CSV manifest: 22 good clips, one missing file, one corrupt file, one too short."""
    root = tmp_path_factory.mktemp("corpus")
    clips = write_tone_clips(root / "clips", DURATIONS)
    (root / "clips" / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    sf.write(root / "clips" / "short.wav", np.full(100, 0.1, np.float32), 16_000)
    rows = [f"{p.stem},clips/{p.name},REF {i}" for i, p in enumerate(clips)]
    rows += ["missing,clips/missing.flac,", "corrupt,clips/corrupt.flac,", "short,clips/short.wav,"]
    (root / "manifest.csv").write_text("id,path,text\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


def run(ray_cluster, manifest, out, model, *overrides, **values):
    """The job on CPU replicas in fp32 (where batch invariance is exact), unless ``overrides`` say otherwise."""
    cfg = load_config(
        overrides=["ray.progress_bars=false", "inference.device=cpu", "inference.precision=fp32", *overrides],
        **{"input.path": str(manifest), "output.path": str(out), "model.name": str(model), **values},
    )
    return run_job(cfg)


def by_id(out: Path) -> dict[str, dict]:
    return {r[S.ID]: r for r in read_output(out).to_pylist()}


@pytest.fixture(scope="module")
def layer_run(ray_cluster, corpus, layer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("layer_out")
    # A small budget forces many batches of mixed lengths in each actor call.
    summary = run(ray_cluster, corpus, out, layer_model, "inference.max_batch_samples=100000",
                  "output.rows_per_shard=10")
    return out, summary


def test_layer_norm_transcripts_equal_the_reference_one_at_a_time(layer_run, corpus, layer_model):
    out, _ = layer_run
    rows = by_id(out)
    ref = Reference.from_pretrained(layer_model)
    clips = sorted((corpus.parent / "clips").glob("clip*.flac"))
    assert len(clips) >= 20
    for clip in clips:
        audio, _ = sf.read(clip, dtype="float32")
        assert rows[clip.stem][S.TRANSCRIPT] == ref(audio), clip.stem
    assert sum(bool(rows[c.stem][S.TRANSCRIPT]) for c in clips) > len(clips) // 2


def test_error_rows_name_file_stage_and_reason(layer_run, corpus):
    rows = by_id(layer_run[0])
    missing, corrupt, short = rows["missing"], rows["corrupt"], rows["short"]
    assert (missing[S.ERROR_KIND], missing[S.ERROR_STAGE]) == (ErrorKind.NOT_FOUND, Stage.DECODE)
    assert missing[S.ERROR].startswith("not_found: ") and "clips/missing.flac" in missing[S.ERROR]
    assert (corrupt[S.ERROR_KIND], corrupt[S.ERROR_STAGE]) == (ErrorKind.DECODE_ERROR, Stage.DECODE)
    assert "corrupt.flac" in corrupt[S.ERROR]
    assert (short[S.ERROR_KIND], short[S.ERROR_STAGE]) == (ErrorKind.TOO_SHORT, Stage.TRANSCRIBE)
    assert "100 samples" in short[S.ERROR] and "at least 400" in short[S.ERROR]
    for r in (missing, corrupt, short):
        assert r[S.TRANSCRIPT] is None
    assert short[S.DURATION_S] == pytest.approx(100 / 16_000) and short[S.SAMPLE_RATE] == 16_000
    ok = [r for r in rows.values() if r[S.ERROR_KIND] is None]
    assert all(r[S.ERROR] is None and r[S.ERROR_STAGE] is None and r[S.TRANSCRIPT] is not None for r in ok)


def test_schema_metadata_and_source_columns(layer_run, layer_model):
    out, _ = layer_run
    shards = sorted(out.glob("*.parquet"))
    for shard in shards:
        schema = pq.read_schema(shard)
        assert schema.remove_metadata() == S.OUTPUT_SCHEMA
        meta = json.loads(schema.metadata[S.METADATA_KEY])
        assert meta["model"] == str(layer_model) and meta["corpus_transcribe"] and meta["transformers"]
        assert (meta["precision"], meta["conv_encoder"]) == ("fp32", "auto")
        assert pq.read_metadata(shard).num_rows <= 10  # output.rows_per_shard
    rows = by_id(out)
    clip = rows["clip005"]
    assert (clip[S.SAMPLE_RATE], clip[S.NUM_CHANNELS], clip[S.MODEL]) == (16_000, 1, str(layer_model))
    assert clip[S.DURATION_S] == pytest.approx(DURATIONS[5])
    assert clip[S.REFERENCE] == "REF 5" and rows["missing"][S.REFERENCE] is None
    assert clip[S.NUM_SAMPLES] == 16_000 and clip[S.PADDED_SAMPLES] >= clip[S.NUM_SAMPLES]


def test_summary_counts_and_every_reader_sees_one_table(layer_run, ray_cluster):
    out, summary = layer_run
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["rows_in"] == summary["rows_in"] == 25
    assert (summary["rows_out"], summary["transcribed"], summary["errors"]) == (25, 22, 3)
    assert summary["errors_by_kind"] == {"not_found": 1, "decode_error": 1, "too_short": 1}
    assert (summary["lost"], summary["duplicated"]) == (0, 0)
    assert summary["audio_hours"] == pytest.approx((sum(DURATIONS) + 100 / 16_000) / 3600, rel=1e-3)
    assert summary["audio_s_per_s"] > 0 and summary["wall_s"] > 0 and summary["padding_waste"] >= 0
    assert summary["shards"] == len(list(out.glob("*.parquet"))) >= 3
    phases = summary["phases_s"]  # where the time went; Ray was already running (the session's cluster)
    assert list(phases) == ["plan", "ray_start", "run", "ray_stop"] and min(phases.values()) >= 0
    assert phases["run"] > 0 and sum(phases.values()) == pytest.approx(summary["wall_s"], abs=0.01)  # ms rounding
    # The replicas' own timestamps: their first batch after the job started, busy between first and last.
    timing = summary["replicas"]
    assert timing["replicas"] == 1 and timing["calls"] >= 1 and 0 < timing["busy_fraction"] <= 1
    assert 0 < timing["device_busy_fraction"] <= timing["busy_fraction"]  # the forwards, inside the calls
    assert 0 < timing["first_batch_s"] < timing["last_batch_s"] <= summary["wall_s"]
    assert timing["process_start_s"] < timing["ready_s"] <= timing["first_batch_s"] and timing["load_s"] > 0
    assert timing["steady_audio_s_per_s"] > 0 and timing["model_audio_s_per_s"] >= timing["steady_audio_s_per_s"]
    # decode's speed per CPU over the audio it decoded (the two decode error rows count none), and the
    # decoding CPUs a replica needs: the ratio of the two speeds
    assert timing["decode_audio_s_per_cpu_s"] > 0
    assert timing["decode_cpus_per_replica"] == pytest.approx(
        timing["model_audio_s_per_s"] / timing["decode_audio_s_per_cpu_s"], rel=0.01, abs=0.01)
    sized = summary["config"]["inference"]  # auto settings sized from the session's 2-CPU cluster
    assert (sized["min_replicas"], sized["gpus_per_replica"], sized["torch_threads"]) == (1, 0.0, 2)
    # Every file that is not a shard starts with "_".
    assert all(p.suffix == ".parquet" or p.name.startswith("_") for p in out.iterdir())
    assert pads.dataset(out, format="parquet").count_rows() == 25
    assert duckdb.sql(f"select count(distinct id) from read_parquet('{out}/**/*.parquet')").fetchall() == [(25,)]
    import ray

    assert ray.data.read_parquet(str(out)).count() == 25


@pytest.mark.parametrize("budget, actors, shuffled, encoder", [(100_000, 1, False, "auto"),
                                                              (400_000, 2, False, "batched"),
                                                              (1_600_000, 2, True, "auto")])
def test_group_norm_transcripts_are_batch_invariant(ray_cluster, corpus, group_model, tmp_path,
                                                   budget, actors, shuffled, encoder):
    """wav2vec2-base-960h's kind: every row equals the reference run on it alone, whatever the batch
    budget (1x/4x/16x), the number of actors, the manifest order and the conv encoder (fp32 on the
    CPU: auto is the stock one; batched is the GPUs')."""
    ref = Reference.from_pretrained(group_model)
    clips = sorted((corpus.parent / "clips").glob("clip*.flac"))
    expected = {c.stem: ref(sf.read(c, dtype="float32")[0]) for c in clips}
    manifest = corpus
    if shuffled:
        table = pa.csv.read_csv(corpus)
        table = table.take(np.random.default_rng(0).permutation(table.num_rows))
        manifest = corpus.parent / "shuffled.csv"  # beside the clips its relative paths name
        pa.csv.write_csv(table, manifest)
    summary = run(ray_cluster, manifest, tmp_path / "out", group_model, f"inference.max_batch_samples={budget}",
                  f"inference.min_replicas={actors}", f"inference.max_replicas={actors}",
                  f"inference.cpus_per_replica={1 / actors}", "inference.rows_per_call=8",
                  f"inference.conv_encoder={encoder}")
    rows = by_id(tmp_path / "out")
    assert {k: rows[k][S.TRANSCRIPT] for k in expected} == expected
    assert len(rows) == summary["rows_out"] == 25
    assert sum(map(bool, expected.values())) > 10


def test_input_kinds_and_manifest_formats_agree(ray_cluster, corpus, layer_model, layer_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    expected = {k: r[S.TRANSCRIPT] for k, r in by_id(layer_run[0]).items() if k.startswith("clip")}
    manifest = pa.csv.read_csv(corpus).filter(pa.compute.starts_with(pa.compute.field("id"), "clip"))
    paths = [str(corpus.parent / p) for p in manifest["path"].to_pylist()]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"audio_filepath": p}) + "\n" for p in paths))
    pq.write_table(pa.table({"id": manifest["id"], "file": paths}), tmp_path / "m.parquet")
    hf = datasets.Dataset.from_dict({"id": manifest["id"].to_pylist(), "audio": paths})
    hf = hf.cast_column("audio", datasets.Audio(decode=False))
    hf.save_to_disk(tmp_path / "hf", num_shards=3)  # Arrow files with the audio embedded
    (tmp_path / "repo").mkdir()
    hf.to_parquet(tmp_path / "repo" / "test.parquet", batch_size=4)  # Parquet naming the audio files
    listed = read_manifest(InputConfig(path=str(tmp_path / "hf")))
    assert listed.nbytes * 20 < sum(Path(p).stat().st_size for p in paths)  # the driver holds no audio

    def stem(k):
        return Path(k).stem

    for name, source in [("jsonl", tmp_path / "m.jsonl"), ("parquet", tmp_path / "m.parquet"),
                         ("hf", tmp_path / "hf"), ("hf-repo", f"hf:{tmp_path / 'repo'}"),
                         ("folder", corpus.parent / "clips")]:
        out = tmp_path / f"out-{name}"
        summary = run(ray_cluster, source, out, layer_model)
        got = {stem(k): r[S.TRANSCRIPT] for k, r in by_id(out).items() if stem(k).startswith("clip")}
        assert got == expected, name
        assert summary["lost"] == summary["duplicated"] == 0
    folder_ids = set(by_id(tmp_path / "out-folder"))
    assert {"clip000.flac", "corrupt.flac", "short.wav"} <= folder_ids  # ids are relative paths


def test_a_finished_output_is_left_alone_unless_overwrite(ray_cluster, corpus, layer_run, layer_model,
                                                          group_model, tmp_path):
    out, first = layer_run
    files = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    shards = [s["path"] for s in json.loads((out / "_manifest.json").read_text())["shards"]]
    assert sorted(files) == sorted([*shards, "_manifest.json", SUMMARY_FILE])  # no _work, no orphans
    again = run(ray_cluster, corpus, out, layer_model, "inference.max_batch_samples=100000",
                "output.rows_per_shard=10")
    assert again["already_complete"] and again["rows_out"] == 25
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == files  # nothing written
    # Another model into the same folder is refused: its rows would mix with these.
    refused = "holds a finished run of another input, model, audio settings, precision or decoder"
    with pytest.raises(JobError, match=refused):
        run(ray_cluster, corpus, out, group_model)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.parquet").write_bytes(b"")
    with pytest.raises(JobError, match="already holds files of another run.*output.overwrite=true"):
        run(ray_cluster, corpus, stray, layer_model)
    summary = run(ray_cluster, corpus, stray, layer_model, "output.overwrite=true")
    assert summary["rows_out"] == 25 and not summary["resumed"]
    assert len(read_output(out)) == 25


def test_a_pool_that_leaves_no_cpu_for_decoding_fails_fast(ray_cluster, corpus, layer_model, tmp_path):
    """Two 1-CPU replicas on the 2-CPU test cluster would leave decode tasks waiting forever."""
    with pytest.raises(JobError, match=r"inference.min_replicas = 2: 2 replicas x 1 CPUs "
                       r"\(inference.cpus_per_replica\) "
                                       r"plus one decode task need 3 CPUs, the cluster has 2"):
        run(ray_cluster, corpus, tmp_path / "out", layer_model, "inference.min_replicas=2",
            "inference.max_replicas=2")


def test_building_the_dataset_warns_of_nothing(ray_cluster, corpus, layer_model, tmp_path):
    """Ray 2.60 deprecates the map_batches keyword arguments that carry the job's retries, without
    a replacement: users see no warning for it, and any other warning pointing at the job's code
    (Ray's deprecations point at their caller) fails here."""
    cfg = load_config(**{"input.path": str(corpus), "output.path": str(tmp_path / "out"),
                         "model.name": str(layer_model)})
    p = plan(cfg)
    p.cfg = sized_config(cfg)  # as run_job does once Ray runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset(p, p.manifest)
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if Path(w.filename).parent.name == "pipeline"]
    assert ours == [], [f"{w.filename}: {w.message}" for w in caught]


def test_a_stand_in_model_runs_in_the_replicas(ray_cluster, corpus, layer_model, tmp_path):
    """run_job(load=...) gives every replica another transcriber (the benchmark's stand-in): every
    row passes through it once, and the output records what ran."""
    from jobs.stand_in import StandInLoader

    cfg = load_config(overrides=["ray.progress_bars=false"], **{
        "input.path": str(corpus), "output.path": str(tmp_path / "out"), "model.name": str(layer_model)})
    summary = run_job(cfg, load=StandInLoader(rate=1_000.0))
    rows = by_id(tmp_path / "out")
    assert summary["rows_in"] == summary["rows_out"] == len(rows) and summary["lost"] == summary["duplicated"] == 0
    assert {r[S.TRANSCRIPT] for r in rows.values() if r[S.ERROR_KIND] is None} == {""}
    meta = json.loads(pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata[b"corpus_transcribe"])
    assert meta["precision"] == summary["precision"] == "stand-in"  # as run; auto as configured
    assert summary["config"]["inference"]["precision"] == "auto"


def test_a_replica_error_fails_the_job_with_its_cause(ray_cluster, corpus, layer_model, tmp_path):
    """Ray wraps a worker's error in its own (ActorDiedError, SystemException): the job's one line
    names the error the worker raised, not the wrappers."""
    from failing_loader import MISSING, FailingLoader

    cfg = load_config(overrides=["ray.progress_bars=false", "inference.max_restarts=0"], **{
        "input.path": str(corpus), "output.path": str(tmp_path / "out"), "model.name": str(layer_model)})
    with pytest.raises(JobError) as failed:
        run_job(cfg, load=FailingLoader())
    assert str(failed.value) == (f"the job failed: FileNotFoundError: [Errno 2] No such file or directory: "
                                 f"'{MISSING}'")
