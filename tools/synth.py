"""Test audio: speech with known text from espeak-ng (fixtures, the bundled sample, the demo
model's data) and chirps of any length (the tests' and the benchmark's corpora).

Not used by the transcription job itself: only by scripts that make test audio and training data.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile as sf
import soxr

ESPEAK = "espeak-ng"


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed; the message says how to install it."""


def require_espeak() -> str:
    """Return the espeak-ng executable, or raise with the install hint."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise EspeakMissing(
            "espeak-ng is not installed: run `apt-get update && apt-get install -y espeak-ng` "
            "(Debian/Ubuntu) to synthesise speech"
        )
    return exe


def synthesize(
    text: str,
    voice: str = "en-us",
    speed_wpm: int = 160,
    pitch: int = 50,
    sample_rate: int = 16_000,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng; return mono float32 samples at ``sample_rate``."""
    out = subprocess.run(
        [require_espeak(), "--stdout", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), text],
        check=True,
        capture_output=True,
    ).stdout
    audio, native_rate = sf.read(io.BytesIO(out), dtype="float32")
    if native_rate != sample_rate:
        audio = soxr.resample(audio, native_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def chirp(duration_s: float, rng: np.random.Generator, sample_rate: int = 16_000) -> np.ndarray:
    """A tone rising from a random pitch, plus noise: float32, different for every draw of ``rng``."""
    t = np.arange(int(duration_s * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * (rng.uniform(100, 400) + 200 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)
