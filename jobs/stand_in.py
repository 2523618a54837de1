"""A calibrated stand-in for a GPU replica's model, for measuring the job's own machinery on a CPU.

:class:`StandInTranscriber` has the transcriber's interface (:class:`pipeline.transcribe.Transcriber`)
and behaves like a model on an accelerator that runs ``rate`` audio-seconds per second of padded
batch: :meth:`start` queues a batch and returns at once, the "device" runs queued batches one after
another, and :meth:`finish` waits (sleeping, using no CPU) until that batch is done. So Ray Data's
scheduling, object-store transfers, per-call planning, the drain at each call's end, decoding and
writing are measured against a known ceiling: the job can at best run at ``rate``.

:func:`silent_decode` stands in for the codec the same way (``decode.function``): the decode
step's cost on Ray apart from decoding itself.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from pipeline.audio import Decoded

SAMPLE_RATE = 16_000


def silent_decode(path: str, data: bytes | None = None, *, target_rate: int = SAMPLE_RATE, **_limits) -> Decoded:
    """A decoder without a codec (``decode.function=jobs.stand_in:silent_decode``, with
    ``pipeline.audio.decode``'s signature): the header's duration of silence at ``target_rate``.
    Against the real decoder on Ray it splits the decode step's time into the codec's and what Ray
    Data, Arrow and isolation cost per file and per byte. For measuring only: it checks no limits,
    and an unreadable file is a ``decode_error`` row."""
    info = sf.info(io.BytesIO(data) if data is not None else path)
    return Decoded(np.zeros(round(info.frames * target_rate / info.samplerate), np.float32), info.samplerate,
                   info.channels, info.duration)


class StandInTranscriber:
    """Texts are empty; the time is the model's."""

    precision = "stand-in"

    def __init__(self, rate: float, min_samples: int = 400):
        self.rate = rate  # audio-seconds of padded batch per second
        self.min_samples = min_samples
        self._free_at = 0.0  # when the "device" has run every batch queued so far
        self.device_s = 0.0  # the "device's" time on batches so far

    def start(self, waves: Sequence[np.ndarray]) -> tuple[float, int]:
        """Pad the batch on the host, as the real replica does, and queue it; return when it will be
        done and its rows."""
        batch = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.float32)
        for row, wave in zip(batch, waves, strict=True):
            row[: len(wave)] = wave
        seconds = batch.size / SAMPLE_RATE / self.rate  # the "device's" time on this batch
        self.device_s += seconds
        self._free_at = max(time.monotonic(), self._free_at) + seconds
        return self._free_at, len(waves)

    def finish(self, started: tuple[float, int]) -> list[tuple[np.ndarray, ...]]:
        done_at, rows = started
        time.sleep(max(0.0, done_at - time.monotonic()))
        return [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * rows

    def decode(self, sequences: Sequence[np.ndarray]) -> list[str]:
        return [""] * len(sequences)

    def words(self, ids: np.ndarray, confidence: np.ndarray) -> list[tuple[str, int, int, float]]:
        return []

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]], logprobs: bool = False
                           ) -> Iterator[list | Exception]:
        """Each batch started before the one ahead is finished, as the real transcriber does (no
        log-probabilities: the stand-in has no vocabulary for an LM to decode)."""
        pending = None
        for waves in itertools.chain(batches, [None]):
            started = self.start(waves) if waves is not None else None
            if pending is not None:
                yield self.finish(pending)
            pending = started

    def release_memory(self) -> None:
        pass


@dataclass(frozen=True)
class StandInLoader:
    """Picklable: what a replica calls to build its stand-in (see ``TranscribeStage``'s ``load``)."""

    rate: float

    def __call__(self) -> StandInTranscriber:
        return StandInTranscriber(self.rate)
