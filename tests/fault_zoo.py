"""A zoo of bad and odd audio inputs, built at test time, with the outcome each must have.

Each entry: id → (path relative to the zoo root, expected error kind or None for a transcript). The
crashing and hanging files need the test-only decoder (``faulty_decoder``) as ``decode.function``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from faulty_decoder import CRASH_MARKER, HANG_MARKER

from pipeline import bundled
from pipeline.errors import ErrorKind as K
from tools import demo_model

RATE = 16_000
MAX_FILE_BYTES = 8_000_000  # the zoo's cap, so that one ordinary-looking WAV is "too large"


def speech(clip: str = "heldout-05") -> tuple[np.ndarray, str]:
    """A bundled held-out clip (16 kHz mono) and its reference text."""
    manifest = Path(bundled.input_path("@heldout"))
    audio, rate = sf.read(manifest.parent / f"{clip}.flac", dtype="float32")
    assert rate == RATE
    text = next(row["text"] for row in demo_model.read_manifest(manifest) if row["id"] == clip)
    return audio, text


def flac_with_total_samples(src: Path, dst: Path, total: int) -> None:
    """Copy a FLAC file, rewriting STREAMINFO's 36-bit total-samples field."""
    data = bytearray(src.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first block is STREAMINFO
    info = 8  # "fLaC" + 4-byte block header
    # bytes 10..17 of STREAMINFO: 20 bits rate, 3 channels-1, 5 bps-1, 36 bits total samples
    packed = int.from_bytes(data[info + 10 : info + 18], "big")
    packed = (packed & ~((1 << 36) - 1)) | (total & ((1 << 36) - 1))
    data[info + 10 : info + 18] = packed.to_bytes(8, "big")
    dst.write_bytes(bytes(data))


def build(root: Path) -> dict[str, tuple[str, str | None]]:
    """Write the zoo under ``root``; return {id: (relative path, expected kind or None)}."""
    root.mkdir(parents=True, exist_ok=True)
    audio, _ = speech()
    good = root / "good.flac"
    sf.write(good, audio, RATE, subtype="PCM_16")
    zoo: dict[str, tuple[str, str | None]] = {"good_flac": ("good.flac", None)}

    def add(name: str, kind: str | None, write=None) -> Path:
        path = root / name
        if write is not None:
            write(path)
        zoo[name.replace(".", "_")] = (name, kind)
        return path

    add("missing.wav", K.NOT_FOUND)
    add("dangling.wav", K.NOT_FOUND, lambda p: os.symlink(root / "nowhere.wav", p))
    add("loop_a.wav", K.UNREADABLE, lambda p: (os.symlink(root / "loop_b.wav", p),
                                              os.symlink(p, root / "loop_b.wav")))
    add("folder.wav", K.UNREADABLE, lambda p: p.mkdir())
    add("fifo.wav", K.UNREADABLE, lambda p: os.mkfifo(p))
    add("zero_bytes.wav", K.DECODE_ERROR, lambda p: p.write_bytes(b""))
    add("random_bytes.flac", K.DECODE_ERROR,
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)))
    add("text.wav", K.DECODE_ERROR, lambda p: p.write_text("this is not audio\n" * 100))
    add("header_only.wav", K.EMPTY, lambda p: sf.write(p, np.zeros(0, np.float32), RATE))
    add("truncated.wav", None, lambda p: (sf.write(p, audio, RATE, subtype="PCM_16"),
                                         os.truncate(p, p.stat().st_size // 2)))
    add("truncated.flac", K.DECODE_ERROR, lambda p: (shutil.copy(good, p), os.truncate(p, p.stat().st_size // 2)))

    def bit_flip(p: Path) -> None:
        data = bytearray(good.read_bytes())
        rng = np.random.default_rng(1)
        for i in rng.integers(200, len(data), size=40):
            data[i] ^= 1 << int(rng.integers(0, 8))
        p.write_bytes(bytes(data))

    add("bit_flipped.flac", K.DECODE_ERROR, bit_flip)  # libsndfile: "flac decoder lost sync"
    add("huge_streaminfo.flac", K.TOO_LONG, lambda p: flac_with_total_samples(good, p, 2**35))
    add("nan.wav", K.NON_FINITE,
        lambda p: sf.write(p, np.where(np.arange(audio.size) == 500, np.nan, audio), RATE, subtype="FLOAT"))
    add("inf.wav", K.NON_FINITE,
        lambda p: sf.write(p, np.where(np.arange(audio.size) == 9, np.inf, audio), RATE, subtype="FLOAT"))
    add("silence.wav", None, lambda p: sf.write(p, np.zeros(2 * RATE, np.float32), RATE))
    # decoded fine; the transcribe stage rejects what is shorter than the model's receptive field
    add("one_sample.wav", K.TOO_SHORT, lambda p: sf.write(p, np.full(1, 0.1, np.float32), RATE))
    add("hundred_samples.wav", K.TOO_SHORT, lambda p: sf.write(p, np.full(100, 0.1, np.float32), RATE))
    add("eight_channels_96k.wav", None, lambda p: sf.write(
        p, np.repeat(soxr.resample(audio, RATE, 96_000)[:, None], 8, axis=1), 96_000, subtype="PCM_24"))
    add("rate_4k.wav", None, lambda p: sf.write(p, soxr.resample(audio, RATE, 4_000), 4_000))
    add("clipped.wav", None, lambda p: sf.write(p, np.clip(audio * 8, -1, 1), RATE, subtype="PCM_16"))
    add("speech.mp3", None, lambda p: sf.write(p, audio, RATE, format="MP3"))
    add("speech.ogg", None, lambda p: sf.write(p, audio, RATE, format="OGG", subtype="VORBIS"))
    add("too_large.wav", K.TOO_LARGE, lambda p: sf.write(
        p, np.tile(audio, MAX_FILE_BYTES // (4 * audio.size) + 1), RATE, subtype="FLOAT"))
    add(f"{CRASH_MARKER}.flac", K.WORKER_CRASH, lambda p: shutil.copy(good, p))
    add(f"{HANG_MARKER}.flac", K.TIMEOUT, lambda p: shutil.copy(good, p))
    return zoo
