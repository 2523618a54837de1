"""Step 2, transcribe: decoded rows → output rows. Pure: no Ray, and no torch until the injected
loader runs (in the replica).

Each call sorts its rows by length and packs them into padded batches under a budget
(:func:`pipeline.batching.plan_batches`); error rows pass through untouched, a row too short for
the model becomes a ``too_short`` row, and a batch that fails is retried row by row, so only a row
that fails alone becomes an ``inference_error`` row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.batching import plan_batches
from pipeline.config import InferenceConfig
from pipeline.errors import ErrorKind, Stage
from pipeline.logs import log_to_stderr

log = logging.getLogger(__name__)


class Transcriber(Protocol):
    """What the stage needs of a model replica (:class:`pipeline.model.transcriber.CTCTranscriber`)."""

    min_samples: int  # shorter rows are too_short
    precision: str  # as it runs (inference.precision's auto resolved), recorded in the output's metadata

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]]) -> Iterator[list[str] | Exception]:
        """Texts for each batch in turn, or the exception that batch raised."""

    def release_memory(self) -> None:
        """Called after each call's batches."""


class TranscribeStage:
    """Decoded rows (:data:`pipeline.schema.DECODED_SCHEMA`) → output rows (the output schema with
    ``metadata``), one for one, in order. ``load`` builds the transcriber once, in the replica."""

    def __init__(self, load: Callable[[], Transcriber], inference: InferenceConfig, model_name: str,
                 metadata: dict, log_level: int | None = None):
        if log_level is not None:  # in a Ray worker (see log_to_stderr)
            log_to_stderr(log_level)
        started = time.perf_counter()
        self.transcriber = load()
        log.info("replica ready in %.1f s (imports, model load and probes)", time.perf_counter() - started)
        self.model_name = model_name
        self.max_batch_samples = inference.max_batch_samples
        self.max_padding_waste = inference.max_padding_waste
        self.schema = S.output_schema({**metadata, "precision": self.transcriber.precision})

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        waves = S.audio_views(table[S.AUDIO])
        transcripts: list[str | None] = [None] * n
        kinds = table[S.ERROR_KIND].to_pylist()
        errors = table[S.ERROR].to_pylist()
        stages = table[S.ERROR_STAGE].to_pylist()
        padded = [0] * n

        def fail(i: int, kind: ErrorKind, message: str) -> None:
            kinds[i], errors[i], stages[i] = kind, f"{kind}: {message}", Stage.TRANSCRIBE

        paths = table[S.PATH].to_pylist()
        todo = []
        min_samples = self.transcriber.min_samples
        for i in range(n):
            if kinds[i] is not None:
                continue
            if len(waves[i]) < min_samples:
                fail(i, ErrorKind.TOO_SHORT, f"{paths[i]}: {len(waves[i])} samples after resampling, "
                     f"the model needs at least {min_samples}")
            else:
                todo.append(i)

        plan = plan_batches([len(waves[i]) for i in todo], self.max_batch_samples, self.max_padding_waste)
        for i, text, padded_len in self._run([[todo[b] for b in batch] for batch in plan], waves, paths, fail):
            transcripts[i], padded[i] = text, padded_len
        self.transcriber.release_memory()

        out = {
            S.ID: table[S.ID], S.PATH: table[S.PATH], S.TRANSCRIPT: transcripts,
            S.ERROR_KIND: kinds, S.ERROR: errors, S.ERROR_STAGE: stages,
            S.DURATION_S: table[S.DURATION_S], S.SAMPLE_RATE: table[S.SAMPLE_RATE],
            S.NUM_CHANNELS: table[S.NUM_CHANNELS], S.REFERENCE: table[S.REFERENCE],
            S.MODEL: [self.model_name] * n, S.NUM_SAMPLES: table[S.NUM_SAMPLES], S.PADDED_SAMPLES: padded,
        }
        return pa.table(out, schema=self.schema)

    def _run(self, batches, waves, paths, fail):
        """Yield ``(row, text, padded length)`` for every row of ``batches``, transcribed in turn.
        A failed batch is retried row by row, so a bad row fails alone."""
        results = self.transcriber.transcribe_batches([waves[i] for i in rows] for rows in batches)
        for rows, result in zip(batches, results, strict=True):
            if not isinstance(result, Exception):
                padded_len = max(len(waves[i]) for i in rows)
                yield from ((i, text, padded_len) for i, text in zip(rows, result, strict=True))
            elif len(rows) == 1:
                fail(rows[0], ErrorKind.INFERENCE_ERROR, f"{paths[rows[0]]}: {type(result).__name__}: {result}")
            else:
                log.warning("batch of %d rows failed (%s); retrying them one at a time", len(rows), result)
                yield from self._run([[i] for i in rows], waves, paths, fail)
