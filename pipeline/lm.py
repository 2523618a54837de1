"""Step 2b, n-gram LM decoding: the replicas' log-probabilities → transcripts, words and confidence,
by pyctcdecode's beam search with a KenLM model. Pure: no Ray, no torch.

It runs in CPU tasks after the replicas (``pipeline.engine``), so a GPU never waits on a beam
search: with an LM the replicas hand over each row's frame log-probabilities in float16 (the
vocabulary per frame, a long row's windows stitched) instead of texts. Rows without them (error
rows) pass untouched. Each worker process builds its decoder once per LM and keeps it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import bundled, storage
from pipeline import schema as S
from pipeline.errors import ConfigError
from pipeline.scoring import row_scores
from pipeline.windows import Windowing

log = logging.getLogger(__name__)

_KENLM_BINARY = b"mmap lm http://kheafield.com/code"
_PACKAGES = ("pyctcdecode", "kenlm")
_DECODERS: dict[LanguageModel, object] = {}  # one per worker process and LM (its load takes seconds)


@dataclass(frozen=True)
class LanguageModel:
    """An n-gram LM decoder's settings, settled on the driver: the model's ``labels`` (its CTC
    vocabulary in id order, :func:`pipeline.model.spec.ctc_labels`) and a KenLM ``file`` (a path, a
    URI or ``@demo-lm``), or a checkpoint's own decoder (``checkpoint``: a local folder, or a hub id
    at ``revision``)."""

    labels: tuple[str, ...]
    file: str | None = None
    checkpoint: str | None = None
    revision: str | None = None
    alpha: float | None = None  # None: the checkpoint's, else pyctcdecode's default
    beta: float | None = None
    beam_width: int = 100
    unigrams: str | None = None
    hotwords: tuple[str, ...] = ()
    hotword_weight: float = 10.0

    @staticmethod
    def installed() -> bool:
        """Whether the packages an LM decoder needs are installed."""
        return all(importlib.util.find_spec(m) is not None for m in _PACKAGES)

    @property
    def blank(self) -> int:
        """The CTC blank's id (the label read as "")."""
        return self.labels.index("")

    def check(self) -> None:
        """Raise :class:`ConfigError` unless ``file`` is a KenLM model that loads (on the driver,
        before any audio is read); a URI is checked by its first bytes only."""
        missing = [m for m in _PACKAGES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"decoding.lm: an n-gram LM needs {' and '.join(missing)}: pip install "
                              "'corpus-transcribe[lm]' && pip install --no-deps pyctcdecode==0.5.0 "
                              "(or decoding.lm=none for greedy decoding)")
        if "" not in self.labels:
            raise ConfigError("decoding.lm: the model's vocabulary has no CTC blank (its tokenizer's pad token); "
                              "an LM cannot decode it (decoding.lm=none)")
        if self.file is None:
            return
        path = bundled.lm_path(self.file)
        try:
            head = _head(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"decoding.lm = {self.file!r}: cannot read it ({storage.reason(exc)})") from None
        if not (head.lstrip().startswith(b"\\data\\") or head.startswith(_KENLM_BINARY)):
            raise ConfigError(f"decoding.lm = {self.file!r}: not a KenLM model (neither ARPA, which starts "
                              "with \\data\\, nor KenLM's binary format)")
        if not storage.is_uri(path):
            import kenlm

            try:
                kenlm.Model(path)
            except (OSError, RuntimeError) as exc:
                raise ConfigError(f"decoding.lm = {self.file!r}: KenLM cannot load it ({_first_line(exc)})") from None

    def decoder(self):
        """This process's pyctcdecode decoder for this LM (built on first use)."""
        if self not in _DECODERS:
            _DECODERS[self] = self._build()
        return _DECODERS[self]

    def _build(self):
        import pyctcdecode

        logging.getLogger("pyctcdecode").setLevel(logging.ERROR)  # its notes on small vocabularies
        if self.checkpoint is not None:
            if os.path.isdir(self.checkpoint):
                decoder = pyctcdecode.BeamSearchDecoderCTC.load_from_dir(self.checkpoint)
            else:  # what Wav2Vec2ProcessorWithLM.from_pretrained downloads of a hub checkpoint
                decoder = pyctcdecode.BeamSearchDecoderCTC.load_from_hf_hub(
                    self.checkpoint, revision=self.revision, allow_patterns=["language_model/*", "alphabet.json"])
            decoder.reset_params(alpha=self.alpha, beta=self.beta)
            return decoder
        unigrams = None
        if self.unigrams is not None:
            unigrams = storage.read_bytes(self.unigrams).decode().split()
        return pyctcdecode.build_ctcdecoder(
            list(self.labels), kenlm_model_path=_local(bundled.lm_path(self.file)), unigrams=unigrams,
            alpha=0.5 if self.alpha is None else self.alpha, beta=1.0 if self.beta is None else self.beta)


def _head(location: str) -> bytes:
    """The first bytes of a file or object (not the whole of a many-GB LM)."""
    with storage.open_stream(location) as fh:
        return fh.read(64)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _local(location: str) -> str:
    """A local path for KenLM, which reads only local files: a URI's object downloaded once per process."""
    if not storage.is_uri(location):
        return location
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), f"corpus-transcribe-lm-{digest}-{os.getpid()}")
    if not os.path.exists(target):
        storage.write_bytes(target, storage.read_bytes(location))
    return target


# A beam's text grows by copying, so one search over an hour of frames slows with its length
# squared: longer rows are searched in pieces of at most this many frames (30 s at 50 frames a
# second), cut in the longest run of blank frames (a pause) in each piece's last quarter.
SEGMENT_FRAMES = 1500


def segments(blank: np.ndarray, most: int = SEGMENT_FRAMES) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces of a row whose frames' best token is the blank where ``blank``, each
    at most ``most`` frames, cut in the middle of the longest blank run in a piece's last quarter."""
    pieces, start, n = [], 0, len(blank)
    while n - start > most:
        lo, hi = start + most * 3 // 4, start + most
        best, run, cut = 0, 0, hi
        for f in range(lo, hi):
            run = run + 1 if blank[f] else 0
            if run > best:
                best, cut = run, f - run // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


class LMDecodeStage:
    """Rows with :data:`pipeline.schema.LOGPROBS` (the output schema plus that column) → output rows
    (without it), one for one, in order: each beam-searched (a long row in :func:`segments`), its
    words from the best beam's word frames (seconds: ``windowing.seconds``; confidence: the mean over
    the word's frames of the top posterior), and its confidence the mean of its words'."""

    def __init__(self, lm: LanguageModel, windowing: Windowing):
        self.lm, self.windowing = lm, windowing

    def __call__(self, table: pa.Table) -> pa.Table:
        decoder = self.lm.decoder()
        texts = table[S.TRANSCRIPT].to_pylist()
        words: list = [None] * table.num_rows
        confidence: list = [None] * table.num_rows
        column = table[S.LOGPROBS].combine_chunks()
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        for i in range(table.num_rows):
            if not column[i].is_valid:
                continue
            # this row's slice of the column's one buffer (to_pylist would make a Python float of each)
            logprobs = values[offsets[i]:offsets[i + 1]].astype(np.float32).reshape(-1, len(self.lm.labels))
            top = np.exp(logprobs.max(axis=1))
            found = []  # (word, first frame, end frame, confidence) over the whole row
            for a, b in segments(logprobs.argmax(axis=1) == self.lm.blank):
                best = decoder.decode_beams(logprobs[a:b], beam_width=self.lm.beam_width,
                                            hotwords=list(self.lm.hotwords), hotword_weight=self.lm.hotword_weight)[0]
                found += [(w, a + start, a + end, float(top[a + start:max(a + end, a + start + 1)].mean()))
                          for w, (start, end) in best[2]]
            texts[i] = " ".join(w for w, *_ in found)
            words[i], confidence[i] = S.word_entries(found, self.windowing.seconds)
        schema = table.schema.remove(table.schema.get_field_index(S.LOGPROBS))  # the replica's metadata kept
        wers, cers = row_scores(table[S.REFERENCE].to_pylist(), texts)
        columns = {S.TRANSCRIPT: texts, S.CONFIDENCE: confidence, S.WORDS: words, S.WER: wers, S.CER: cers}
        return pa.table([pa.array(columns[f.name], f.type) if f.name in columns else table[f.name] for f in schema],
                        schema=schema)
