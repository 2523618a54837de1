import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import bundled, hf
from pipeline import schema as S
from pipeline.config import InputConfig, load_config
from pipeline.errors import AudioError, ConfigError, ManifestError
from pipeline.manifest import read_manifest


def read(path, **kw):
    return read_manifest(InputConfig(path=str(path), **kw))


@pytest.fixture
def clips(tmp_path):
    (tmp_path / "audio" / "spk1").mkdir(parents=True)
    for name in ["audio/a.wav", "audio/spk1/b.flac", "audio/spk1/c.ogg"]:
        sf.write(tmp_path / name, np.zeros(800, np.float32), 16_000)
    (tmp_path / "audio" / "notes.txt").write_text("not audio")
    return tmp_path


def test_csv_aliases_relative_paths_and_string_ids(clips):
    (clips / "m.csv").write_text("id,audio_filepath,sentence\n007,audio/a.wav,HELLO\n008,/abs/x.wav,\n")
    t = read(clips / "m.csv")
    assert t.schema == S.MANIFEST_SCHEMA
    assert t[S.ID].to_pylist() == ["007", "008"]
    assert t[S.PATH].to_pylist() == [str(clips / "audio/a.wav"), "/abs/x.wav"]
    assert t[S.REFERENCE].to_pylist() == ["HELLO", None]


def test_jsonl_derives_ids_from_paths(clips):
    rows = [{"file": "audio/spk1/b.flac", "text": "B"}, {"file": "audio/a.wav", "text": "A"}]
    (clips / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = read(clips / "m.jsonl")
    assert t[S.ID].to_pylist() == ["audio/spk1/b.flac", "audio/a.wav"]
    assert t[S.REFERENCE].to_pylist() == ["B", "A"]


def test_parquet_with_numeric_ids(clips):
    pq.write_table(pa.table({"id": [1, 2], "audio_path": ["audio/a.wav", "audio/spk1/b.flac"]}), clips / "m.parquet")
    t = read(clips / "m.parquet")
    assert t[S.ID].to_pylist() == ["1", "2"]
    assert t[S.REFERENCE].null_count == 2


def test_folder_lists_audio_with_relative_ids(clips):
    t = read(clips / "audio")
    assert t[S.ID].to_pylist() == ["a.wav", "spk1/b.flac", "spk1/c.ogg"]
    assert t[S.PATH].to_pylist()[1] == str(clips / "audio/spk1/b.flac")


def _audio_dataset(clips, datasets):
    names = ["audio/a.wav", "audio/spk1/b.flac", "audio/spk1/c.ogg"]
    return datasets.Dataset.from_dict(
        {"audio": [str(clips / n) for n in names], "transcript": ["A", "B", "C"]}
    ).cast_column("audio", datasets.Audio(decode=False))


def test_hf_dataset_saved_to_disk_is_listed_without_its_audio(clips):
    """save_to_disk's Arrow files: the manifest points at each row's file and index, and the decode
    step reads the bytes (embedded by save_to_disk) of just the rows it asks for."""
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": _audio_dataset(clips, datasets)}).save_to_disk(clips / "hf", num_shards={"test": 2})
    t = read(clips / "hf")
    assert t[S.REFERENCE].to_pylist() == ["A", "B", "C"]
    assert t[S.ID].to_pylist() == ["a.wav", "b.flac", "c.ogg"]  # the embedded files' names, unique
    files = sorted(str(p) for p in (clips / "hf" / "test").glob("*.arrow"))
    assert t[S.PATH].to_pylist() == [files[0], files[0], files[1]] and t[S.DATASET_ROW].to_pylist() == [0, 1, 0]
    assert t.nbytes < (clips / "audio/a.wav").stat().st_size  # no audio in the driver's table
    assert hf.audio_bytes(files[0], [1, 0], "audio") == [(clips / "audio/spk1/b.flac").read_bytes(),
                                                          (clips / "audio/a.wav").read_bytes()]
    with pytest.raises(ManifestError, match=r"input.hf_split = 'train': .* has the splits test; pick one"):
        read(clips / "hf", hf_split="train")
    with pytest.MonkeyPatch.context() as mp:  # a relative folder: the data files' paths are absolute
        mp.chdir(clips)
        assert read("hf")[S.PATH].to_pylist() == [files[0], files[0], files[1]]
    with pytest.raises(ManifestError, match=r"input.audio_column = 'wav': .*data-00000-of-00002.arrow has no such "
                                            r"column \(its columns: audio, transcript\)"):
        read(clips / "hf", audio_column="wav")


def test_hf_repository_of_parquet_files(clips):
    """``hf:NAME`` as the Hub lays a dataset out (Parquet files per split), here a local folder: the
    driver reads the ids and texts only, the rows' audio is read by row group."""
    datasets = pytest.importorskip("datasets")
    (clips / "repo" / "data").mkdir(parents=True)
    ds = _audio_dataset(clips, datasets).add_column("id", ["x", "y", "z"])
    ds.to_parquet(clips / "repo" / "data" / "train-00000-of-00001.parquet", batch_size=1)
    ds.select([0]).to_parquet(clips / "repo" / "data" / "test-00000-of-00001.parquet")
    t = read(f"hf:{clips / 'repo'}", hf_split="train")
    data_file = str(clips / "repo" / "data" / "train-00000-of-00001.parquet")
    assert t[S.ID].to_pylist() == ["x", "y", "z"] and t[S.PATH].to_pylist() == [data_file] * 3
    assert t[S.DATASET_ROW].to_pylist() == [0, 1, 2] and t[S.REFERENCE].to_pylist() == ["A", "B", "C"]
    assert pq.ParquetFile(data_file).num_row_groups == 3
    # to_parquet keeps the audio files' paths, not their bytes (push_to_hub embeds them): the decode
    # step reads the file a row names.
    got, missing = hf.audio_bytes(data_file, [2, 5], "audio")
    assert got == str(clips / "audio/spk1/c.ogg") and missing.kind == "not_found"
    with pytest.raises(ManifestError, match=r"input.hf_split = None: .* has the splits train, test; pick one"):
        read(f"hf:{clips / 'repo'}")
    with pytest.raises(ManifestError, match=r"--input hf:/nonexistent/x: cannot load the dataset"):
        read("hf:/nonexistent/x")
    (clips / "plain" / "data").mkdir(parents=True)  # an audio column of plain strings, not an Audio struct
    pq.write_table(pa.table({"audio": ["a.wav"]}), clips / "plain" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(ManifestError, match=r"input.audio_column = 'audio': in .*train-00000-of-00001.parquet it is "
                                            r"string, not an Audio column"):
        read(f"hf:{clips / 'plain'}")


def test_hf_data_files_in_an_object_store(clips):
    """A saved dataset behind a URI: listed by streaming its Arrow files, its rows read the same way."""
    datasets = pytest.importorskip("datasets")
    _audio_dataset(clips, datasets).save_to_disk(clips / "hf")
    fs = fsspec.filesystem("memory")
    for f in (clips / "hf").iterdir():
        fs.pipe(f"/corpus-hf/{f.name}", f.read_bytes())
    t = read("memory://corpus-hf")
    arrow = "memory://corpus-hf/data-00000-of-00001.arrow"
    assert t[S.PATH].to_pylist() == [arrow] * 3 and t[S.DATASET_ROW].to_pylist() == [0, 1, 2]
    assert hf.audio_bytes(arrow, [2], "audio") == [(clips / "audio/spk1/c.ogg").read_bytes()]
    with pytest.raises(AudioError, match="memory://corpus-hf/gone.arrow: no such file") as missing:
        hf.audio_bytes("memory://corpus-hf/gone.arrow", [0], "audio")
    assert missing.value.kind == "not_found"


def test_duplicates_fail_fast_naming_them(clips):
    (clips / "m.csv").write_text("id,path\nx,audio/a.wav\ny,audio/a.wav\nx,audio/a.wav\n")
    with pytest.raises(ManifestError, match=r"duplicate ids.*'x' \(2x\)"):
        read(clips / "m.csv")


def test_missing_path_column_and_empty_path_name_the_problem(clips):
    (clips / "m.csv").write_text("id,wav\n1,a.wav\n")
    with pytest.raises(ManifestError, match="no audio path column; expected one of path, audio_filepath"):
        read(clips / "m.csv")
    (clips / "n.csv").write_text("id,path\n1,audio/a.wav\n2,\n")
    with pytest.raises(ManifestError, match=r"n.csv line 3: the path column is empty"):
        read(clips / "n.csv")


def test_unknown_input_and_bundled_inputs(tmp_path):
    with pytest.raises(ManifestError, match="no such file or folder"):
        read(tmp_path / "nothing.txt")
    t = read_manifest(InputConfig(path="@sample"))
    assert t.num_rows == 6 and t[S.REFERENCE].null_count == 0
    assert Path(bundled.input_path("@sample")).parent.joinpath(t[S.ID][0].as_py() + ".flac").exists()
    held = read_manifest(InputConfig(path="@heldout"))
    assert held.num_rows == 40 and held[S.REFERENCE].null_count == 0
    assert all(Path(p).is_file() for p in held[S.PATH].to_pylist())
    assert Path(bundled.model_path("@demo"), "model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"input.path = '@nope': unknown bundled name; use one of @sample, @heldout"):
        load_config(**{"input.path": "@nope"})


def test_relative_inputs_become_absolute_paths(tmp_path, monkeypatch):
    """A worker's working directory is not the driver's: every path the job ships is absolute."""
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    sf.write(tmp_path / "corpus" / "sub" / "a.wav", np.zeros(800, np.float32), 16_000)
    (tmp_path / "corpus" / "m.csv").write_text("id,path\na,sub/a.wav\nb,/abs/b.wav\n")
    monkeypatch.chdir(tmp_path)
    listed = read_manifest(InputConfig(path="corpus/m.csv"))
    assert listed[S.PATH].to_pylist() == [str(tmp_path / "corpus" / "sub" / "a.wav"), "/abs/b.wav"]
    folder = read_manifest(InputConfig(path="corpus/sub"))
    assert folder[S.ID].to_pylist() == ["a.wav"]
    assert folder[S.PATH].to_pylist() == [str(tmp_path / "corpus" / "sub" / "a.wav")]


def test_one_audio_file_or_a_glob_is_an_input(clips, monkeypatch):
    """A single file is a one-row manifest; a glob lists what matches (``*`` within a folder, ``**/``
    any folders, none included), ids relative to its fixed folder; nothing matching is an error."""
    monkeypatch.chdir(clips)
    one = read("audio/a.wav")
    assert one[S.ID].to_pylist() == ["a.wav"] and one[S.PATH].to_pylist() == [str(clips / "audio/a.wav")]
    assert read("audio/*.wav")[S.ID].to_pylist() == ["a.wav"]
    assert read(str(clips / "audio/**/*.*"))[S.ID].to_pylist() == ["a.wav", "notes.txt", "spk1/b.flac", "spk1/c.ogg"]
    assert read("audio/spk1/[bc].*")[S.ID].to_pylist() == ["b.flac", "c.ogg"]
    with pytest.raises(ManifestError, match=r"--input audio/\*.mp3: no file matches it"):
        read("audio/*.mp3")
    with pytest.raises(ManifestError, match=r"--input audio/missing.wav: no such file"):
        read("audio/missing.wav")
