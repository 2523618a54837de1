import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import bundled
from pipeline import schema as S
from pipeline.config import InputConfig, load_config
from pipeline.errors import ConfigError, ManifestError
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


def test_hf_dataset_saved_to_disk(clips):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"audio": [str(clips / "audio/a.wav"), str(clips / "audio/spk1/b.flac")], "transcript": ["A", "B"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"test": ds}).save_to_disk(clips / "hf")
    t = read(clips / "hf")
    assert t[S.REFERENCE].to_pylist() == ["A", "B"]
    # save_to_disk embeds the audio bytes and keeps file names: ids come from those names.
    assert t[S.PATH].to_pylist() == ["a.wav", "b.flac"]
    assert t[S.ID].to_pylist() == ["a.wav", "b.flac"]
    assert t[S.AUDIO_BYTES].to_pylist()[1] == (clips / "audio/spk1/b.flac").read_bytes()


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
