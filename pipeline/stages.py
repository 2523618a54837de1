"""The job's stages as callables on Arrow tables. Pure: no Ray (pipeline.engine maps them).

A bad row never raises: it becomes an error row (``error_kind``, ``error``, ``error_stage``)
and passes through the later stages untouched, so every input row reaches the output once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.audio import AudioError, Decoded, check_allowed, decode
from pipeline.batching import plan_batches
from pipeline.isolation import IsolatedDecoder

if TYPE_CHECKING:
    from pipeline.checkpoint import ModelSpec

log = logging.getLogger(__name__)

SHARD_PREFIX = "part-"  # output shards: part-<digest of their ids>.parquet


def _audio_column(waves: list[np.ndarray]) -> pa.LargeListArray:
    """One Arrow list array over a single concatenated buffer (no per-row Python objects)."""
    offsets = np.zeros(len(waves) + 1, dtype=np.int64)
    np.cumsum([len(w) for w in waves], out=offsets[1:])
    values = np.concatenate(waves) if waves else np.zeros(0, dtype=np.float32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))


def _waves(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Zero-copy numpy views of each row of a ``large_list<float32>`` column, chunk by chunk: Ray
    Data hands a replica one chunk per decode task's block, and combining them would copy every
    sample (~300 MB for a GPU replica's 512 rows, up to ~1 s where the pages are new)."""
    waves = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()  # a sliced chunk's offsets index its unsliced values
        values = chunk.values.to_numpy(zero_copy_only=True)
        waves.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return waves


# One isolated decoder per worker process, kept across tasks (Ray reuses its workers).
_DECODERS: dict[tuple[float, int], IsolatedDecoder] = {}


class DecodeStage:
    """Manifest rows → decoded, resampled, normalised audio (or error rows)."""

    def __init__(
        self,
        target_rate: int,
        do_normalize: bool,
        max_duration_s: float,
        max_file_bytes: float = float("inf"),
        allowed_roots: tuple[str, ...] = (),
        isolate: bool = False,
        timeout_s: float = 60.0,
        max_attempts: int = 2,
    ):
        self.kwargs = {"target_rate": target_rate, "do_normalize": do_normalize,
                       "max_duration_s": max_duration_s, "max_file_bytes": max_file_bytes}
        self.allowed_roots = tuple(os.path.realpath(r) for r in allowed_roots)
        self.isolation = (timeout_s, max_attempts) if isolate else None

    def _decode(self, path: str, data: bytes | None) -> Decoded:
        if data is None:
            check_allowed(path, self.allowed_roots)
        if self.isolation is None:
            return decode(path, data, **self.kwargs)
        if self.isolation not in _DECODERS:
            _DECODERS[self.isolation] = IsolatedDecoder(*self.isolation)
        return _DECODERS[self.isolation](path, data, **self.kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = {name: [] for name in S.DECODED_SCHEMA.names}
        rows = zip(
            table[S.ID].to_pylist(), table[S.PATH].to_pylist(),
            table[S.AUDIO_BYTES].to_pylist(), table[S.REFERENCE].to_pylist(),
            strict=True,
        )
        for row_id, path, data, reference in rows:
            cols[S.ID].append(row_id)
            cols[S.PATH].append(path)
            cols[S.REFERENCE].append(reference)
            try:
                d = self._decode(path, data)
            except AudioError as exc:
                kind, error, wave, info = exc.kind, f"{exc.kind}: {exc}", np.zeros(0, np.float32), (None,) * 3
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's, not the job's
                kind, error = S.ErrorKind.DECODE_ERROR, f"decode_error: {path}: {type(exc).__name__}: {exc}"
                wave, info = np.zeros(0, np.float32), (None,) * 3
            else:
                kind, error, wave, info = None, None, d.audio, (d.duration_s, d.sample_rate, d.num_channels)
            cols[S.ERROR_KIND].append(kind)
            cols[S.ERROR].append(error)
            cols[S.ERROR_STAGE].append(S.STAGE_DECODE if kind else None)
            cols[S.DURATION_S].append(info[0])
            cols[S.SAMPLE_RATE].append(info[1])
            cols[S.NUM_CHANNELS].append(info[2])
            cols[S.NUM_SAMPLES].append(len(wave))
            cols[S.AUDIO].append(wave)
        cols[S.AUDIO] = _audio_column(cols[S.AUDIO])
        return pa.table(cols, schema=S.DECODED_SCHEMA)


# The driver's log lines (jobs/transcribe.py) and the replicas' (log_to_stderr) look alike.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: int) -> None:
    """Send this package's log records at ``level`` and above to stderr, which Ray forwards to the
    driver. A Ray worker starts with Python's logging defaults, which print warnings only, so the
    replica's INFO lines (what it loaded, how, and how long it took) would be lost."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)


class TranscribeStage:
    """Decoded rows → output rows. Loads the model once; packs rows by length under a budget."""

    def __init__(
        self,
        spec: ModelSpec,
        max_batch_samples: int,
        max_padding_waste: float = 0.05,
        device: str = "auto",
        threads: int | None = None,
        precision: str = "fp32",
        conv_encoder: str = "auto",
        metadata: dict | None = None,
        log_level: int | None = None,
    ):
        if log_level is not None:  # in a Ray worker (see log_to_stderr)
            log_to_stderr(log_level)
        started = time.perf_counter()
        # Imported here, not at the top: torch + transformers take seconds to import, and every
        # decode worker unpickles this module without needing them.
        from pipeline.model import CTCTranscriber

        imported = time.perf_counter()
        self.transcriber = CTCTranscriber(spec, device=device, threads=threads, precision=precision,
                                          conv_encoder=conv_encoder)
        log.info("replica ready in %.1f s (torch and transformers imported in %.1f s, the model loaded and "
                 "probed in %.1f s)", time.perf_counter() - started, imported - started,
                 time.perf_counter() - imported)
        self.model_name = spec.name
        self.max_batch_samples = max_batch_samples
        self.max_padding_waste = max_padding_waste
        self.schema = S.output_schema(metadata or {})

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        waves = _waves(table[S.AUDIO])
        transcripts: list[str | None] = [None] * n
        kinds = table[S.ERROR_KIND].to_pylist()
        errors = table[S.ERROR].to_pylist()
        stages = table[S.ERROR_STAGE].to_pylist()
        padded = [0] * n

        def fail(i: int, kind: str, message: str) -> None:
            kinds[i], errors[i], stages[i] = kind, f"{kind}: {message}", S.STAGE_TRANSCRIBE

        paths = table[S.PATH].to_pylist()
        todo = []
        for i in range(n):
            if kinds[i] is not None:
                continue
            if len(waves[i]) < self.transcriber.min_samples:
                fail(i, S.ErrorKind.TOO_SHORT, f"{paths[i]}: {len(waves[i])} samples after resampling, "
                     f"the model needs at least {self.transcriber.min_samples}")
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
        """Yield ``(row, text, padded length)`` for every row of ``batches``, transcribed in turn
        (``CTCTranscriber.transcribe_batches``: on a GPU the host decodes one batch while the next
        runs). A failed batch is retried row by row, so a bad row fails alone."""
        results = self.transcriber.transcribe_batches([waves[i] for i in rows] for rows in batches)
        for rows, result in zip(batches, results, strict=True):
            if not isinstance(result, Exception):
                padded_len = max(len(waves[i]) for i in rows)
                yield from ((i, text, padded_len) for i, text in zip(rows, result, strict=True))
            elif len(rows) == 1:
                fail(rows[0], S.ErrorKind.INFERENCE_ERROR, f"{paths[rows[0]]}: {type(result).__name__}: {result}")
            else:
                log.warning("batch of %d rows failed (%s); retrying them one at a time", len(rows), result)
                yield from self._run([[i] for i in rows], waves, paths, fail)


def commit_file(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write a file by rename: ``write`` fills a hidden ``.<name>.<pid>.tmp`` beside it, which is
    synced and renamed over ``path``, so a reader sees the old file or the new one, never part of one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Output rows → one Parquet shard per call, committed by rename; returns ``(shard, rows)``.

    A reader or a resumed run sees a whole shard or none (:func:`commit_file`; the temporary name
    is ``.part-….tmp``). The name is a digest of the shard's ids,
    so a retried call replaces its own file instead of adding a second copy of its rows.
    (Ray Data's ``write_parquet`` writes in place, leaving half-written files when killed.)
    """

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return pa.table({"shard": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        digest = hashlib.sha256("\0".join(sorted(table[S.ID].to_pylist())).encode()).hexdigest()[:32]
        name = f"{SHARD_PREFIX}{digest}.parquet"
        commit_file(os.path.join(self.folder, name), lambda fh: pq.write_table(table, fh))
        return pa.table({"shard": [name], "rows": [table.num_rows]})
