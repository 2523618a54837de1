"""transcribe: the corpus transcription job's command line (mirrors ``pipeline.engine.run_job``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import report
from pipeline.config import DEFAULT_MODEL, JobConfig, load_config
from pipeline.engine import run_job
from pipeline.errors import ConfigError, JobError
from pipeline.logs import LOG_FORMAT
from pipeline.output import SUMMARY_FILE
from pipeline.transcribe import process_start_time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="transcribe",
        description="Transcribe an audio corpus with a wav2vec2 CTC model on Ray; write Parquet shards. "
                    "`transcribe report OUT_DIR` writes a finished run's _report.html.",
    )
    ap.add_argument("--input", help="manifest (.csv/.tsv/.jsonl/.parquet), audio folder, HF dataset folder, "
                    "hf:NAME, @sample or @heldout (the bundled clips); a manifest or folder may be a URI "
                    "(s3://bucket/prefix); overrides input.path")
    ap.add_argument("--output", help="output folder or URI (s3://bucket/prefix) for the Parquet shards and "
                    "_summary.json; overrides output.path")
    ap.add_argument("--model", help=f"hub id or local folder of a CTC checkpoint (default {DEFAULT_MODEL}); "
                    "overrides model.name")
    ap.add_argument("--config", help="YAML config file, e.g. configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set inference.max_replicas=2 (repeatable)")
    ap.add_argument("--address", help="Ray cluster address to join (default: start Ray in this process)")
    ap.add_argument("--retry-errors", action="store_true",
                    help="transcribe a finished run's error rows again (output.retry_errors)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return ap.parse_args(argv)


def config(args: argparse.Namespace) -> JobConfig:
    """The job's config from the command line's arguments; raises :class:`ConfigError`."""
    return load_config(
        args.config, args.overrides,
        **{"input.path": args.input, "output.path": args.output, "model.name": args.model,
           "ray.address": args.address, "ray.progress_bars": False if args.quiet else None,
           "output.retry_errors": True if args.retry_errors else None},
    )


def report_main(argv: list[str]) -> int:
    """``transcribe report OUT_DIR``: write a finished run's ``_report.html``."""
    ap = argparse.ArgumentParser(prog="transcribe report",
                                 description="Write OUT_DIR/_report.html for a finished run (pipeline.report).")
    ap.add_argument("output", help="the run's output folder or URI")
    args = ap.parse_args(argv)
    try:
        print(report.write(args.output))
    except FileNotFoundError:
        print(f"transcribe report: error: {args.output} holds no finished run (no {SUMMARY_FILE})", file=sys.stderr)
        return 1
    except (OSError, ValueError, JobError) as exc:
        print(f"transcribe report: error: {args.output}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    command_line = sys.argv[1:] if argv is None else argv
    if command_line[:1] == ["report"]:
        return report_main(command_line[1:])
    args = parse_args(command_line)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format=LOG_FORMAT,
    )
    try:
        # From the command's start where this is the command (its imports and config are start-up too).
        summary = run_job(config(args), started_at=process_start_time() if argv is None else None)
    except (ConfigError, JobError) as exc:
        print(f"transcribe: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    # A finished output's rerun prints that run's summary with "already_complete": true (the job
    # logs "nothing to do").
    keys = ("rows_in", "rows_out", "transcribed", "errors", "errors_by_kind", "audio_hours", "wall_s",
            "audio_s_per_s", "padding_waste", "already_complete", "scores")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
