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

from pipeline import schema as S
from pipeline.audio import Decoded, check_allowed, resolved
from pipeline.config import AudioConfig, DecodeConfig, InputConfig
from pipeline.errors import AudioError, ErrorKind, Stage
from pipeline.isolation import IsolatedDecoder, import_function

if TYPE_CHECKING:
    from pipeline.model.spec import FrontEnd

# One decoder per worker process and setting, kept across tasks (Ray reuses its workers).
_DECODERS: dict[tuple[str, tuple[float, int] | None], Callable[..., Decoded]] = {}


class DecodeStage:
    """Manifest rows (:data:`pipeline.schema.MANIFEST_SCHEMA`) → decoded rows
    (:data:`pipeline.schema.DECODED_SCHEMA`), one for one, in order."""

    def __init__(self, front_end: FrontEnd, source: InputConfig, audio: AudioConfig, decode: DecodeConfig):
        self.kwargs = {"target_rate": front_end.sampling_rate, "do_normalize": front_end.do_normalize,
                       "max_duration_s": audio.max_duration_s, "max_file_bytes": audio.max_file_bytes}
        self.allowed_roots = tuple(resolved(r) for r in source.allowed_roots)
        self.function = decode.function
        self.isolation = (decode.timeout_s, decode.max_attempts) if decode.isolate else None

    def _decoder(self) -> Callable[..., Decoded]:
        """In this worker: the decode function, or the isolated decoder that runs it."""
        key = (self.function, self.isolation)
        if key not in _DECODERS:
            _DECODERS[key] = (import_function(self.function) if self.isolation is None
                              else IsolatedDecoder(self.function, *self.isolation))
        return _DECODERS[key]

    def _decode(self, path: str, data: bytes | None) -> Decoded:
        if data is None:
            check_allowed(path, self.allowed_roots)
        return self._decoder()(path, data, **self.kwargs)

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
                kind, error = ErrorKind.DECODE_ERROR, f"decode_error: {path}: {type(exc).__name__}: {exc}"
                wave, info = np.zeros(0, np.float32), (None,) * 3
            else:
                kind, error, wave, info = None, None, d.audio, (d.duration_s, d.sample_rate, d.num_channels)
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
