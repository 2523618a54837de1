"""jobs.evaluate on a LibriSpeech-layout folder built from the held-out clips: the printed corpus WER
is the job's own (its summary's) and what jiwer gives on the written rows."""

from __future__ import annotations

import json
import shutil

import jiwer
import pytest

from pipeline import schema as S
from pipeline.config import InputConfig
from pipeline.manifest import read_manifest
from pipeline.output import SUMMARY_FILE, read_output
from pipeline.scoring import normalize


def librispeech_folder(root):
    """Two speakers' chapters of held-out 16 kHz FLAC clips, with their transcripts."""
    held = [r for r in read_manifest(InputConfig(path="@heldout")).to_pylist() if r[S.PATH].endswith(".flac")
            and "-44k" not in r[S.PATH]]
    lines: dict = {}
    for i, row in enumerate(held):
        speaker, chapter = ("84", "121123") if i % 2 else ("174", "50561")
        folder = root / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        utterance = f"{speaker}-{chapter}-{i:04d}"
        shutil.copy(row[S.PATH], folder / f"{utterance}.flac")
        lines.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{utterance} {row[S.REFERENCE]}")
    for path, text in lines.items():
        path.write_text("\n".join(text) + "\n")
    return len(held)


@pytest.mark.integration
def test_evaluate_prints_the_jobs_own_corpus_wer(ray_cluster, tmp_path, capsys):
    from jobs.evaluate import main

    n = librispeech_folder(tmp_path / "test-clean")
    code = main([str(tmp_path / "test-clean"), "--output", str(tmp_path / "out"), "--model", "@demo",
                 "--set", "inference.device=cpu", "--set", "inference.precision=fp32", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    scores = summary["scores"]
    assert printed.startswith(f"WER {scores['wer']:.2%} (95% interval {scores['wer_95'][0]:.2%}-")
    rows = read_output(tmp_path / "out").to_pylist()
    assert len(rows) == scores["rows"] == n >= 8
    ours = jiwer.wer([normalize(r[S.REFERENCE]) for r in rows], [normalize(r[S.TRANSCRIPT]) for r in rows])
    assert scores["wer"] == pytest.approx(ours) and scores["wer_95"][0] <= ours <= scores["wer_95"][1]
    assert {r[S.ID].split("-")[0] for r in rows} == {"84", "174"}


def test_a_folder_without_transcripts_is_a_clear_error(tmp_path, capsys):
    from jobs.evaluate import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 1
    assert "no *.trans.txt below it; expected LibriSpeech's layout" in capsys.readouterr().err
