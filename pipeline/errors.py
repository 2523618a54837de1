"""Every error the job can report, in one place: the row-level error kinds and stages written to the
output, and the exceptions that carry them.

A bad row is data (:class:`AudioError` → an error row naming the file, the stage and the reason);
a bad job is an exception with a one-line message for the user (:class:`ConfigError`,
:class:`ManifestError`, :class:`JobError`).
"""

from __future__ import annotations

from enum import Enum


class _Str(str, Enum):
    """A ``str`` enum that formats as its value (``f"{kind}"`` is ``not_found``), on Python 3.10 too."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class ErrorKind(_Str):
    """The machine-readable reasons written to ``error_kind``."""

    NOT_FOUND = "not_found"  # the file does not exist (or is a dangling symlink)
    UNREADABLE = "unreadable"  # exists but cannot be read: a directory, a FIFO, no permission, a symlink loop
    NOT_ALLOWED = "not_allowed"  # outside input.allowed_roots (after resolving symlinks and "..")
    TOO_LARGE = "too_large"  # the file is larger than audio.max_file_bytes
    DECODE_ERROR = "decode_error"  # libsndfile cannot decode it
    EMPTY = "empty"  # decodes to zero samples
    NON_FINITE = "non_finite"  # NaN or Inf samples
    TOO_LONG = "too_long"  # longer than audio.max_duration_s (by its header, checked before reading)
    TOO_SHORT = "too_short"  # shorter than the model's receptive field
    TIMEOUT = "timeout"  # decoding took longer than decode.timeout_s; its process was killed
    WORKER_CRASH = "worker_crash"  # the decoding process died on it decode.max_attempts times
    INFERENCE_ERROR = "inference_error"  # the model failed on this row alone


class Stage(_Str):
    """The step that turned a row into an error row, written to ``error_stage``."""

    DECODE = "decode"
    TRANSCRIBE = "transcribe"


class AudioError(Exception):
    """One row cannot be transcribed: ``kind`` says why, the message names the file; ``header``,
    ``(duration_s, sample_rate, num_channels)`` where the file's header was read before it failed."""

    def __init__(self, kind: ErrorKind | str, message: str, header: tuple | None = None):
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.header = header

    def __reduce__(self):  # pickles across the isolated decoder's pipe with its kind and header
        return (AudioError, (self.kind.value, str(self), self.header))


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, the value and the fix."""


class ManifestError(ValueError):
    """The input cannot be turned into a manifest; the message says where and why."""


class JobError(RuntimeError):
    """A systemic failure: the job cannot run or its output breaks an invariant."""
