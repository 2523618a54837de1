"""The transcribe stage on Arrow tables, without Ray: batches started ahead, failures row by row."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from helpers import Reference
from pipeline import schema as S
from pipeline.audio import normalize
from pipeline.checkpoint import ModelSpec
from pipeline.stages import TranscribeStage, _audio_column, _waves

LENGTHS = [48_000, 9_000, 300, 31_000, 12_345, 47_000, 8_500, 30_000, 2_000]  # 300: below the 400 the model needs
BAD_START, BAD_FINISH = 30_000, 8_500  # rows whose (two-row) batch fails when started / when finished


def _decoded_table(waves: list[np.ndarray]) -> pa.Table:
    n = len(waves)
    cols = {
        S.ID: [f"u{i}" for i in range(n)], S.PATH: [f"/corpus/u{i}.flac" for i in range(n)],
        S.REFERENCE: [None] * n, S.DURATION_S: [len(w) / 16_000 for w in waves], S.SAMPLE_RATE: [16_000] * n,
        S.NUM_CHANNELS: [1] * n, S.ERROR_KIND: [None] * n, S.ERROR: [None] * n, S.ERROR_STAGE: [None] * n,
        S.NUM_SAMPLES: [len(w) for w in waves], S.AUDIO: _audio_column(waves),
    }
    return pa.table(cols, schema=S.DECODED_SCHEMA)


def test_batches_start_ahead_and_a_failing_row_fails_alone(group_model, caplog):
    """The stage starts each batch before it finishes the one ahead (on a GPU the host decodes
    while the GPU runs); a batch whose start or finish raises is retried row by row, so only the
    row that fails alone becomes an ``inference_error`` row, and every other row is the reference's.
    The table comes in sliced chunks, as Ray Data hands a replica one per decode task's block."""
    rng = np.random.default_rng(0)
    waves = [normalize(rng.standard_normal(n).astype(np.float32)) for n in LENGTHS]
    stage = TranscribeStage(ModelSpec(str(group_model)), max_batch_samples=100_000, device="cpu")
    transcriber, calls = stage.transcriber, []
    start, finish = transcriber.start, transcriber.finish

    def failing_start(batch):
        calls.append(("start", sorted(len(w) for w in batch)))
        if BAD_START in [len(w) for w in batch]:
            raise RuntimeError("CUDA out of memory (injected)")
        return start(batch)

    def failing_finish(started):
        calls.append(("finish", len(started.frames)))
        if transcriber.frames([BAD_FINISH])[0] in started.frames:
            raise ValueError("undecodable ids (injected)")
        return finish(started)

    transcriber.start, transcriber.finish = failing_start, failing_finish
    table = _decoded_table(waves)
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 4), table.slice(6)])
    assert chunked[S.AUDIO].num_chunks == 3
    views = _waves(chunked[S.AUDIO])  # the stage reads each row in place, in its chunk's buffer
    buffers = [chunk.values.to_numpy() for chunk in chunked[S.AUDIO].chunks for _ in range(len(chunk))]
    assert all(np.array_equal(v, w) and np.shares_memory(v, b) for v, w, b in zip(views, waves, buffers, strict=True))
    out = stage(chunked).to_pylist()

    ref = Reference(group_model)
    assert [r[S.ID] for r in out] == [f"u{i}" for i in range(len(LENGTHS))]
    for row, n, wave in zip(out, LENGTHS, waves, strict=True):
        if n == 300:
            assert row[S.ERROR_KIND] == S.ErrorKind.TOO_SHORT and row[S.TRANSCRIPT] is None
        elif n in (BAD_START, BAD_FINISH):
            assert row[S.ERROR_KIND] == S.ErrorKind.INFERENCE_ERROR and row[S.ERROR_STAGE] == S.STAGE_TRANSCRIBE
            assert row[S.PATH] in row[S.ERROR] and "(injected)" in row[S.ERROR] and row[S.TRANSCRIPT] is None
        else:
            assert row[S.ERROR_KIND] is None and row[S.TRANSCRIPT] == ref(wave), n
            assert row[S.PADDED_SAMPLES] >= n
    # Batch k + 1 starts before batch k finishes: starts and finishes alternate after the first start.
    planned = [c for c in calls if c[0] == "start" and len(c[1]) > 1]
    assert len(planned) >= 3 and calls[0][0] == calls[1][0] == "start" and calls[2][0] == "finish"
    assert caplog.text.count("retrying them one at a time") == 2  # the two batches holding a bad row


def test_a_replica_logs_at_the_drivers_level_to_stderr(group_model):
    """Ray workers start with logging's defaults (warnings only); given the driver's level, the
    replica says what it loaded and how long that took on stderr, which Ray forwards to the driver.
    A fresh interpreter, as a Ray worker is."""
    code = ("import logging; from pipeline.checkpoint import ModelSpec; from pipeline.stages import TranscribeStage; "
            f"TranscribeStage(ModelSpec({str(group_model)!r}), 100_000, device='cpu', log_level=logging.INFO)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent, check=True)
    assert re.search(r"INFO pipeline\.model: loaded .* on cpu \(fp32, .*batch-invariant: True", run.stderr)
    assert re.search(r"INFO pipeline\.stages: replica ready in [\d.]+ s \(torch and transformers imported in "
                     r"[\d.]+ s, the model loaded and probed in [\d.]+ s\)", run.stderr)
