"""Greedy CTC decoding: argmax ids → texts, exactly as the tokenizer's ``batch_decode`` gives them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import Wav2Vec2CTCTokenizer


class GreedyCTCDecoder:
    """Argmax ids → texts, exactly as ``tokenizer.batch_decode`` gives them for each row's frames.

    A ``Wav2Vec2CTCTokenizer`` merges repeated tokens and drops the blank (its pad token) in Python,
    token by token, slowly enough to matter beside a GPU's forward passes. Here the merging and
    dropping run on the whole batch in numpy, on ids mapped to one id per distinct token (so ids the
    tokenizer spells alike, e.g. unknown ones, merge as its tokens do), and the tokenizer gets the
    few ids left with ``group_tokens=False``, which does the rest as before (word delimiters,
    clean-up). Other tokenizers get the plain call. ``jobs.benchmark --decode-cost`` times both.
    """

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.canonical: np.ndarray | None = None
        if type(tokenizer) is Wav2Vec2CTCTokenizer:  # a subclass (remote code) may merge otherwise
            first: dict[str, int] = {}
            tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            self.canonical = np.array([first.setdefault(token, i) for i, token in enumerate(tokens)])
            self.blank = first.get(tokenizer.pad_token, -1)

    def __call__(self, ids: np.ndarray, frames: Sequence[int]) -> list[str]:
        """``ids`` ``(rows, T)``; each row's first ``frames[row]`` are its own."""
        if self.canonical is None or ids.max(initial=0) >= len(self.canonical):  # ids past the config's vocabulary
            return self.tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(frames)])
        token = self.canonical[ids]
        keep = np.ones(ids.shape, dtype=bool)
        keep[:, 1:] = token[:, 1:] != token[:, :-1]
        keep &= (token != self.blank) & (np.arange(ids.shape[1]) < np.asarray(frames)[:, None])
        return self.tokenizer.batch_decode([row[k].tolist() for row, k in zip(ids, keep, strict=True)],
                                           group_tokens=False)
