"""Never lose a row: a zoo of bad inputs, a crashing and a hanging file, paths outside the allowed
roots, and manifests that cannot be read, through the whole job on a real Ray cluster.

``pytest tests/test_faults.py -s`` prints the table of every fault with its outcome.
"""

from __future__ import annotations

import os
import shutil

import fault_zoo
import jiwer
import pytest
from faulty_decoder import CRASH_MARKER, FUNCTION, HANG_MARKER

from pipeline import schema as S
from pipeline.config import load_config
from pipeline.engine import run_job
from pipeline.errors import ErrorKind, JobError, ManifestError, Stage
from pipeline.output import read_output

pytestmark = pytest.mark.integration  # a real local Ray cluster

TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def zoo_run(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    root = base / "corpus"
    zoo = fault_zoo.build(root)
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(root / "good.flac", outside / "secret.flac")
    os.symlink(outside / "secret.flac", root / "link_out.flac")
    zoo["dotdot_escape"] = ("../outside/secret.flac", ErrorKind.NOT_ALLOWED)
    zoo["symlink_escape"] = ("link_out.flac", ErrorKind.NOT_ALLOWED)
    lines = [f"{row_id},{rel}" for row_id, (rel, _) in zoo.items()]
    (root / "manifest.csv").write_text("id,path\n" + "\n".join(lines) + "\n")
    cfg = load_config(
        overrides=["ray.progress_bars=false", "inference.device=cpu", "inference.precision=fp32",
                   "inference.max_batch_samples=200000",
                   f"audio.max_file_bytes={fault_zoo.MAX_FILE_BYTES}", f"decode.timeout_s={TIMEOUT_S}",
                   "decode.max_attempts=2", "decode.rows_per_task=4", f"decode.function={FUNCTION}"],
        **{"input.path": str(root / "manifest.csv"), "output.path": str(base / "out"),
           "model.name": "@demo", "input.allowed_roots": [str(root)]},
    )
    summary = run_job(cfg)
    rows = {r[S.ID]: r for r in read_output(base / "out").to_pylist()}
    return zoo, rows, summary, root


def test_every_fault_ends_as_one_row_of_the_right_kind(zoo_run):
    zoo, rows, summary, root = zoo_run
    print(f"\n{'id':28s} {'expected':13s} {'got':13s} message / transcript")
    for row_id, (_, kind) in zoo.items():
        r = rows[row_id]
        print(f"{row_id:28s} {kind or '-':13s} {r[S.ERROR_KIND] or '-':13s} {(r[S.ERROR] or r[S.TRANSCRIPT])[:70]!r}")
    assert len(zoo) >= 20
    assert summary["rows_in"] == summary["rows_out"] == len(zoo) == len(rows)
    assert summary["lost"] == summary["duplicated"] == 0
    assert {row_id: rows[row_id][S.ERROR_KIND] for row_id in zoo} == {
        row_id: kind for row_id, (_, kind) in zoo.items()}
    for row_id, (rel, kind) in zoo.items():
        r = rows[row_id]
        if kind is None:
            assert r[S.TRANSCRIPT] is not None and r[S.ERROR] is None, row_id
        else:
            assert r[S.TRANSCRIPT] is None, row_id
            assert r[S.ERROR].startswith(f"{kind}: ") and os.path.basename(rel) in r[S.ERROR], r[S.ERROR]
            stage = Stage.TRANSCRIBE if kind == ErrorKind.TOO_SHORT else Stage.DECODE
            assert r[S.ERROR_STAGE] == stage, (row_id, r[S.ERROR_STAGE])
    assert summary["errors_by_kind"][ErrorKind.WORKER_CRASH] == 1


def test_odd_but_valid_audio_is_transcribed_like_the_original(zoo_run):
    zoo, rows, _, _ = zoo_run
    _, text = fault_zoo.speech()
    good = rows["good_flac"][S.TRANSCRIPT]
    assert jiwer.cer(text, good) <= 0.05, (text, good)
    # Same samples in other containers, rates and channel counts: the same words, or nearly.
    # Clipping (x8) and a 4 kHz rate (no energy above 2 kHz) distort it: measured 33% and 26% CER.
    for row_id, max_cer in [("eight_channels_96k_wav", 0.0), ("speech_ogg", 0.05), ("speech_mp3", 0.05),
                            ("clipped_wav", 0.5), ("rate_4k_wav", 0.5)]:
        got = rows[row_id][S.TRANSCRIPT]
        assert jiwer.cer(good, got) <= max_cer, (row_id, good, got)
    assert rows["silence_wav"][S.TRANSCRIPT] == ""
    # Half a WAV: libsndfile reads the frames that are there; the transcript starts like the whole's.
    half = rows["truncated_wav"][S.TRANSCRIPT]
    assert half and good.startswith(half.split()[0]), (half, good)
    assert rows["truncated_wav"][S.DURATION_S] == pytest.approx(rows["good_flac"][S.DURATION_S] / 2, rel=0.01)


def test_timeout_and_crash_are_bounded(zoo_run):
    _, rows, summary, _ = zoo_run
    assert "decode.timeout_s = 4" in rows[f"{HANG_MARKER}_flac"][S.ERROR]
    assert "died on it 2 times" in rows[f"{CRASH_MARKER}_flac"][S.ERROR]
    assert "killed by SIGSEGV" in rows[f"{CRASH_MARKER}_flac"][S.ERROR]
    assert summary["wall_s"] < 120


@pytest.mark.parametrize("name, content, message", [
    ("no_path.csv", "id,path\na,x.wav\nb,\n", "no_path.csv line 3: the path column is empty"),
    ("bad.jsonl", '{"path": "a.wav"}\n{"path": "b.wav"\n{"path": "c.wav"}\n',
     "bad.jsonl line 2: not valid JSON"),
    ("dup.csv", "id,path\na,x.wav\na,y.wav\n", "duplicate ids in the input: 'a' (2x)"),
])
def test_manifest_faults_fail_fast_and_name_the_line(ray_cluster, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    cfg = load_config(overrides=["ray.progress_bars=false"],
                      **{"input.path": str(tmp_path / name), "output.path": str(tmp_path / "out"),
                         "model.name": "@demo"})
    with pytest.raises((JobError, ManifestError), match=message.replace("(", r"\(").replace(")", r"\)")):
        run_job(cfg)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))
