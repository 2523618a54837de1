"""Word and character error rates against the manifest's references, per row and per corpus. Pure:
no Ray, no torch.

Both texts are normalised the one way wav2vec2's English vocabularies spell (:func:`normalize`):
upper case, every character but letters, digits and apostrophes inside words dropped, whitespace
collapsed. So "Don't stop!" and "DON'T STOP" score as equal, and a reference's punctuation is never
an error. A corpus rate is errors over reference words (or characters), not a mean of rows'
rates; its 95% interval comes from resampling rows (bootstrap).
"""

from __future__ import annotations

import re

import jiwer
import numpy as np

_DROP = re.compile(r"[^\w' ]|_")
_LONE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
# Upper bounds of the duration buckets of the summary, in seconds.
DURATION_BUCKETS = (5.0, 10.0, 20.0, 40.0, float("inf"))
BOOTSTRAP_SAMPLES = 1000


def normalize(text: str | None) -> str:
    """``text`` as scored: upper case, only letters, digits and in-word apostrophes, single spaces."""
    if not text:
        return ""
    text = _LONE_APOSTROPHE.sub(" ", _DROP.sub(" ", text.upper()))
    return " ".join(text.split())


def row_scores(references: list[str | None], transcripts: list[str | None]) -> tuple[list, list]:
    """Each row's WER and CER; None where there is no reference (or it normalises to nothing) or no transcript."""
    wers, cers = [], []
    for ref, hyp in zip(references, transcripts, strict=True):
        r = normalize(ref)
        if not r or hyp is None:
            wers.append(None)
            cers.append(None)
            continue
        h = normalize(hyp)
        wers.append(float(jiwer.wer(r, h)))
        cers.append(float(jiwer.cer(r, h)))
    return wers, cers


def corpus_scores(references: list[str | None], transcripts: list[str | None], durations: list[float | None],
                  seed: int = 0) -> dict | None:
    """Corpus WER and CER (errors over reference words or characters) of the rows with a reference
    and a transcript, their 95% bootstrap intervals, the word errors by kind (substitutions,
    deletions, insertions) and the WER per duration bucket; None when no row has both."""
    normalized = ((normalize(r), h, d) for r, h, d in zip(references, transcripts, durations, strict=True))
    pairs = [(r, normalize(h), d) for r, h, d in normalized if r and h is not None]
    if not pairs:
        return None
    refs, hyps, durs = zip(*pairs, strict=True)
    words = jiwer.process_words(list(refs), list(hyps))
    chars = jiwer.process_characters(list(refs), list(hyps))
    word_errors = np.array([sum(_errors(a)) for a in words.alignments], dtype=float)
    word_counts = np.array([len(r.split()) for r in refs], dtype=float)
    char_errors = np.array([sum(_errors(a)) for a in chars.alignments], dtype=float)
    char_counts = np.array([len(r) for r in refs], dtype=float)
    out = {
        "rows": len(pairs),
        "wer": float(word_errors.sum() / word_counts.sum()),
        "wer_95": _bootstrap(word_errors, word_counts, seed),
        "cer": float(char_errors.sum() / char_counts.sum()),
        "cer_95": _bootstrap(char_errors, char_counts, seed),
        "word_errors": {"substitutions": words.substitutions, "deletions": words.deletions,
                        "insertions": words.insertions, "reference_words": int(word_counts.sum())},
        "wer_by_duration_s": {},
    }
    lower = 0.0
    d = np.array([np.nan if x is None else x for x in durs], dtype=float)
    for upper in DURATION_BUCKETS:
        inside = (d >= lower) & (d < upper)
        if inside.any():
            name = f"{lower:g}-{upper:g}" if np.isfinite(upper) else f"{lower:g}+"
            out["wer_by_duration_s"][name] = {"rows": int(inside.sum()),
                                              "wer": float(word_errors[inside].sum() / word_counts[inside].sum())}
        lower = upper
    return out


def _errors(alignment) -> list[int]:
    """Errors of one row's alignment chunks: a substitution or insertion counts each hypothesis word,
    a deletion each reference word."""
    counts = []
    for chunk in alignment:
        if chunk.type == "equal":
            continue
        counts.append(max(chunk.ref_end_idx - chunk.ref_start_idx, chunk.hyp_end_idx - chunk.hyp_start_idx))
    return counts


def _bootstrap(errors: np.ndarray, counts: np.ndarray, seed: int, chunk: int = 10) -> list[float]:
    """The 2.5th and 97.5th percentiles of errors over counts, rows resampled with replacement
    (``chunk`` resamples at a time: memory stays ~``chunk`` × rows, not 1,000 × rows)."""
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(0, BOOTSTRAP_SAMPLES, chunk):
        picks = rng.integers(0, len(errors), size=(chunk, len(errors)))
        rates.append(errors[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1))
    rates = np.concatenate(rates)
    return [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]
