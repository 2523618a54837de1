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
            # What each token reads as in a word, the word delimiter as the tokenizer replaces it.
            delimiter = getattr(tokenizer, "word_delimiter_token", None)
            self.chars = [tokenizer.replace_word_delimiter_char if t == delimiter else t for t in tokens]
            self.space = tokenizer.replace_word_delimiter_char

    def words(self, ids: np.ndarray, confidence: np.ndarray) -> list[tuple[str, int, int, float]]:
        """The words of one row's argmax ids, as ``tokenizer.decode(ids, output_word_offsets=True)``
        gives them: ``(word, start frame, end frame (exclusive), confidence)``, the confidence the
        mean over the word's frames of ``confidence`` (each frame's top posterior)."""
        if self.canonical is None or len(ids) == 0 or ids.max() >= len(self.canonical):
            return self._tokenizer_words(ids, confidence)
        token = self.canonical[ids]
        ends = np.append(np.flatnonzero(token[1:] != token[:-1]) + 1, len(token))  # runs of one token
        starts = np.append(0, ends[:-1])
        keep = token[starts] != self.blank
        words, current, first, last = [], "", 0, 0
        for tok, start, end in zip(token[starts[keep]].tolist(), starts[keep].tolist(), ends[keep].tolist(),
                                   strict=True):
            char = self.chars[tok]
            if char == self.space:
                if current:
                    words.append((current, first, last))
                current = ""
            else:
                if not current:
                    first = start
                current, last = current + char, end
        if current:
            words.append((current, first, last))
        return [(w, a, b, float(confidence[a:b].mean())) for w, a, b in words]

    def _tokenizer_words(self, ids: np.ndarray, confidence: np.ndarray) -> list[tuple[str, int, int, float]]:
        offsets = self.tokenizer.decode(ids.tolist(), output_word_offsets=True).get("word_offsets") or []
        return [(o["word"], o["start_offset"], o["end_offset"],
                 float(confidence[o["start_offset"]:o["end_offset"]].mean())) for o in offsets]

    def decode_sequences(self, sequences: Sequence[np.ndarray]) -> list[str]:
        """The texts of 1-D id sequences of any lengths."""
        frames = [len(s) for s in sequences]
        ids = np.zeros((len(sequences), max(frames, default=0)), dtype=np.int64)
        for row, sequence in zip(ids, sequences, strict=True):
            row[: len(sequence)] = sequence
        return self(ids, frames)

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
