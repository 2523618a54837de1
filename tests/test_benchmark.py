"""The benchmark's own measures: the roofline's count of the forward's arithmetic on the meta device
must be the real forward's; stage-alone must run the job's calls on every row."""

import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCTC

from jobs.benchmark import forward_flops, job_config, make_corpus, stage_alone
from pipeline.engine import plan


def test_flops_counted_on_the_meta_device_are_the_real_forwards(group_model):
    waves = [np.zeros(n, np.float32) for n in (16_000, 9_000, 4_000, 3_999)]
    plan = [[0, 1], [2, 3]]  # padded to each batch's first (longest) row, as path 3's batches are
    # Its positional conv is weight-normed. Eager attention: the counter has no formula for the CPU's
    # flash attention, so SDPA's products would go uncounted here.
    model = AutoModelForCTC.from_pretrained(group_model, attn_implementation="eager").eval()
    # no_grad: under inference_mode FlopCounterMode cannot compute a weight-normed conv's weight.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for rows in plan:
            model(torch.zeros(len(rows), len(waves[rows[0]])))
    real = counter.get_total_flops()
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.convolution", "aten.addmm", "aten.bmm"}
    assert forward_flops(str(group_model), waves, plan) == real


def test_stage_alone_runs_the_jobs_calls_and_fails_on_a_row_without_a_transcript(group_model, tmp_path):
    corpus = tmp_path / "corpus"
    paths = make_corpus(corpus, minutes=0.5)
    overrides = ["decode.rows_per_task=2", "inference.rows_per_call=3"]  # calls that span decode blocks
    cfg = job_config(str(group_model), corpus, tmp_path / "out", "fp32", overrides)
    seconds = stage_alone(plan(cfg), threads=1, passes=2)
    assert len(paths) > 3 and len(seconds) == 2 and all(s > 0 for s in seconds)

    (corpus / "utt9999.flac").write_bytes(b"not audio")
    message = r"stage-alone: 1 rows without a transcript, the first decode_error: .*utt9999"
    with pytest.raises(RuntimeError, match=message):
        stage_alone(plan(cfg), threads=1, passes=1)


def test_the_stand_in_queues_batches_like_an_accelerator_and_waits_only_for_them():
    """start() returns at once, the "device" runs batches back to back, finish() waits for its batch."""
    from jobs.stand_in import StandInTranscriber

    stand_in = StandInTranscriber(rate=10.0)  # 1 s of padded audio takes 0.1 s
    batches = [[np.zeros(16_000, np.float32)] * 2, [np.zeros(8_000, np.float32), np.zeros(4_000, np.float32)]]
    started = time.monotonic()
    first, second = stand_in.start(batches[0]), stand_in.start(batches[1])
    assert time.monotonic() - started < 0.1  # queued, not run
    assert second[0] - first[0] == pytest.approx(0.1, abs=1e-6)  # 2 x 0.5 s padded after 2 x 1 s
    assert [len(ids) for ids, _ in stand_in.finish(second)] == [0, 0] and time.monotonic() - started >= 0.3
    results = list(stand_in.transcribe_batches(batches))
    assert [stand_in.decode([ids for ids, _ in r]) for r in results] == [["", ""], ["", ""]]
    assert stand_in.precision == "stand-in" and stand_in.words(*results[0][0]) == []


def test_the_silent_decoder_gives_the_headers_duration_of_silence(tmp_path):
    """jobs.stand_in.silent_decode, decode.function's stand-in: no codec, the real length at the target rate."""
    import soundfile as sf

    from jobs.stand_in import silent_decode

    path = tmp_path / "a.flac"
    sf.write(path, np.full(44_100 * 2, 0.25, np.float32), 44_100)
    for decoded in (silent_decode(str(path)), silent_decode("a.flac row 0", path.read_bytes())):
        assert (decoded.sample_rate, decoded.num_channels, decoded.duration_s) == (44_100, 1, 2.0)
        assert len(decoded.audio) == 32_000 and decoded.audio.dtype == np.float32 and not decoded.audio.any()
