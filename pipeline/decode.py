"""Step 1, decode: manifest rows → 16 kHz mono normalised waveforms, or error rows. Pure: no Ray,
no torch (a decode worker never imports them).

A bad row never raises: it becomes an error row (``error_kind``, ``error``, ``error_stage``) that
the later steps pass through untouched, so every input row reaches the output once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import hf
from pipeline import schema as S
from pipeline.audio import Decoded, check_allowed, normalize, resolved
from pipeline.config import AudioConfig, DecodeConfig, InputConfig
from pipeline.errors import AudioError, ErrorKind, Stage
from pipeline.isolation import IsolatedDecoder, import_function

if TYPE_CHECKING:
    from pipeline.model.spec import FrontEnd

# One decoder per worker process and setting, kept across tasks (Ray reuses its workers).
_DECODERS: dict[tuple[str, tuple[float, int] | None], Callable[..., Decoded]] = {}


class DecodeStage:
    """Manifest rows (:data:`pipeline.schema.MANIFEST_SCHEMA`) → decoded rows
    (:data:`pipeline.schema.DECODED_SCHEMA`), one for one, in order: at the model's rate, and
    normalised where the model's front end does so and the recording is at most ``whole_samples``
    long (longer ones run as windows, each normalised on its own: :mod:`pipeline.windows`)."""

    def __init__(self, front_end: FrontEnd, source: InputConfig, audio: AudioConfig, decode: DecodeConfig,
                 whole_samples: int):
        # Normalised here only up to whole_samples (one window, pipeline.windows): a longer recording
        # is normalised per window by the replica.
        self.kwargs = {"target_rate": front_end.sampling_rate, "do_normalize": False,
                       "max_duration_s": audio.max_duration_s, "max_file_bytes": audio.max_file_bytes}
        self.normalize_up_to = whole_samples if front_end.do_normalize else -1
        self.allowed_roots = tuple(resolved(r) for r in source.allowed_roots)
        self.audio_column = source.audio_column
        self.function = decode.function
        self.isolation = (decode.timeout_s, decode.max_attempts) if decode.isolate else None

    def _decoder(self) -> Callable[..., Decoded]:
        """In this worker: the decode function, or the isolated decoder that runs it."""
        key = (self.function, self.isolation)
        if key not in _DECODERS:
            _DECODERS[key] = (import_function(self.function) if self.isolation is None
                              else IsolatedDecoder(self.function, *self.isolation))
        return _DECODERS[key]

    def close(self) -> None:
        """Stop this worker's decoding child process, if isolated (e.g. to read its resource usage);
        the next row starts another."""
        decoder = _DECODERS.pop((self.function, self.isolation), None)
        if isinstance(decoder, IsolatedDecoder):
            decoder.close()

    def _dataset_audio(self, paths: list[str], rows: list[int | None]) -> dict[int, bytes | str | AudioError]:
        """The audio bytes of this block's dataset rows (by position), each data file read once."""
        wanted: dict[str, list[int]] = {}
        for i, (path, row) in enumerate(zip(paths, rows, strict=True)):
            if row is not None:
                wanted.setdefault(path, []).append(i)
        found: dict[int, bytes | str | AudioError] = {}
        for path, where in wanted.items():
            try:
                check_allowed(path, self.allowed_roots)
                got = hf.audio_bytes(path, [rows[i] for i in where], self.audio_column)
            except AudioError as exc:
                got = [exc] * len(where)
            found.update(zip(where, got, strict=True))
        return found

    def _decode(self, path: str, row: int | None, data: bytes | str | AudioError | None) -> Decoded:
        """Decode a file, or a dataset row's bytes, or the file a dataset row names."""
        if isinstance(data, AudioError):
            raise data
        if row is None or isinstance(data, str):
            path = data if isinstance(data, str) else path
            check_allowed(path, self.allowed_roots)
            return self._decoder()(path, None, **self.kwargs)
        return self._decoder()(f"{path} row {row}", data, **self.kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = {name: [] for name in S.DECODED_SCHEMA.names}
        paths, dataset_rows = table[S.PATH].to_pylist(), table[S.DATASET_ROW].to_pylist()
        dataset_audio = self._dataset_audio(paths, dataset_rows)
        rows = zip(table[S.ID].to_pylist(), paths, dataset_rows, table[S.REFERENCE].to_pylist(), strict=True)
        for i, (row_id, path, row, reference) in enumerate(rows):
            cols[S.ID].append(row_id)
            cols[S.PATH].append(path)
            cols[S.REFERENCE].append(reference)
            try:
                d = self._decode(path, row, dataset_audio.get(i))
            except AudioError as exc:
                kind, error, wave = exc.kind, f"{exc.kind}: {exc}", np.zeros(0, np.float32)
                info = exc.header or (None,) * 3  # what the header said, where it was read
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's, not the job's
                kind, error = ErrorKind.DECODE_ERROR, f"decode_error: {path}: {type(exc).__name__}: {exc}"
                wave, info = np.zeros(0, np.float32), (None,) * 3
            else:
                kind, error, info = None, None, (d.duration_s, d.sample_rate, d.num_channels)
                wave = normalize(d.audio) if len(d.audio) <= self.normalize_up_to else d.audio
            cols[S.ERROR_KIND].append(kind)
            cols[S.ERROR].append(error)
            cols[S.ERROR_STAGE].append(Stage.DECODE if kind else None)
            cols[S.DURATION_S].append(info[0])
            cols[S.SAMPLE_RATE].append(info[1])
            cols[S.NUM_CHANNELS].append(info[2])
            cols[S.NUM_SAMPLES].append(len(wave))
            cols[S.AUDIO].append(wave)
        cols[S.AUDIO] = S.audio_column(cols[S.AUDIO])
        return pa.table(cols, schema=S.DECODED_SCHEMA)
