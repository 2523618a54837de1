"""evaluate: a checkpoint's corpus WER and CER on a LibriSpeech-layout folder or any manifest with
references, through the job.

    python -m jobs.evaluate LibriSpeech/test-clean --output out/test-clean --model facebook/wav2vec2-base-960h

A folder in LibriSpeech's layout (``SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTTERANCE.flac`` beside
``SPEAKER-CHAPTER.trans.txt``, each line an utterance id and its text) becomes a manifest of ids,
paths and references; a manifest (``.csv``/``.jsonl``/``.parquet`` with a reference column) is taken
as it is. The job runs with every other ``transcribe`` option, and the corpus figures of its summary
(:func:`pipeline.scoring.corpus_scores`: errors over reference words, 95% bootstrap interval) are
printed and returned.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from jobs.transcribe import config
from pipeline import schema as S
from pipeline.engine import run_job
from pipeline.errors import ConfigError, JobError, ManifestError
from pipeline.logs import LOG_FORMAT


def librispeech_manifest(folder: Path) -> pa.Table:
    """Ids, absolute audio paths and references of every utterance under a LibriSpeech-layout folder;
    raise :class:`ManifestError` when a transcript names no audio file or there is none."""
    ids, paths, refs = [], [], []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for number, line in enumerate(trans.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utterance}.flac"
            if not audio.is_file():
                raise ManifestError(f"{trans} line {number}: no audio file {audio.name} beside it")
            ids.append(utterance)
            paths.append(str(audio.resolve()))
            refs.append(text)
    if not ids:
        raise ManifestError(f"{folder}: no *.trans.txt below it; expected LibriSpeech's layout "
                            "(SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt beside the .flac files)")
    return pa.table({S.ID: ids, S.PATH: paths, "text": refs})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="a LibriSpeech-layout folder, or a manifest (a path or URI) with references")
    ap.add_argument("--output", required=True, help="the job's output folder or URI")
    ap.add_argument("--model", help="hub id, local folder or @demo (default: the config's)")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--address", help="Ray cluster address to join (default: start Ray in this process)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.retry_errors = False
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Run the job on ``args.corpus``; return the summary's corpus scores. Raises the job's errors,
    and :class:`JobError` when no transcribed row has a reference."""
    with tempfile.TemporaryDirectory() as tmp:
        if "://" not in args.corpus and Path(args.corpus).is_dir():  # its utterances' manifest, absolute paths
            args.input = str(Path(tmp) / "manifest.csv")
            pacsv.write_csv(librispeech_manifest(Path(args.corpus)), args.input)
        else:
            args.input = args.corpus
        summary = run_job(config(args))
    if summary["scores"] is None:
        raise JobError(f"{args.corpus}: no transcribed row has a reference to score against")
    return summary["scores"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=LOG_FORMAT)
    try:
        scores = evaluate(args)
    except (ConfigError, JobError, ManifestError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    low, high = scores["wer_95"]
    print(f"WER {scores['wer']:.2%} (95% interval {low:.2%}-{high:.2%}), CER {scores['cer']:.2%}, "
          f"on {scores['rows']} scored rows")
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
