"""A finished run's report: one self-contained HTML page (``OUT_DIR/_report.html``, figures embedded)
that shows a person how the run went. Pure: no Ray, no torch.

It reads the run's ``_summary.json`` and its committed shards: rows in and out, errors by kind,
audio hours, wall time and throughput, the duration histogram, the WER and CER distributions where
rows have references, the longest and the worst rows by id, and the config, model, versions and
hardware the run recorded. Figures are drawn with matplotlib (its Agg backend: no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

from pipeline import output, storage
from pipeline import schema as S

REPORT_FILE = "_report.html"
ROWS_SHOWN = 10
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.8em; text-align: left;
  border-bottom: 1px solid #eee; vertical-align: top; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures img { width: 30em; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def write(out: str) -> str:
    """Write the report of the finished run in the folder or URI ``out``; return its location."""
    out = output.location(out)
    summary = output.finished_summary(out)
    rows = output.read_output(out, columns=[S.ID, S.TRANSCRIPT, S.REFERENCE, S.ERROR_KIND, S.ERROR,
                                            S.DURATION_S, S.WER, S.CER, S.CONFIDENCE]).to_pylist()
    where = storage.join(out, REPORT_FILE)
    storage.write_bytes(where, render(summary, rows).encode())
    return where


def render(summary: dict[str, Any], rows: list[dict]) -> str:
    """The report's HTML for a run's ``summary`` and its output ``rows``."""
    scores = summary.get("scores")
    facts = [
        ("rows in / out", f"{summary['rows_in']:,} / {summary['rows_out']:,}"),
        ("transcribed / error rows", f"{summary['transcribed']:,} / {summary['errors']:,}"),
        ("lost / duplicated", f"{summary['lost']} / {summary['duplicated']}"),
        ("audio", f"{summary['audio_hours']:.2f} h"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("throughput", f"{summary['audio_s_per_s']:.1f} audio s/s"),
        ("model", f"{summary.get('model')} (revision {summary.get('model_revision') or 'unpinned'})"),
        ("precision", str(summary.get("precision"))),
    ]
    if scores:
        facts += [("corpus WER", f"{scores['wer']:.2%} (95%: {scores['wer_95'][0]:.2%}–{scores['wer_95'][1]:.2%})"),
                  ("corpus CER", f"{scores['cer']:.2%} (95%: {scores['cer_95'][0]:.2%}–{scores['cer_95'][1]:.2%})")]
    durations = [r[S.DURATION_S] for r in rows if r[S.DURATION_S] is not None]
    figures = [_histogram(durations, "Duration of the rows", "seconds")]
    kinds = summary.get("errors_by_kind") or {}
    if kinds:
        figures.append(_bars(kinds, "Error rows by kind"))
    scored = [r for r in rows if r[S.WER] is not None]
    if scored:
        figures.append(_histogram([r[S.WER] for r in scored], "WER per row", "word error rate"))
        figures.append(_histogram([r[S.CER] for r in scored], "CER per row", "character error rate"))
    longest = sorted((r for r in rows if r[S.DURATION_S] is not None), key=lambda r: (-r[S.DURATION_S], r[S.ID]))
    worst = sorted(scored, key=lambda r: (-r[S.WER], r[S.ID]))
    errors = sorted((r for r in rows if r[S.ERROR_KIND]), key=lambda r: r[S.ID])
    versions = {k: summary.get(k) for k in ("corpus_transcribe", "transformers", "torch", "ray")}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>corpus-transcribe report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Run report: {html.escape(str(summary.get('config', {}).get('output', {}).get('path', '')))}</h1>",
        _table(["", ""], facts, header=False),
        "<h2>Figures</h2><div class='figures'>", *figures, "</div>",
        f"<h2>Longest rows</h2>{_table(['id', 'duration (s)', 'transcript'], _longest(longest))}",
    ]
    if worst:
        head = ["id", "WER", "CER", "transcript", "reference"]
        parts.append(f"<h2>Worst rows (WER)</h2>{_table(head, _worst(worst))}")
        if scores:
            parts.append(f"<h2>Word errors by kind</h2>{_table(['kind', 'words'], scores['word_errors'].items())}")
            parts.append("<h2>WER by duration (s)</h2>" + _table(
                ["duration", "rows", "WER"], [(k, v["rows"], f"{v['wer']:.2%}")
                                              for k, v in scores["wer_by_duration_s"].items()]))
    if errors:
        parts.append(f"<h2>Error rows (first {ROWS_SHOWN})</h2>"
                     + _table(["id", "kind", "error"], [(r[S.ID], r[S.ERROR_KIND], r[S.ERROR])
                                                        for r in errors[:ROWS_SHOWN]]))
    parts += [
        f"<h2>Versions and hardware</h2>{_table(['', ''], [*versions.items(), *_hardware(summary)], header=False)}",
        f"<h2>Config</h2><pre>{html.escape(json.dumps(summary.get('config', {}), indent=2))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _longest(rows: list[dict]) -> list[tuple]:
    return [(r[S.ID], f"{r[S.DURATION_S]:.1f}", _clip(r[S.TRANSCRIPT])) for r in rows[:ROWS_SHOWN]]


def _worst(rows: list[dict]) -> list[tuple]:
    return [(r[S.ID], f"{r[S.WER]:.2%}", f"{r[S.CER]:.2%}", _clip(r[S.TRANSCRIPT]), _clip(r[S.REFERENCE]))
            for r in rows[:ROWS_SHOWN]]


def _hardware(summary: dict) -> list[tuple]:
    return [(k, v) for k, v in (summary.get("hardware") or {}).items()]


def _clip(text: str | None, most: int = 120) -> str:
    text = text or ""
    return text if len(text) <= most else text[:most] + "…"


def _table(head: list[str], rows, header: bool = True) -> str:
    def cell(v) -> str:
        kind = " class='num'" if isinstance(v, int | float) else ""
        return f"<td{kind}>{html.escape(str(v))}</td>"

    cells = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    top = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if header else ""
    return f"<table>{top}{cells}</table>"


def _figure(draw, title: str) -> str:
    """A matplotlib figure drawn by ``draw(axes)``, as an embedded PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written by a batch job
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    draw(ax)
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"


def _histogram(values: list[float], title: str, unit: str) -> str:
    def draw(ax):
        if values:
            ax.hist(np.asarray(values, dtype=float), bins=min(30, max(5, len(values) // 3)), color="#4477aa")
        ax.set_xlabel(unit)
        ax.set_ylabel("rows")

    return _figure(draw, title)


def _bars(counts: dict[str, int], title: str) -> str:
    def draw(ax):
        ax.bar(list(counts), list(counts.values()), color="#cc6677")
        ax.set_ylabel("rows")
        ax.tick_params(axis="x", rotation=30)

    return _figure(draw, title)
