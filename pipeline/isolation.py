"""Decode one row at a time in a child process, so a file that crashes or hangs the decoder costs
that row, not the job. Pure: no Ray, no torch.

libsndfile and the codecs below it are C code: a corrupt or hostile file can kill the process
(a segfault, an abort) or spin forever. :class:`IsolatedDecoder` keeps one child per worker process
(``python -m pipeline.isolation``: a fresh interpreter, since forking a Ray worker's threads can
deadlock and multiprocessing's spawn would re-run the worker's main module) and sends it one row
at a time over a pipe. A child that dies is restarted and the row retried, up to ``max_attempts``
times in all, then the row becomes a ``worker_crash`` error; a row still running after
``timeout_s`` gets its child killed and becomes a ``timeout`` error (not retried: hangs repeat).
Ray's own task retries (``decode.max_retries``) stay as the bound for failures of the worker itself.

The child runs the decode function named by ``decode.function`` (``module:function``, default
:func:`pipeline.audio.decode`), so a decoder of another codec, or a test's faulty one, runs isolated too.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.audio import Decoded
from pipeline.errors import AudioError, ErrorKind

# A fresh child imports numpy, soundfile and soxr before it answers; on a loaded machine that can
# take seconds, which must not count against a row's decode.timeout_s.
STARTUP_TIMEOUT_S = 120.0


def import_function(target: str) -> Callable[..., Decoded]:
    """The function ``module:function`` names (``decode.function``)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(requests: Connection, replies: Connection, decode: Callable[..., Decoded]) -> None:
    """The child's loop: decode each request, answer ("ok", Decoded) or ("error", kind, message, header)."""
    while True:
        try:
            path, data, kwargs = requests.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            reply: tuple = ("ok", decode(path, data, **kwargs))
        except AudioError as exc:
            reply = ("error", exc.kind, str(exc), exc.header)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's
            reply = ("error", ErrorKind.DECODE_ERROR, f"{path}: {type(exc).__name__}: {exc}", None)
        replies.send(reply)


def _widen(fd: int) -> None:
    """Linux: grow the pipe's buffer (64 KiB by default) towards 1 MiB, so that a decoded waveform
    crosses in a few writes instead of one wake-up of each process per 64 KiB (~1 ms per 10 s file)."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(limit, 1 << 20))
    except (OSError, ValueError, AttributeError):  # not Linux, or no /proc: the default buffer works too
        pass


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class IsolatedDecoder:
    """``decode`` in a child process with a timeout and bounded restarts (see the module doc)."""

    def __init__(self, function: str, timeout_s: float, max_attempts: int):
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.function = function
        self._proc: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        # The child imports this package from wherever the parent did (Ray's py_modules included).
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.isolation", str(os.getpid()), self.function], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        _widen(self._proc.stdout.fileno())
        self._requests = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._replies = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        if not self._replies.poll(STARTUP_TIMEOUT_S):
            raise EOFError(f"no answer from the decoding process within {STARTUP_TIMEOUT_S:g} s")
        self._replies.recv()  # its "ready"

    def _stop(self, kill: bool) -> int | None:
        proc, self._proc = self._proc, None
        for conn in (self._requests, self._replies):
            if conn is not None:
                conn.close()
        self._requests = self._replies = None
        if proc is None:
            return None
        if kill and proc.poll() is None:
            proc.kill()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self._stop(kill=True)

    def __call__(self, path: str, data: bytes | None = None, **kwargs: Any) -> Decoded:
        """Decode like :func:`pipeline.audio.decode` (or ``function``); raise :class:`AudioError` for a bad row."""
        reason = ""
        for _ in range(self.max_attempts):
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop(kill=True)
                    self._start()
                started = time.monotonic()
                self._requests.send((path, data, kwargs))
                if not self._replies.poll(self.timeout_s):
                    self._stop(kill=True)
                    raise AudioError(
                        ErrorKind.TIMEOUT,
                        f"{path}: still decoding after {time.monotonic() - started:.1f} s "
                        f"(decode.timeout_s = {self.timeout_s:g}); its process was killed",
                    )
                reply = self._replies.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                reason = _exit_reason(self._stop(kill=True))
                continue
            if reply[0] == "ok":
                return reply[1]
            raise AudioError(*reply[1:])
        raise AudioError(
            ErrorKind.WORKER_CRASH,
            f"{path}: the decoding process died on it {self.max_attempts} times "
            f"(decode.max_attempts; last: {reason})",
        )


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when the thread that started it ends. An idle
    child sees its pipe close when the worker dies, but one hung in a codec reads nothing and would
    live on, orphaned (spinning, for a hostile file)."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is None:  # not Linux
        return
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def _main() -> None:
    """Child entry point (arguments: the parent's pid, the decode function): requests on stdin,
    replies on the original stdout; anything else that writes to stdout (a codec's message) goes to
    stderr instead of corrupting the replies."""
    _die_with_parent(int(sys.argv[1]))
    decode = import_function(sys.argv[2])
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    replies.send(("ready",))
    _serve(Connection(0, writable=False), replies, decode)


if __name__ == "__main__":
    _main()
