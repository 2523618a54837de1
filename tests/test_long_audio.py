"""Recordings longer than a window: the same transcript as the transformers ASR pipeline with the
same chunk and stride settings (fp32), built from the demo model's held-out clips."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import soundfile as sf

from jobs.long_audio import long_recording
from pipeline import bundled
from pipeline import schema as S
from pipeline.audio import decode, normalize
from pipeline.config import AudioConfig, DecodeConfig, InferenceConfig, InputConfig
from pipeline.decode import DecodeStage
from pipeline.model.spec import ModelSpec, load_front_end
from pipeline.model.transcriber import CTCTranscriber
from pipeline.transcribe import TranscribeStage
from pipeline.windows import Windowing

DEMO = bundled.model_path("@demo")


@pytest.fixture(scope="module")
def demo_transcriber():
    return CTCTranscriber(ModelSpec(DEMO), device="cpu", precision="fp32")


def ours(path: Path, transcriber: CTCTranscriber, inference: InferenceConfig) -> dict:
    """The job's two steps on one file, as a replica and a decode task run them (no Ray)."""
    front_end = load_front_end(ModelSpec(DEMO))
    windowing = Windowing.of(inference.window_s, inference.strides, 16_000, front_end.hop, front_end.do_normalize)
    manifest = pa.table({S.ID: ["long"], S.PATH: [str(path)], S.DATASET_ROW: pa.nulls(1, pa.int64()),
                         S.REFERENCE: [None]}, schema=S.MANIFEST_SCHEMA)
    decoded = DecodeStage(front_end, InputConfig(), AudioConfig(), DecodeConfig(isolate=False),
                          windowing.length)(manifest)
    stage = TranscribeStage(lambda: transcriber, inference, "@demo", {}, windowing, words=True)
    return stage(decoded).to_pylist()[0]


@pytest.mark.parametrize("window_s, stride_s", [(40.0, 4.0), (10.0, (2.0, 3.0))])
def test_a_long_file_is_transcribed_as_the_pipeline_transcribes_it(tmp_path, demo_transcriber, window_s, stride_s):
    from transformers import pipeline

    long = tmp_path / "long.flac"
    long_recording(long, 150)
    inference = InferenceConfig(window_s=window_s, window_stride_s=stride_s, max_batch_samples=2_000_000)
    row = ours(long, demo_transcriber, inference)
    asr = pipeline("automatic-speech-recognition", model=DEMO, device="cpu")
    wave = decode(str(long), do_normalize=False).audio
    theirs = asr({"raw": wave, "sampling_rate": 16_000}, chunk_length_s=window_s,
                 stride_length_s=list(inference.strides))["text"]
    assert row[S.ERROR] is None and len(row[S.TRANSCRIPT].split()) > 100
    assert row[S.TRANSCRIPT] == theirs
    assert row[S.NUM_SAMPLES] == len(wave) and row[S.PADDED_SAMPLES] <= 16_000 * window_s


@pytest.mark.integration
def test_the_job_transcribes_a_long_file_beside_short_ones(ray_cluster, tmp_path, demo_transcriber):
    """Through Ray: a 3-minute recording and two of its clips in one folder; the long file's row is
    the windowed transcript, the clips' rows are as they are alone, every row once."""
    from pipeline.config import load_config
    from pipeline.engine import run_job
    from pipeline.output import read_output

    folder = tmp_path / "corpus"
    folder.mkdir()
    spans = long_recording(folder / "long.flac", 180)
    wave = decode(str(folder / "long.flac"), do_normalize=False).audio
    for name, (a, b) in zip(["a.flac", "b.flac"], spans[:2], strict=True):
        sf.write(folder / name, wave[a:b], 16_000)
    cfg = load_config(overrides=["ray.progress_bars=false", "inference.device=cpu", "inference.precision=fp32"],
                      **{"input.path": str(folder), "output.path": str(tmp_path / "out"), "model.name": "@demo"})
    summary = run_job(cfg)
    rows = {r[S.ID]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert summary["rows_out"] == 3 and summary["lost"] == summary["duplicated"] == 0
    expected = ours(folder / "long.flac", demo_transcriber, InferenceConfig())
    assert rows["long.flac"][S.TRANSCRIPT] == expected[S.TRANSCRIPT]
    assert rows["long.flac"][S.DURATION_S] == pytest.approx(len(wave) / 16_000)
    for name in ("a.flac", "b.flac"):
        assert rows[name][S.TRANSCRIPT] == demo_transcriber.transcribe([normalize(decode(str(folder / name),
                                                                                  do_normalize=False).audio)])[0]
