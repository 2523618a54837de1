"""Error rates: the one normalisation, per-row rates, corpus rates as errors over words with their
bootstrap interval, errors by kind and by duration."""

from __future__ import annotations

import jiwer
import pytest

from pipeline.scoring import corpus_scores, normalize, row_scores


def test_normalisation_matches_an_upper_case_vocabulary_with_apostrophes():
    assert normalize("Don't stop!  'Quoted', rock'n'roll -- ok_1") == "DON'T STOP QUOTED ROCK'N'ROLL OK 1"
    assert normalize(None) == normalize("") == normalize(" ?! ") == ""


def test_rows_without_a_reference_or_a_transcript_have_no_rates():
    wer, cer = row_scores(["the cat sat", None, "a b", "", "Hi!"], ["THE CAT", "x", None, "y", "hi"])
    assert wer[0] == pytest.approx(1 / 3) and cer[0] == pytest.approx(jiwer.cer("THE CAT SAT", "THE CAT"))
    assert wer[1:4] == [None, None, None] and cer[1:4] == [None, None, None]
    assert (wer[4], cer[4]) == (0.0, 0.0)  # punctuation and case are not errors


def test_corpus_rates_are_errors_over_reference_words_not_a_mean_of_rows():
    refs, hyps = ["the cat sat on", "a b c", "x y", None], ["THE CAT SAT IN", "a c", "x y z w", "ignored"]
    scores = corpus_scores(refs, hyps, [3.0, 12.0, 50.0, 1.0])
    assert scores["rows"] == 3
    assert scores["wer"] == pytest.approx(jiwer.wer(refs[:3], [h.lower() for h in hyps[:3]])) == pytest.approx(4 / 9)
    assert scores["word_errors"] == {"substitutions": 1, "deletions": 1, "insertions": 2, "reference_words": 9}
    low, high = scores["wer_95"]
    assert low <= scores["wer"] <= high
    by_duration = {"0-5": {"rows": 1, "wer": 0.25}, "10-20": {"rows": 1, "wer": pytest.approx(1 / 3)},
                   "40+": {"rows": 1, "wer": 1.0}}
    assert scores["wer_by_duration_s"] == by_duration
    assert corpus_scores([None], ["x"], [1.0]) is None
