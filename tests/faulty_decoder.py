"""A test-only decode function (``decode.function = faulty_decoder:decode``): pipeline.audio.decode,
except that it crashes the process on a path holding :data:`CRASH_MARKER` (a real segfault, as a
broken codec would cause) and hangs on one holding :data:`HANG_MARKER`."""

from __future__ import annotations

import ctypes
import time

from pipeline.audio import Decoded
from pipeline.audio import decode as real_decode

FUNCTION = "faulty_decoder:decode"
CRASH_MARKER = "__crash_decoder__"
HANG_MARKER = "__hang_decoder__"


def decode(path: str, data: bytes | None = None, **kwargs) -> Decoded:
    if CRASH_MARKER in path:
        ctypes.string_at(0)
    if HANG_MARKER in path:
        time.sleep(10**6)
    return real_decode(path, data, **kwargs)
