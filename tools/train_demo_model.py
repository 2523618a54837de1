"""Train the small offline demo model, write its held-out set, or evaluate it.

    python -m tools.train_demo_model train --out pipeline/models/demo-wav2vec2 --minutes 28
    python -m tools.train_demo_model heldout --out pipeline/heldout
    python -m tools.train_demo_model evaluate --model pipeline/models/demo-wav2vec2 \
        --manifest pipeline/heldout/manifest.csv

The logic lives in ``tools.demo_model``; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tools import demo_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="synthesise speech with espeak-ng and train the model")
    t.add_argument("--out", type=Path, required=True, help="folder for the saved model + processor")
    t.add_argument("--steps", type=int, default=4000, help="optimizer steps (schedule length)")
    t.add_argument("--minutes", type=float, default=None,
                   help="also stop after this much training wall time: the LR schedule follows "
                        "whichever of steps and time runs out first (then not bit-reproducible)")
    t.add_argument("--num-utterances", type=int, default=30_000)
    t.add_argument("--num-dev", type=int, default=200, help="held-out-voice dev utterances")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=int, default=300)
    t.add_argument("--curriculum-steps", type=int, default=800,
                   help="first steps on the shortest utterances, shortest first (SortaGrad)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "demo-wav2vec2-work",
                   help="cache for the synthesised audio (never the repository)")
    t.add_argument("--processes", type=int, default=2, help="espeak-ng synthesis workers")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    t.add_argument("--device", default="cpu", help="torch device to train on: cpu (default), cuda")
    t.add_argument("--loader-workers", type=int, default=0,
                   help="processes that augment and collate batches ahead of the step (0: in line)")
    t.add_argument("--extended-voices", action="store_true",
                   help="also train on demo_model.EXTRA_TRAIN_VARIANTS (more voice variety)")
    precision = t.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true",
                           help="bf16 autocast (on CPU with the positional conv in fp32): faster per "
                                "step; before that fix it stalled CTC training here")
    precision.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (default)")
    t.add_argument("--eval-every", type=int, default=1000)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--init-from", type=Path, default=None,
                   help="continue training a saved model (fresh LR schedule; its size wins)")
    t.add_argument("--synth-only", action="store_true", help="only synthesise (fill the cache)")
    for name, default in vars(demo_model.ModelSize()).items():
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)

    h = sub.add_parser("heldout", help="write the committed held-out clips and manifest.csv")
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--num-16k", type=int, default=24)
    h.add_argument("--num-per-condition", type=int, default=4)

    e = sub.add_parser("evaluate", help="CER/WER per condition through the reference path")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--manifest", type=Path, required=True)
    e.add_argument("--show-errors", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.command == "heldout":
        path = demo_model.write_heldout_set(args.out, args.num_16k, args.num_per_condition)
        print(f"wrote {path}")
        return {"manifest": str(path)}
    if args.command == "evaluate":
        results = demo_model.evaluate_heldout(args.model, args.manifest)
        errors = results.pop("_errors")
        for name, r in results.items():
            print(f"{name:20s} clips={r['clips']:3d}  CER={100 * r['cer']:.2f}%  WER={100 * r['wer']:.2f}%")
        if args.show_errors:
            for clip_id, e in errors.items():
                print(f"{clip_id}\n  ref: {e['ref']}\n  hyp: {e['hyp']}")
        return results
    size = demo_model.ModelSize(**{k: getattr(args, k) for k in vars(demo_model.ModelSize())})
    settings = demo_model.TrainSettings(
        out=args.out, steps=args.steps, minutes=args.minutes, num_utterances=args.num_utterances,
        num_dev=args.num_dev, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, curriculum_steps=args.curriculum_steps, seed=args.seed,
        workdir=args.workdir,
        processes=args.processes, threads=args.threads, bf16=args.bf16, device=args.device,
        loader_workers=args.loader_workers, extended_voices=args.extended_voices,
        eval_every=args.eval_every, log_every=args.log_every, size=size,
        init_from=args.init_from,
    )
    if args.synth_only:
        demo_model.synthesize_corpus(demo_model.training_specs(settings), settings.processes,
                                     settings.workdir)
        return {}
    summary = demo_model.train(settings, log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "settings")}))
    return summary


if __name__ == "__main__":
    main()
