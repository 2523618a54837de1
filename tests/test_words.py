"""Word timestamps and confidence: the tokenizer's word offsets for short files, speech onsets on a
long recording of known clips, and a confidence that falls as the error rate rises."""

from __future__ import annotations

import jiwer
import numpy as np
import pytest

from jobs.long_audio import decoded_table, long_recording
from pipeline import bundled
from pipeline import schema as S
from pipeline.audio import decode, normalize
from pipeline.config import InferenceConfig, InputConfig
from pipeline.manifest import read_manifest
from pipeline.model.spec import ModelSpec
from pipeline.model.transcriber import CTCTranscriber
from pipeline.transcribe import TranscribeStage
from pipeline.windows import Windowing

RATE, HOP = 16_000, 320


@pytest.fixture(scope="module")
def demo():
    return CTCTranscriber(ModelSpec(bundled.model_path("@demo")), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def heldout():
    manifest = read_manifest(InputConfig(path="@heldout"))
    waves = [decode(p).audio for p in manifest[S.PATH].to_pylist()]
    return waves, manifest[S.REFERENCE].to_pylist()


def test_words_are_the_tokenizers_word_offsets(demo, heldout):
    """On every held-out clip, each word and its frames are what ``tokenizer.decode(ids,
    output_word_offsets=True)`` gives (the transformers pipeline's ``return_timestamps="word"``)."""
    waves, _ = heldout
    checked = 0
    for ids, top in demo.finish(demo.start(waves[:20])) + demo.finish(demo.start(waves[20:])):
        theirs = demo.tokenizer.decode(ids.tolist(), output_word_offsets=True)["word_offsets"]
        ours = demo.words(ids, top)
        assert [(w, a, b) for w, a, b, _ in ours] == [(o["word"], o["start_offset"], o["end_offset"]) for o in theirs]
        assert all(0 < c <= 1 for *_, c in ours)
        checked += len(ours)
    assert checked > 100


def test_word_starts_follow_the_speech_onsets_of_a_long_recording(demo, tmp_path):
    """A 4-minute recording of clips at known places: a word starts within 0.5 s of at least 85% of
    the clips' speech onsets (energy-based: the first 10 ms frame above a tenth of the clip's loudest)."""
    spans = long_recording(tmp_path / "long.flac", 240, seed=1)
    wave = decode(str(tmp_path / "long.flac"), do_normalize=False).audio
    windowing = Windowing.of(40.0, (4.0, 4.0), RATE, HOP)
    stage = TranscribeStage(lambda: demo, InferenceConfig(), "@demo", {}, windowing, words=True)
    row = stage(decoded_table([wave])).to_pylist()[0]
    starts = np.array([w["start_s"] for w in row[S.WORDS]])
    assert np.all(np.diff(starts) > 0) and starts[-1] < len(wave) / RATE
    assert all(w["start_s"] < w["end_s"] for w in row[S.WORDS])
    onsets = []
    for a, b in spans:
        rms = np.sqrt(np.mean(wave[a:b][: (b - a) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
        onsets.append((a + int(np.argmax(rms > 0.1 * rms.max())) * 160) / RATE)
    near = [np.min(np.abs(starts - onset)) <= 0.5 for onset in onsets]
    print(f"a word within 0.5 s of {np.mean(near):.1%} of {len(onsets)} speech onsets")
    assert np.mean(near) >= 0.85
    assert row[S.CONFIDENCE] == pytest.approx(np.mean([w["confidence"] for w in row[S.WORDS]]), rel=1e-6)


def test_lower_confidence_goes_with_higher_error(demo, heldout):
    """The held-out clips, clean and with noise added at three levels: rows' confidence and their
    character error rate have a clearly negative rank correlation."""
    waves, refs = heldout
    rng = np.random.default_rng(0)
    noisy, texts = [], []
    for level in (0.0, 0.5, 1.0, 1.5):
        noisy += [normalize(w + level * rng.standard_normal(len(w)).astype(np.float32)) for w in waves]
        texts += refs
    stage = TranscribeStage(lambda: demo, InferenceConfig(), "@demo", {}, Windowing.of(40.0, (4.0, 4.0), RATE, HOP),
                            words=False)
    rows = stage(decoded_table(noisy)).to_pylist()
    cer = np.array([jiwer.cer(t, r[S.TRANSCRIPT] or "") for t, r in zip(texts, rows, strict=True)])
    confidence = np.array([r[S.CONFIDENCE] or 0.0 for r in rows])

    def ranks(x):
        return np.argsort(np.argsort(x))

    rho = np.corrcoef(ranks(confidence), ranks(cer))[0, 1]
    print(f"rank correlation of confidence and CER: {rho:.2f} over {len(rows)} rows")
    assert cer.max() > 0.3 and rho < -0.5
