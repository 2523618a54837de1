"""The decode and transcribe steps on Arrow tables, without Ray: stand-in transcribers injected,
real files decoded; one test with the real model code in the stage."""

import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from faulty_decoder import CRASH_MARKER, FUNCTION

from pipeline import schema as S
from pipeline.audio import decode, normalize
from pipeline.batching import plan_batches
from pipeline.config import AudioConfig, DecodeConfig, InferenceConfig, InputConfig
from pipeline.decode import DecodeStage
from pipeline.errors import ErrorKind, Stage
from pipeline.model.reference import Reference
from pipeline.model.spec import FrontEnd, ModelSpec
from pipeline.model.transcriber import CTCTranscriber
from pipeline.transcribe import CallSpan, ReplicaStart, TranscribeStage, decode_shortfall, replica_timing
from pipeline.windows import Windowing

LENGTHS = [48_000, 9_000, 300, 31_000, 12_345, 47_000, 8_500, 30_000, 2_000]  # 300: below the 400 the model needs
BAD_START, BAD_FINISH = 30_000, 8_500  # rows whose (two-row) batch fails when started / when finished
METADATA = {"model": "m"}
WINDOWING = Windowing.of(40.0, (4.0, 4.0), 16_000, 320)  # the defaults: every row above runs whole


def _decoded_table(waves: list[np.ndarray]) -> pa.Table:
    n = len(waves)
    cols = {
        S.ID: [f"u{i}" for i in range(n)], S.PATH: [f"/corpus/u{i}.flac" for i in range(n)],
        S.REFERENCE: [None] * n, S.DURATION_S: [len(w) / 16_000 for w in waves], S.SAMPLE_RATE: [16_000] * n,
        S.NUM_CHANNELS: [1] * n, S.ERROR_KIND: [None] * n, S.ERROR: [None] * n, S.ERROR_STAGE: [None] * n,
        S.NUM_SAMPLES: [len(w) for w in waves], S.AUDIO: S.audio_column(waves),
    }
    return pa.table(cols, schema=S.DECODED_SCHEMA)


def _chunked(table: pa.Table) -> pa.Table:
    """The table in sliced chunks, as Ray Data hands a replica one per decode task's block."""
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 4), table.slice(6)])
    assert chunked[S.AUDIO].num_chunks == 3
    return chunked


class LengthTranscriber:
    """A stand-in replica: each row's text names its length; a batch holding a row of a length in
    ``bad`` fails. Records every batch it was given."""

    min_samples = 400
    precision = "fp32"

    def __init__(self, bad: Sequence[int] = ()):
        self.bad = set(bad)
        self.batches: list[list[int]] = []
        self.released = 0

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]], logprobs: bool = False):
        for waves in batches:
            lengths = [len(w) for w in waves]
            self.batches.append(lengths)
            yield (ValueError(f"bad batch {lengths}") if self.bad & set(lengths)
                   else [(np.array([n]), np.array([0.5], np.float32)) for n in lengths])

    def decode(self, sequences):
        return [f"n{'+'.join(map(str, s))}" for s in sequences]

    def words(self, ids, confidence):
        return [(f"n{ids[0]}", 0, 1, float(confidence[0]))]

    def release_memory(self) -> None:
        self.released += 1


def test_transcribe_stage_plans_batches_and_a_failing_row_fails_alone(caplog):
    waves = [np.full(n, 0.1, np.float32) for n in LENGTHS]
    table = _decoded_table(waves)
    table = table.set_column(table.schema.get_field_index(S.ERROR_KIND), S.ERROR_KIND,
                             pa.array([*[None] * 8, "decode_error"], pa.string()))
    fake = LengthTranscriber(bad=[BAD_START, BAD_FINISH])
    inference = InferenceConfig(max_batch_samples=100_000)
    stage = TranscribeStage(lambda: fake, inference, "m", METADATA, WINDOWING, words=True)
    out = stage(_chunked(table)).to_pylist()

    assert [r[S.ID] for r in out] == [f"u{i}" for i in range(len(LENGTHS))]
    for row, n in zip(out, LENGTHS, strict=True):
        if n == 2_000:  # an error row from decode passes through untouched
            assert (row[S.ERROR_KIND], row[S.ERROR_STAGE], row[S.TRANSCRIPT]) == ("decode_error", None, None)
        elif n == 300:
            assert row[S.ERROR_KIND] == ErrorKind.TOO_SHORT and row[S.ERROR_STAGE] == Stage.TRANSCRIBE
            assert row[S.ERROR] == ("too_short: /corpus/u2.flac: 300 samples after resampling, "
                                    "the model needs at least 400")
        elif n in (BAD_START, BAD_FINISH):
            assert row[S.ERROR_KIND] == ErrorKind.INFERENCE_ERROR and row[S.ERROR_STAGE] == Stage.TRANSCRIBE
            assert row[S.ERROR] == f"inference_error: {row[S.PATH]}: ValueError: bad batch [{n}]"
        else:
            assert row[S.ERROR_KIND] is None and row[S.TRANSCRIPT] == f"n{n}" and row[S.PADDED_SAMPLES] >= n
            assert row[S.WORDS] == [{"word": f"n{n}", "start_s": 0.0, "end_s": pytest.approx(0.02), "confidence": 0.5}]
            assert row[S.CONFIDENCE] == 0.5
        assert row[S.MODEL] == "m" and row[S.NUM_SAMPLES] == n
    # The call's batches as planned (longest first, under the budget), a failed one retried row by row.
    todo = [n for n in LENGTHS if n not in (300, 2_000)]
    expected = []
    for batch in plan_batches(todo, 100_000, inference.max_padding_waste):
        expected.append([todo[i] for i in batch])
        if len(batch) > 1 and {BAD_START, BAD_FINISH} & set(expected[-1]):
            expected += [[n] for n in expected[-1]]
    assert fake.batches == expected and any(len(b) > 1 for b in expected)
    assert all(len(b) * max(b) <= 100_000 for b in expected)
    assert caplog.text.count("retrying them one at a time") == 2
    assert fake.released == 1


class FrameTranscriber:
    """A stand-in replica whose "token" for each output frame is the frame's first sample, so a row
    of ``arange(n) // 320`` gives each frame's index in its recording; batches holding a sample
    value in ``bad`` fail."""

    min_samples = 400
    precision = "fp32"

    def __init__(self, bad: Sequence[int] = ()):
        self.bad, self.batches = set(bad), []

    def transcribe_batches(self, batches, logprobs: bool = False):
        for waves in batches:
            self.batches.append(sorted(len(w) for w in waves))
            if any(self.bad & set(w[::320].astype(int).tolist()) for w in waves):
                yield RuntimeError("injected")
            else:
                ids = [w[::320][: (len(w) - 400) // 320 + 1].astype(np.int64) for w in waves]
                yield [(i, np.full(len(i), 0.25, np.float32)) for i in ids]

    def decode(self, sequences):
        return [" ".join(map(str, s)) for s in sequences]

    def words(self, ids, confidence):
        """A "word" every 100 frames, named by its first frame."""
        return [(str(ids[a]), a, min(a + 100, len(ids)), float(confidence[a])) for a in range(0, len(ids), 100)]

    def release_memory(self) -> None:
        pass


def test_long_rows_run_as_windows_in_shared_batches_and_are_stitched_in_order():
    """Two long rows and a short one: the windows of both long rows and the short row share padded
    batches; each long row's kept frames come back once each, in order; a window that fails alone
    fails its row only."""
    hop, windowing = 320, Windowing.of(10.0, (2.0, 2.0), 16_000, 320, normalize=False)
    lengths = [16_000 * 61 + 5, 40_000, 16_000 * 25]
    offsets = [0, 0, 10_000]  # the third row's "tokens" differ from the others'
    waves = [(np.arange(n) // hop + o).astype(np.float32) for n, o in zip(lengths, offsets, strict=True)]
    fake = FrameTranscriber(bad=[10_000 + 16_000 * 20 // hop])  # a frame in the third row's last window
    stage = TranscribeStage(lambda: fake, InferenceConfig(max_batch_samples=700_000), "m", METADATA, windowing,
                            words=False)
    out = stage(_decoded_table(waves)).to_pylist()
    frames = [list(map(int, r[S.TRANSCRIPT].split())) if r[S.TRANSCRIPT] else None for r in out]
    assert frames[0] == list(range(len(frames[0]))) and len(frames[0]) >= (lengths[0] - 400) // hop
    assert frames[1] == list(range((40_000 - 400) // hop + 1))  # whole: every frame of it
    assert out[2][S.ERROR_KIND] == ErrorKind.INFERENCE_ERROR and "RuntimeError: injected" in out[2][S.ERROR]
    windows = [len(windowing.windows(n)) for n in lengths]
    assert windows == [10, 1, 4]
    assert max(len(b) for b in fake.batches) > 1 and sum(map(len, fake.batches)) > sum(windows)  # retried alone
    assert out[0][S.PADDED_SAMPLES] == windowing.length and out[0][S.NUM_SAMPLES] == lengths[0]
    assert S.WORDS not in out[0] and out[0][S.CONFIDENCE] == 0.25 and out[2][S.CONFIDENCE] is None


def test_each_call_records_when_its_model_work_ran_and_the_replicas_timing_adds_them_up():
    """A calibrated stand-in (jobs/stand_in.py: 100 audio s/s of padded batch, sleeping): the call's span
    holds its model time and its rows' audio; the replicas' timing gives the busy fraction and the
    steady speed from the spans, and the first batch's time after the command started."""
    from jobs.stand_in import StandInTranscriber

    waves = [np.zeros(n, np.float32) for n in (16_000, 16_000, 32_000, 300)]  # 300: too short, does not run
    stage = TranscribeStage(lambda: StandInTranscriber(rate=100.0), InferenceConfig(), "m", METADATA, WINDOWING,
                            words=False)
    assert stage.last_span is None
    stage(_decoded_table(waves))
    span = stage.last_span
    assert span.audio_s == pytest.approx(4.0)
    lengths, inference = [16_000, 16_000, 32_000], InferenceConfig()
    plan = plan_batches(lengths, inference.max_batch_samples, inference.max_padding_waste)
    padded_s = sum(len(b) * max(lengths[i] for i in b) for b in plan) / 16_000
    assert padded_s / 100.0 - 0.005 <= span.end - span.start <= padded_s / 100.0 + 0.5  # it sleeps that long
    assert span.device_s == pytest.approx(padded_s / 100.0)  # the stand-in's "device" time, exactly
    stage(_decoded_table(waves[3:]))  # nothing runs: no span
    assert stage.last_span is None

    spans = {"a": [CallSpan(10.0, 12.0, 20.0, 1.5), CallSpan(13.0, 14.0, 10.0, 0.5)],
             "b": [CallSpan(11.0, 15.0, 30.0, 3.0)], "c": []}
    assert replica_timing(spans, since=8.0) == {
        "replicas": 2, "calls": 3, "first_batch_s": 2.0, "last_batch_s": 7.0,
        "busy_fraction": round((2 + 1 + 4) / (4 + 4), 4), "device_busy_fraction": round(5 / 8, 4),
        "steady_audio_s_per_s": 60 / 5, "model_audio_s_per_s": round(60 / 7, 2)}
    spans["b"] = [CallSpan(11.0, 15.0, 30.0)]  # a transcriber that does not say its device time
    assert "device_busy_fraction" not in replica_timing(spans, since=8.0)
    assert replica_timing({}, since=0.0) == {}
    # The model's speed inside calls (60 audio s in 7 s of calls); decode's per CPU and the CPUs it needs.
    timing = replica_timing(spans, since=8.0, decoded=(60.0, 20.0))
    assert timing["model_audio_s_per_s"] == round(60 / 7, 2) and timing["decode_audio_s_per_cpu_s"] == 3.0
    assert timing["decode_cpus_per_replica"] == round(60 / 7 / 3.0, 2)
    assert "decode_cpus_per_replica" not in replica_timing(spans, since=8.0, decoded=(0.0, 0.0))
    slow = replica_timing(spans, since=8.0, decoded=(0.01, 10.0))  # decode at 0.001 audio s per CPU-second
    assert slow["decode_audio_s_per_cpu_s"] == 0.0 and slow["decode_cpus_per_replica"] == round(60 / 7 / 0.001, 2)
    starts = {"a": ReplicaStart(9.0, 9.5, 9.9), "b": ReplicaStart(None, 9.6, 10.2)}  # "a" ran the first batch
    timing = replica_timing(spans, since=8.0, starts=starts)
    assert (timing["process_start_s"], timing["ready_s"], timing["load_s"]) == (1.0, 1.9, pytest.approx(0.4))
    start = stage.start  # this process's, as the replica's own
    assert start.process is not None and start.process <= start.load_start <= start.load_end <= span.start


def test_starved_replicas_are_told_how_many_decoding_cpus_they_need():
    """Replicas busy under 90% of the time whose decode had fewer CPUs than the measured speeds
    need get one line naming the need; busy replicas, or enough CPUs, get none."""
    timing = {"replicas": 2, "busy_fraction": 0.5, "model_audio_s_per_s": 800.0,
              "decode_audio_s_per_cpu_s": 100.0, "decode_cpus_per_replica": 8.0}
    advice = decode_shortfall(timing, decode_cpus=6)
    assert advice.startswith("the replicas waited for audio 50% of the time: each needs ~8 decoding CPUs")
    assert "(the model ran 800 audio s/s, decode 100 per CPU), and the cluster left 6 CPUs for 2 replicas;" in advice
    assert decode_shortfall(timing, decode_cpus=16) is None  # enough CPUs: the wait was something else
    assert decode_shortfall(timing, decode_cpus=15.9) is not None
    assert decode_shortfall(timing | {"busy_fraction": 0.9}, decode_cpus=6) is None  # busy enough
    assert decode_shortfall(timing | {"busy_fraction": 0.89}, decode_cpus=6) is not None
    assert decode_shortfall({"replicas": 1, "busy_fraction": 0.5}, decode_cpus=1) is None  # no decode timings


def test_the_audio_column_is_read_in_place():
    """The stage reads each row as a view of its chunk's buffer: no sample is copied."""
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in LENGTHS]
    chunked = _chunked(_decoded_table(waves))
    views = S.audio_views(chunked[S.AUDIO])
    buffers = [chunk.values.to_numpy() for chunk in chunked[S.AUDIO].chunks for _ in range(len(chunk))]
    assert all(np.array_equal(v, w) and np.shares_memory(v, b) for v, w, b in zip(views, waves, buffers, strict=True))


def _manifest(rows: list[tuple[str, str, int | None]]) -> pa.Table:
    return pa.table({S.ID: [r[0] for r in rows], S.PATH: [r[1] for r in rows], S.DATASET_ROW: [r[2] for r in rows],
                     S.REFERENCE: [None] * len(rows)}, schema=S.MANIFEST_SCHEMA)


def test_decode_stage_decodes_each_row_or_names_its_error(tmp_path):
    rate, wave = 8_000, np.sin(np.arange(8_000) / 7).astype(np.float32)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "a.wav", wave, rate)
    (corpus / f"{CRASH_MARKER}.wav").write_bytes((corpus / "a.wav").read_bytes())
    sf.write(tmp_path / "outside.wav", wave, rate)
    # A Hugging Face data file: its rows' audio is read by the stage, one row group per row here.
    audio = [{"bytes": b"not audio", "path": "x.wav"}, {"bytes": (corpus / "a.wav").read_bytes(), "path": "a.wav"},
             {"bytes": None, "path": "a.wav"}]  # a row that names its file (beside the data file) holds no bytes
    pq.write_table(pa.table({"audio": audio}), corpus / "train.parquet", row_group_size=1)
    table = _manifest([("a", str(corpus / "a.wav"), None), ("row", str(corpus / "train.parquet"), 1),
                       ("named", str(corpus / "train.parquet"), 2),
                       ("missing", str(corpus / "b.wav"), None), ("outside", str(tmp_path / "outside.wav"), None),
                       ("crash", str(corpus / f"{CRASH_MARKER}.wav"), None),
                       ("bad-row", str(corpus / "train.parquet"), 0),
                       ("no-row", str(corpus / "train.parquet"), 7), ("no-file", str(corpus / "gone.parquet"), 0)])
    stage = DecodeStage(FrontEnd(16_000, True), InputConfig(allowed_roots=[str(corpus)]), AudioConfig(),
                        DecodeConfig(function=FUNCTION, max_attempts=1), whole_samples=16_000)
    out = stage(table)
    assert out.schema == S.DECODED_SCHEMA
    rows = {r[S.ID]: r for r in out.to_pylist()}
    expected = decode(str(corpus / "a.wav")).audio
    for row_id in ("a", "row", "named"):
        assert np.array_equal(np.asarray(rows[row_id][S.AUDIO], np.float32), expected)
        assert (rows[row_id][S.SAMPLE_RATE], rows[row_id][S.NUM_SAMPLES], rows[row_id][S.ERROR]) == (rate, 16_000, None)
    errors = [(rows[i][S.ERROR_KIND], rows[i][S.ERROR_STAGE], rows[i][S.NUM_SAMPLES])
              for i in ("missing", "outside", "crash", "bad-row", "no-row", "no-file")]
    assert errors == [("not_found", "decode", 0), ("not_allowed", "decode", 0), ("worker_crash", "decode", 0),
                      ("decode_error", "decode", 0), ("not_found", "decode", 0), ("not_found", "decode", 0)]
    assert rows["outside"][S.ERROR].startswith(f"not_allowed: {tmp_path / 'outside.wav'}: resolves to")
    assert rows["bad-row"][S.ERROR].startswith(f"decode_error: {corpus / 'train.parquet'} row 0: libsndfile")
    assert "Format not recognised" in rows["bad-row"][S.ERROR] and "<_io." not in rows["bad-row"][S.ERROR]
    assert rows["no-row"][S.ERROR].startswith(f"not_found: {corpus / 'train.parquet'} row 7: no such row")
    assert rows["no-file"][S.ERROR] == f"not_found: {corpus / 'gone.parquet'}: no such file"


class StartsAheadTranscriber(CTCTranscriber):
    """The real model code, recording its calls; a batch holding a BAD_START row fails when started,
    one holding a BAD_FINISH row when finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def start(self, waves, logprobs=False):
        self.calls.append(("start", sorted(len(w) for w in waves)))
        if BAD_START in [len(w) for w in waves]:
            raise RuntimeError("CUDA out of memory (injected)")
        return super().start(waves, logprobs)

    def finish(self, started):
        self.calls.append(("finish", len(started.frames)))
        if self.frames([BAD_FINISH])[0] in started.frames:
            raise ValueError("undecodable ids (injected)")
        return super().finish(started)


def test_the_real_model_code_starts_batches_ahead_and_a_failing_row_fails_alone(group_model, caplog):
    """The stage with the replica's model code: each batch starts before the one ahead finishes (on a
    GPU the host decodes while the GPU runs); a batch whose start or finish raises is retried row by
    row, so only the row that fails alone becomes an ``inference_error`` row, and every other row is
    the reference's."""
    rng = np.random.default_rng(0)
    waves = [normalize(rng.standard_normal(n).astype(np.float32)) for n in LENGTHS]
    transcriber = StartsAheadTranscriber(ModelSpec(str(group_model)), device="cpu", precision="fp32")
    stage = TranscribeStage(lambda: transcriber, InferenceConfig(max_batch_samples=100_000), "m", METADATA,
                            WINDOWING, words=True)
    out = stage(_chunked(_decoded_table(waves))).to_pylist()

    ref = Reference.from_pretrained(group_model)
    for row, n, wave in zip(out, LENGTHS, waves, strict=True):
        if n == 300:
            assert row[S.ERROR_KIND] == ErrorKind.TOO_SHORT and row[S.TRANSCRIPT] is None
        elif n in (BAD_START, BAD_FINISH):
            assert row[S.ERROR_KIND] == ErrorKind.INFERENCE_ERROR and row[S.ERROR_STAGE] == Stage.TRANSCRIBE
            assert row[S.PATH] in row[S.ERROR] and "(injected)" in row[S.ERROR] and row[S.TRANSCRIPT] is None
        else:
            assert row[S.ERROR_KIND] is None and row[S.TRANSCRIPT] == ref(wave), n
            assert row[S.PADDED_SAMPLES] >= n
    calls = transcriber.calls
    # Batch k + 1 starts before batch k finishes: starts and finishes alternate after the first start.
    planned = [c for c in calls if c[0] == "start" and len(c[1]) > 1]
    assert len(planned) >= 3 and calls[0][0] == calls[1][0] == "start" and calls[2][0] == "finish"
    assert caplog.text.count("retrying them one at a time") == 2  # the two batches holding a bad row
    # On a CPU the device time is the forwards' own: within the call's span.
    span = stage.last_span
    assert 0 < span.device_s <= span.end - span.start and transcriber.device_s == span.device_s


def test_a_replica_logs_at_the_drivers_level_to_stderr(group_model):
    """Ray workers start with logging's defaults (warnings only); given the driver's level, the
    replica says what it loaded and how long that took on stderr, which Ray forwards to the driver.
    A fresh interpreter, as a Ray worker is."""
    code = ("import logging; from pipeline.config import InferenceConfig; "
            "from pipeline.model.spec import ModelSpec, TranscriberLoader; "
            "from pipeline.transcribe import TranscribeStage; from pipeline.windows import Windowing; "
            f"TranscribeStage(TranscriberLoader(ModelSpec({str(group_model)!r}), "
            "InferenceConfig(device='cpu', precision='fp32'), 1), "
            "InferenceConfig(), 'm', {}, Windowing.of(40, (5, 5), 16000, 320), words=True, log_level=logging.INFO)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent, check=True)
    assert re.search(r"INFO pipeline\.model\.spec: torch and transformers imported in [\d.]+ s", run.stderr)
    assert re.search(r"INFO pipeline\.model\.spec: model loaded and probed in [\d.]+ s", run.stderr)
    assert re.search(r"INFO pipeline\.model\.transcriber: loaded .* on cpu \(fp32, 1 threads, .*batch-invariant: True",
                     run.stderr)
    assert re.search(r"INFO pipeline\.transcribe: replica ready in [\d.]+ s", run.stderr)
