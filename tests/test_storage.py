"""Locations without Ray or a server: paths and URIs, retries, and inputs read from a store with no
rename and no local path (fsspec's in-memory one; the S3 server tests are in test_object_storage.py)."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import soundfile as sf

from pipeline import storage
from pipeline.audio import check_allowed, decode, resolved
from pipeline.config import InputConfig
from pipeline.errors import AudioError, ErrorKind
from pipeline.manifest import read_manifest


def test_uris_and_paths():
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b") and not storage.is_uri("/data/a.flac")
    assert not storage.is_uri("file:///data/a.flac") and storage.local_path("file:///data/a.flac") == "/data/a.flac"
    assert storage.absolute("s3://b/out/") == "s3://b/out" and storage.absolute("rel").startswith("/")
    assert storage.join("s3://b/out/", "_work", "input.json") == "s3://b/out/_work/input.json"
    assert storage.parent("s3://b/sets/m.csv") == "s3://b/sets" and storage.parent("s3://b/m.csv") == "s3://b"
    assert storage.normalize("s3://b/sets/../clips/./a.flac") == "s3://b/clips/a.flac"
    assert storage.normalize("s3://b/../../a.flac") == "s3://b/a.flac"  # never above its bucket


def test_transient_errors_are_retried_and_the_rest_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: Could not connect")
        return "read"

    assert storage.retried(flaky, delay_s=0) == "read" and len(calls) == 3
    for error in [FileNotFoundError("gone"), OSError("AWS Error ACCESS_DENIED during GetObject operation"),
                  PermissionError("denied")]:
        calls.clear()

        def failing(error=error):
            calls.append(1)
            raise error

        with pytest.raises(OSError):
            storage.retried(failing, delay_s=0)
        assert len(calls) == 1, error
    calls.clear()

    def down():
        calls.append(1)
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: Could not connect")

    with pytest.raises(OSError, match="Could not connect"):  # the last attempt's error
        storage.retried(down, attempts=2, delay_s=0)
    assert len(calls) == 2


@pytest.fixture
def bucket():
    name = uuid.uuid4().hex
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def _put_clip(location: str, tmp_path, seconds: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(len(location))
    wave = (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)
    local = tmp_path / "clip.flac"
    sf.write(local, wave, 16_000)
    storage.write_bytes(location, local.read_bytes())
    return wave


def test_a_manifest_in_a_store_resolves_relative_paths_beside_it(bucket):
    storage.write_bytes(f"{bucket}/sets/m.csv", b"id,path,text\na,../clips/a.flac,A\nb,s3://other/b.flac,\n")
    table = read_manifest(InputConfig(path=f"{bucket}/sets/m.csv"))
    assert table["path"].to_pylist() == [f"{bucket}/clips/a.flac", "s3://other/b.flac"]
    assert table["reference"].to_pylist() == ["A", None]


def test_a_prefix_in_a_store_lists_its_audio_objects(bucket, tmp_path):
    for key in ["clips/a.flac", "clips/spk/b.flac", "clips/notes.txt", "other/c.flac"]:
        storage.write_bytes(f"{bucket}/{key}", b"x")
    table = read_manifest(InputConfig(path=f"{bucket}/clips/"))
    assert table["id"].to_pylist() == ["a.flac", "spk/b.flac"]
    assert table["path"].to_pylist() == [f"{bucket}/clips/a.flac", f"{bucket}/clips/spk/b.flac"]


def test_an_object_decodes_like_the_same_file_and_a_missing_one_is_not_found(bucket, tmp_path):
    _put_clip(f"{bucket}/clips/a.flac", tmp_path)
    from_store = decode(f"{bucket}/clips/a.flac")
    from_disk = decode(str(tmp_path / "clip.flac"))
    assert np.array_equal(from_store.audio, from_disk.audio) and from_store.duration_s == 0.5
    with pytest.raises(AudioError) as missing:
        decode(f"{bucket}/clips/gone.flac")
    assert missing.value.kind is ErrorKind.NOT_FOUND and str(missing.value).endswith("gone.flac: no such object")
    with pytest.raises(AudioError) as big:
        decode(f"{bucket}/clips/a.flac", max_file_bytes=10)
    assert big.value.kind is ErrorKind.TOO_LARGE


def test_allowed_roots_take_uri_prefixes():
    roots = (resolved("s3://corpus/clips/"),)
    check_allowed("s3://corpus/clips/spk/a.flac", roots)
    for outside in ["s3://corpus/clips/../private/a.flac", "s3://corpus/clips2/a.flac", "s3://other/clips/a.flac"]:
        with pytest.raises(AudioError) as denied:
            check_allowed(outside, roots)
        assert denied.value.kind is ErrorKind.NOT_ALLOWED
