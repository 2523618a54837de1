"""Decode one audio file into the waveform a wav2vec2 model expects. Pure: no Ray, no torch.

soundfile (libsndfile) decodes, channels are averaged to mono, soxr resamples, and the
utterance is normalised on its own, exactly as ``Wav2Vec2FeatureExtractor(do_normalize=True)``
does for one unpadded input, so padding added later never leaks into the statistics.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import soundfile as sf
import soxr

from pipeline import storage
from pipeline.errors import AudioError, ErrorKind

# Headers beyond these are corrupt or hostile: they would size buffers from a lie.
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Decoded:
    """A decoded utterance and what the source file said about itself."""

    audio: np.ndarray  # float32, mono, at the target rate, normalised when asked
    sample_rate: int  # of the source
    num_channels: int  # of the source
    duration_s: float  # of the source


@dataclass(frozen=True)
class SourceInfo:
    sample_rate: int
    num_channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance, float32: ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``."""
    audio = np.asarray(audio, dtype=np.float32)
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)


def _check_size(path: str, size: int, max_bytes: float) -> None:
    if size > max_bytes:
        raise AudioError(
            ErrorKind.TOO_LARGE, f"{path}: {size:,} bytes is larger than audio.max_file_bytes = {max_bytes:,.0f}"
        )


def check_file(path: str, max_bytes: float = float("inf")) -> None:
    """Stat ``path`` before anything opens it; raise :class:`AudioError` for a bad row.

    Opening a FIFO would block forever and a symlink loop fails with ELOOP; both, like directories
    and files over ``max_bytes``, become error rows here instead.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            what = "dangling symlink" if os.path.islink(path) else "no such file"
            raise AudioError(ErrorKind.NOT_FOUND, f"{path}: {what}") from None
        what = "symlink loop" if exc.errno == errno.ELOOP else exc.strerror
        raise AudioError(ErrorKind.UNREADABLE, f"{path}: {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(ErrorKind.UNREADABLE, f"{path}: is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(ErrorKind.UNREADABLE, f"{path}: not a regular file (a FIFO, socket or device)")
    _check_size(path, st.st_size, max_bytes)


def resolved(location: str) -> str:
    """A local path with symlinks and ``..`` resolved; a URI with its ``..`` resolved."""
    return storage.normalize(location) if storage.is_uri(location) else os.path.realpath(location)


def check_allowed(path: str, roots: tuple[str, ...]) -> None:
    """Raise ``not_allowed`` unless ``path``, with symlinks and ``..`` resolved, lies under one of
    ``roots`` (already :func:`resolved`: local folders or URI prefixes). No roots:
    every path is allowed."""
    if not roots:
        return
    real = resolved(path)
    sep = "/" if storage.is_uri(real) else os.sep
    if not any(real == root or real.startswith(root.rstrip(sep) + sep) for root in roots):
        raise AudioError(
            ErrorKind.NOT_ALLOWED,
            f"{path}: resolves to {real}, outside input.allowed_roots ({', '.join(roots)})",
        )


def fetch(location: str, max_bytes: float = float("inf")) -> bytes:
    """The bytes of the object at the URI ``location`` (retried on transient errors, see
    :mod:`pipeline.storage`); raise :class:`AudioError` for a missing, denied, oversized or
    unreadable one."""
    try:
        found = storage.info(location)
        if found.type == pafs.FileType.NotFound:
            raise FileNotFoundError(location)
        if found.type != pafs.FileType.File:
            raise AudioError(ErrorKind.UNREADABLE, f"{location}: is a folder or prefix, not an audio file")
        _check_size(location, found.size, max_bytes)
        return storage.read_bytes(location)
    except FileNotFoundError:
        raise AudioError(ErrorKind.NOT_FOUND, f"{location}: no such object") from None
    except (OSError, ValueError) as exc:
        if storage.is_denied(exc):
            raise AudioError(ErrorKind.NOT_ALLOWED, f"{location}: access denied ({storage.reason(exc)})") from None
        raise AudioError(ErrorKind.UNREADABLE, f"{location}: {storage.reason(exc)}") from None


def _open(path: str, data: bytes | None, max_bytes: float) -> sf.SoundFile:
    if data is None and storage.is_uri(path):
        data = fetch(path, max_bytes)
    if data is not None:
        _check_size(path, len(data), max_bytes)
        source: object = io.BytesIO(data)
    else:
        path = storage.local_path(path)
        check_file(path, max_bytes)
        try:
            source = open(path, "rb")  # noqa: SIM115 - SoundFile owns it and closes it
        except OSError as exc:
            kind = ErrorKind.NOT_FOUND if exc.errno == errno.ENOENT else ErrorKind.UNREADABLE
            raise AudioError(kind, f"{path}: {exc.strerror}") from None
    try:
        return sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(ErrorKind.DECODE_ERROR, f"{path}: libsndfile cannot decode it ({_reason(exc)})") from None


_OPENED = re.compile(r"Error opening <[^>]*>: ")


def _reason(exc: BaseException) -> str:
    """libsndfile's message without soundfile's ``Error opening <_io.BufferedReader name=...>:`` prefix
    (the row's path is in the message already)."""
    return _OPENED.sub("", str(exc)).strip()


# Frames per read when averaging channels: an hour of 44.1 kHz stereo is 1.3 GB as float32 frames,
# its mono half that, so channels are averaged a block at a time.
MONO_BLOCK_FRAMES = 1 << 20


def _read_mono(f: sf.SoundFile) -> np.ndarray:
    """All of ``f`` as float32 mono, channels averaged; at most one block of all channels in memory."""
    if f.channels == 1:
        return f.read(dtype="float32", always_2d=True)[:, 0]
    blocks = [block.mean(axis=1, dtype=np.float32)
              for block in f.blocks(MONO_BLOCK_FRAMES, dtype="float32", always_2d=True)]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)  # briefly twice the mono


def decode(
    path: str,
    data: bytes | None = None,
    *,
    target_rate: int = 16_000,
    do_normalize: bool = True,
    max_duration_s: float = float("inf"),
    max_file_bytes: float = float("inf"),
) -> Decoded:
    """Decode ``data`` (if given) or the file or object at ``path`` (a local path or a URI, see
    :mod:`pipeline.storage`); raise :class:`AudioError` for a bad row.

    ``path`` names the row in error messages even when the bytes come from ``data``.
    """
    with _open(path, data, max_file_bytes) as f:
        info = SourceInfo(f.samplerate, f.channels, f.frames)
        if not (0 < info.sample_rate <= MAX_SAMPLE_RATE and 0 < info.num_channels <= MAX_CHANNELS):
            raise AudioError(
                ErrorKind.DECODE_ERROR,
                f"{path}: implausible header ({info.sample_rate} Hz, {info.num_channels} channels)",
            )
        header = (info.duration_s, info.sample_rate, info.num_channels)  # error rows past here keep it
        # The header's length is checked before any sample is read: a corrupt header can claim
        # billions of frames, and reading it blindly would try to allocate all of them.
        if info.duration_s > max_duration_s:
            raise AudioError(
                ErrorKind.TOO_LONG,
                f"{path}: {info.duration_s:.1f} s is longer than audio.max_duration_s = {max_duration_s:g}", header,
            )
        try:
            mono = _read_mono(f)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(ErrorKind.DECODE_ERROR, f"{path}: decoding failed ({_reason(exc)})", header) from None
    if len(mono) == 0:
        raise AudioError(ErrorKind.EMPTY, f"{path}: holds no samples", header)
    if not np.isfinite(mono).all():
        raise AudioError(ErrorKind.NON_FINITE, f"{path}: holds NaN or infinite samples", header)
    duration = len(mono) / info.sample_rate  # of the source, before resampling
    if info.sample_rate != target_rate:
        mono = soxr.resample(mono, info.sample_rate, target_rate, quality="HQ")
    audio = normalize(mono) if do_normalize else np.ascontiguousarray(mono, dtype=np.float32)
    return Decoded(audio=audio, sample_rate=info.sample_rate, num_channels=info.num_channels, duration_s=duration)
