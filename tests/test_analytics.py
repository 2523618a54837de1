"""The queries of docs/analytics.md, run against a real output: each block executes, and its result
is checked against the output read another way and against the run's own summary."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from pipeline import schema as S
from pipeline.config import InputConfig, load_config
from pipeline.manifest import read_manifest
from pipeline.output import read_output

DOC = Path(__file__).parent.parent / "docs" / "analytics.md"


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    """The demo model on the held-out clips, a missing file and one too short for it."""
    import numpy as np
    import soundfile as sf

    from pipeline.engine import run_job

    folder = tmp_path_factory.mktemp("analytics")
    sf.write(folder / "short.wav", np.zeros(200, np.float32), 16_000)
    held = read_manifest(InputConfig(path="@heldout")).select([S.ID, S.PATH, S.REFERENCE])
    rows = held.to_pylist() + [{S.ID: "missing", S.PATH: str(folder / "gone.flac"), S.REFERENCE: "X"},
                               {S.ID: "short", S.PATH: str(folder / "short.wav"), S.REFERENCE: None}]
    pacsv.write_csv(pa.Table.from_pylist(rows).rename_columns([S.ID, S.PATH, "text"]), folder / "m.csv")
    cfg = load_config(overrides=["ray.progress_bars=false", "inference.device=cpu", "inference.precision=fp32",
                                 "output.report=true"],
                      **{"input.path": str(folder / "m.csv"), "output.path": str(folder / "out"),
                         "model.name": "@demo"})
    return folder / "out", run_job(cfg)


@pytest.mark.integration
def test_the_documented_queries_run_and_agree_with_the_summary(run):
    out, summary = run
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4 and blocks[0].startswith('OUT = "out/demo"')
    scope: dict = {}
    for block in blocks:
        exec(block.replace('OUT = "out/demo"', f"OUT = {str(out)!r}"), scope)  # noqa: S102 - the docs' own code

    table = read_output(out)
    scored = sorted((r for r in table.to_pylist() if r[S.WER] is not None), key=lambda r: (-r[S.WER], r[S.ID]))
    assert [w[0] for w in scope["worst"]] == [r[S.ID] for r in scored[:5]]
    scores = summary["scores"]
    assert scope["by_speaker"] == [("heldout", 40, pytest.approx(scores["wer"], rel=1e-5))]
    buckets = scope["by_duration"].to_dicts()
    assert [b["rows"] for b in buckets] == [v["rows"] for v in scores["wer_by_duration_s"].values()]
    assert [b["wer"] for b in buckets] == pytest.approx([v["wer"] for v in scores["wer_by_duration_s"].values()],
                                                        rel=1e-5)
    assert scope["errors"].rows() == [("not_found", "decode", 1), ("too_short", "transcribe", 1)]
    unsure = scope["unsure"]
    assert (unsure["confidence"] < 0.5).all() and list(unsure["confidence"]) == sorted(unsure["confidence"])
    assert set(unsure["id"]) <= set(table[S.ID].to_pylist())


ARTIFACTS = Path(__file__).parent.parent / "out" / "test-artifacts"


@pytest.mark.integration
def test_the_run_report_renders_in_a_headless_browser(run):
    """`transcribe report OUT_DIR` writes one self-contained page: its figures are embedded PNGs,
    it names the worst and the error rows, and headless Chromium loads it and draws it (screenshot
    kept in out/test-artifacts/report.png)."""
    import shutil
    import subprocess

    import matplotlib.image

    from jobs.transcribe import main

    out, summary = run
    assert (out / "_report.html").stat().st_size > 10_000  # output.report=true wrote it at the end of the run
    assert main(["report", str(out)]) == 0
    page = (out / "_report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4  # durations, error kinds, WER, CER
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    worst = max((r for r in read_output(out).to_pylist() if r[S.WER] is not None), key=lambda r: (r[S.WER], r[S.ID]))
    assert worst[S.ID] in page and "not_found" in page and f"{summary['scores']['wer']:.2%}" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*common, "--dump-dom", (out / "_report.html").as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert dom.count("<img") == 4 and "Run report" in dom
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", (out / "_report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280) and pixels[..., :3].std() > 0.05  # drawn, not blank
