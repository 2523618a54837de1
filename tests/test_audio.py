import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from transformers import Wav2Vec2FeatureExtractor

from pipeline.audio import AudioError, decode, normalize
from pipeline.errors import ErrorKind


@pytest.fixture
def speechlike():
    rng = np.random.default_rng(1)
    t = np.arange(24_000) / 16_000
    return (0.4 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)


def test_normalize_matches_feature_extractor(speechlike):
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    expected = fe(speechlike, sampling_rate=16_000).input_values[0]
    np.testing.assert_array_equal(normalize(speechlike), expected)


def test_decode_16k_mono_is_the_file_normalised(tmp_path, speechlike):
    sf.write(tmp_path / "a.flac", speechlike, 16_000)
    d = decode(str(tmp_path / "a.flac"))
    raw, _ = sf.read(tmp_path / "a.flac", dtype="float32")
    np.testing.assert_array_equal(d.audio, normalize(raw))
    assert (d.sample_rate, d.num_channels) == (16_000, 1)
    assert d.duration_s == pytest.approx(1.5)
    assert d.audio.dtype == np.float32


def test_decode_averages_channels_and_resamples_with_soxr(tmp_path, speechlike):
    left = soxr.resample(speechlike, 16_000, 44_100)
    stereo = np.stack([left, 0.5 * left], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 44_100, subtype="FLOAT")
    d = decode(str(tmp_path / "s.wav"), do_normalize=False)
    expected = soxr.resample(0.75 * left, 44_100, 16_000, quality="HQ")
    np.testing.assert_allclose(d.audio, expected, atol=1e-6)
    assert (d.sample_rate, d.num_channels) == (44_100, 2)
    assert len(d.audio) == 24_000
    assert d.duration_s == pytest.approx(len(left) / 44_100) == pytest.approx(1.5, abs=1e-4)  # the source's


def test_decode_from_bytes_names_the_path(tmp_path, speechlike):
    sf.write(tmp_path / "a.wav", speechlike, 16_000)
    d = decode("virtual.wav", (tmp_path / "a.wav").read_bytes())
    assert len(d.audio) == len(speechlike)
    with pytest.raises(AudioError, match="virtual.wav") as err:
        decode("virtual.wav", b"not audio at all")
    assert err.value.kind == ErrorKind.DECODE_ERROR


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda d: d / "missing.wav", ErrorKind.NOT_FOUND),
        (lambda d: (d / "folder.wav").mkdir() or d / "folder.wav", ErrorKind.UNREADABLE),
        (lambda d: (d / "text.wav").write_text("hello") and d / "text.wav", ErrorKind.DECODE_ERROR),
        (lambda d: (d / "zero.flac").write_bytes(b"") or d / "zero.flac", ErrorKind.DECODE_ERROR),
    ],
    ids=["missing", "directory", "text", "zero-bytes"],
)
def test_decode_errors_have_a_kind_and_name_the_file(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(AudioError) as err:
        decode(str(path))
    assert err.value.kind == kind
    assert str(path) in str(err.value)


def test_empty_nonfinite_and_too_long(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16_000)
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 200, np.float32), 16_000, subtype="FLOAT")
    sf.write(tmp_path / "long.wav", np.zeros(16_000 * 3, np.float32), 16_000)
    for name, kind, kwargs, header in [
        ("empty.wav", ErrorKind.EMPTY, {}, (0.0, 16_000, 1)),
        ("nan.wav", ErrorKind.NON_FINITE, {}, (600 / 16_000, 16_000, 1)),
        ("long.wav", ErrorKind.TOO_LONG, {"max_duration_s": 2.5}, (3.0, 16_000, 1)),
    ]:
        with pytest.raises(AudioError) as err:
            decode(str(tmp_path / name), **kwargs)
        assert err.value.kind == kind, name
        assert err.value.header == header, name  # the error row keeps what the header said
        assert pickle.loads(pickle.dumps(err.value)).header == header
    from pipeline.isolation import IsolatedDecoder

    isolated = IsolatedDecoder("pipeline.audio:decode", timeout_s=30, max_attempts=1)
    try:  # the header crosses the isolated decoder's pipe too
        with pytest.raises(AudioError) as err:
            isolated(str(tmp_path / "long.wav"), max_duration_s=2.5)
        assert (err.value.kind, err.value.header) == (ErrorKind.TOO_LONG, (3.0, 16_000, 1))
    finally:
        isolated.close()


def test_isolated_decoder_survives_crashes_and_hangs(tmp_path, speechlike):
    """The child restarts after a crash (bounded attempts) and after a timeout kill; rows in
    between decode normally. The crashes and hangs come from the test-only decode function."""
    from faulty_decoder import CRASH_MARKER, FUNCTION, HANG_MARKER

    from pipeline.isolation import IsolatedDecoder

    good = tmp_path / "good.wav"
    sf.write(good, speechlike, 16_000)
    for marker in (CRASH_MARKER, HANG_MARKER):
        (tmp_path / f"{marker}.wav").write_bytes(good.read_bytes())
    decoder = IsolatedDecoder(FUNCTION, timeout_s=1.0, max_attempts=3)
    try:
        expected = decode(str(good)).audio
        np.testing.assert_array_equal(decoder(str(good)).audio, expected)
        with pytest.raises(AudioError, match="died on it 3 times .*killed by SIGSEGV") as crash:
            decoder(str(tmp_path / f"{CRASH_MARKER}.wav"))
        assert crash.value.kind == ErrorKind.WORKER_CRASH
        np.testing.assert_array_equal(decoder(str(good)).audio, expected)
        with pytest.raises(AudioError, match=r"decode.timeout_s = 1\)") as hang:
            decoder(str(tmp_path / f"{HANG_MARKER}.wav"))
        assert hang.value.kind == ErrorKind.TIMEOUT
        np.testing.assert_array_equal(decoder(str(good)).audio, expected)
        with pytest.raises(AudioError) as missing:  # an ordinary error crosses the pipe with its kind
            decoder(str(tmp_path / "missing.wav"))
        assert missing.value.kind == ErrorKind.NOT_FOUND
        if sys.platform.startswith("linux"):  # a 10 s waveform crosses in one write, not 10 of 64 KiB
            import fcntl

            assert fcntl.fcntl(decoder._replies.fileno(), fcntl.F_GETPIPE_SZ) >= min(
                1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
    finally:
        decoder.close()


def test_a_hung_decoding_process_dies_with_the_worker_that_started_it(tmp_path):
    """A worker killed while its child hangs on a file (SIGKILL: no clean-up of its own) leaves no
    orphan: the kernel kills the child too (Linux)."""
    from faulty_decoder import FUNCTION, HANG_MARKER
    from helpers import ROOT, TESTS

    worker = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.isolation import IsolatedDecoder\n"
         f"d = IsolatedDecoder({FUNCTION!r}, timeout_s=600, max_attempts=1)\n"
         "d._start()\n"
         "print(d._proc.pid, flush=True)\n"
         f"d({str(tmp_path / HANG_MARKER)!r})\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
    )
    child = int(worker.stdout.readline())

    def state(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "gone"

    time.sleep(1.0)  # the child is in its hang now
    assert state(child) in ("R", "S")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while state(child) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state(child) in ("gone", "Z")  # a zombie: dead, waiting for init to reap it
