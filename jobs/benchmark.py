"""Benchmark: this job against the seed's code path, the transformers ASR pipeline and the bare model.

    python -m jobs.benchmark --minutes 10 --json out/benchmark.json

In one process, on one corpus (durations spread 2-35 s like LibriSpeech), it times and prints
audio-seconds per second for:

1. seed: the seed notebook's code path, processor on batches of 2 in manifest order, fp32, argmax,
   ``batch_decode`` (soundfile decode included);
2. hf-pipeline: ``transformers.pipeline("automatic-speech-recognition", batch_size=8)`` on the
   decoded arrays (soundfile decode included);
3. bare-forward: the stock transformers model's forward alone on pre-decoded, normalised,
   length-sorted, pre-padded tensors at the job's precision and batch budget;
   (``--compiled`` also times it under ``torch.compile``: bare-forward-compiled);
3b. replica-alone: the job's model code (``CTCTranscriber.transcribe``: padding, exact batching, on
   CPUs in bf16 the matmul conv encoder, greedy decoding) on the same batches, without Ray: the
   ceiling for the job on this machine (``--encoders`` also times it with other conv feature encoders;
   ``--decode-cost`` times its greedy decoding
   alone against the tokenizer's ``batch_decode``; ``--stage-alone`` times the replica's
   ``TranscribeStage`` in the job's calls, each planned alone, without Ray);
4. job: ``pipeline.engine.run_job`` end to end (Ray start, decode, inference, Parquet);
   ``--job-marginal`` also runs it on the first half of the files: the second half's audio over the
   time it adds (``job-marginal``) is the job's speed without its fixed start-up, which a short
   corpus cannot amortise (its estimate is printed too).

Two measures of the job's machinery, each against its own ceiling, need no accelerator:
``--stand-in RATE`` runs the job with a stand-in model (:mod:`jobs.stand_in`) that takes as long as
an accelerator running RATE audio s/s would, using no CPU (``job-stand-in/stand-in``: what Ray Data,
decoding, the calls and the writes cost around a model of known speed), and ``--decode-ceiling``
times the job's decode step on Ray against the same decoding in plain processes
(``decode-job/decode-plain``).

It prints the ratios of the job to each and the job's padding waste, and writes them as JSON.
Run as a script, it first re-executes itself with the job's CPU allocator settings
(``pipeline.memory.CPU_REPLICA_ENV``), so every path allocates as the job's CPU replicas do;
``--glibc-malloc`` keeps glibc's defaults for 1-3b. ``--device cuda`` runs 1-3 on the GPU, gives
the job one GPU replica with ``configs/gpu-cluster.yaml``'s settings (:data:`GPU_CONFIG`), and
also times 3 and 3b a second time over the same batch shapes (``bare-forward-again``,
``replica-alone-again``: without the GPU's per-new-shape costs, see :data:`PASSES`);
``--budgets`` also times 3b at several ``inference.max_batch_samples``, to pick one per device;
``--roofline`` counts the forward's arithmetic and times the machine's matmul peak, which bounds
every path (the ratios the hardware allows, e.g. job/seed with bf16 against fp32).
The model is the full wav2vec2-base architecture: ``--model DIR`` for a
local checkpoint (e.g. wav2vec2-base-960h), else its config with random weights (speed does not
depend on the weights). Audio is noise plus chirps: speed does not depend on the content either.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile as sf
import torch

from jobs.stand_in import StandInLoader, StandInTranscriber
from pipeline import bundled
from pipeline import schema as S
from pipeline.audio import decode as decode_audio
from pipeline.audio import normalize
from pipeline.batching import plan_batches
from pipeline.config import JobConfig, load_config
from pipeline.engine import Plan, decode_dataset, ray_session, run_job
from pipeline.engine import plan as plan_job  # "plan" here is a batch plan
from pipeline.memory import CPU_REPLICA_ENV
from pipeline.model.conv_encoder import conv_output_frames
from pipeline.model.ctc import GreedyCTCDecoder
from pipeline.model.invariance import CONV_ENCODERS
from pipeline.model.loading import PRECISIONS, guard_positional_conv, resolve_precision
from pipeline.model.reference import Reference
from pipeline.model.spec import ModelSpec, TranscriberLoader
from pipeline.model.transcriber import CTCTranscriber
from pipeline.transcribe import TranscribeStage
from tools.synth import chirp

RATE = 16_000
# Passes of 3 and 3b over the plan. On a GPU the first batch of each new shape pays for per-shape
# set-up (the stock forward's cuDNN convs and attention), and every batch of a plan has a shape of
# its own, as in the job: the first pass is what the job sees, the second ("-again") the ceiling
# without that set-up.
PASSES = {"cpu": 1, "cuda": 2}
# The job's settings with --device cuda: the GPU config's (its batching means fewer batches, so
# fewer new shapes, see PASSES), one replica on one GPU.
GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu-cluster.yaml"


def make_corpus(folder: Path, minutes: float, seed: int = 0) -> list[Path]:
    """FLAC files totalling ``minutes``, durations 2-35 s, skewed short like LibriSpeech's."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, total = [], 0.0
    while total < minutes * 60:
        duration = float(np.clip(2.0 + rng.gamma(2.0, 4.0), 2.0, 35.0))
        path = folder / f"utt{len(paths):04d}.flac"
        sf.write(path, chirp(duration, rng, RATE), RATE)
        paths.append(path)
        total += duration
    return paths


def base_model_folder(folder: Path, model: str | None) -> str:
    """``model`` if given, else wav2vec2-base's architecture with random weights and the demo
    model's processor (base-960h's vocabulary and feature extractor), saved like a hub model."""
    if model:
        return model
    from transformers import AutoProcessor, Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=32, pad_token_id=0, architectures=["Wav2Vec2ForCTC"])
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    AutoProcessor.from_pretrained(bundled.model_path("@demo")).save_pretrained(folder)
    return str(folder)


def record_steady(seconds: dict[str, list[float]], name: str, summary: dict, audio_s: float) -> None:
    """The job's steady state, from its replicas' own timestamps (first batch start to last batch
    end: ``summary["replicas"]``), as seconds for the whole corpus like the other paths."""
    steady = summary.get("replicas", {}).get("steady_audio_s_per_s")
    if steady:
        seconds.setdefault(name, []).append(audio_s / steady)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()  # the earlier paths' garbage, collected before the clock starts, not during the run
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def seed_path(model_dir: str, paths: list[Path], device: str) -> None:
    """The reference path in the seed's batches of 2, in manifest order, each pair read as it comes."""
    reference = Reference.from_pretrained(model_dir, device)
    for i in range(0, len(paths), 2):
        reference.transcribe([sf.read(p, dtype="float32")[0] for p in paths[i : i + 2]], batch_size=2)


def hf_pipeline(model_dir: str, paths: list[Path], device: str) -> None:
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=model_dir, device=device)
    inputs = ({"raw": sf.read(p, dtype="float32")[0], "sampling_rate": RATE} for p in paths)
    for _ in asr(inputs, batch_size=8):
        pass


def record(seconds: dict[str, list[float]], name: str, passes: list[float]) -> None:
    """Add one run's passes: the first under ``name``, a second under ``name-again``."""
    for key, value in zip((name, f"{name}-again"), passes, strict=False):
        seconds.setdefault(key, []).append(value)


def sorted_batches(paths: list[Path], budget: int, max_waste: float) -> tuple[list[np.ndarray], list[list[int]]]:
    """Decoded, normalised waveforms and the job's length-sorted batch plan over them."""
    waves = [normalize(sf.read(p, dtype="float32")[0]) for p in paths]
    return waves, plan_batches([len(w) for w in waves], budget, max_waste)


def bare_forward(model_dir: str, waves: list[np.ndarray], plan: list[list[int]], precision: str,
                 device: str, passes: int, compiled: bool = False) -> tuple[list[float], float]:
    """Seconds spent in the stock transformers forward passes alone (tensors built beforehand,
    already on ``device``), per pass (see :data:`PASSES`), and padding waste. ``compiled``: the
    model under ``torch.compile`` with dynamic shapes (its compile falls in the warm-up, recompiles
    for shapes its guards reject in the first pass), to measure what compiling could give the
    replicas before they do it."""
    batches = []
    for rows in plan:
        width = len(waves[rows[0]])
        batch = torch.zeros(len(rows), width)
        for r, i in enumerate(rows):
            batch[r, : len(waves[i])] = torch.from_numpy(waves[i])
        batches.append(batch.to(device))
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(model_dir).to(device).eval()
    dtype = PRECISIONS[precision]
    if dtype is not None and device == "cpu":
        guard_positional_conv(model, dtype)  # as the job's CPU replicas do
    if compiled:
        model = torch.compile(model, dynamic=True)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        model(batches[-1])  # warm-up on the shortest batch
        seconds = []
        for _ in range(passes):
            sync()
            start = time.perf_counter()
            for batch in batches:
                model(batch).logits.argmax(-1).cpu()
            sync()
            seconds.append(time.perf_counter() - start)
    real = sum(len(w) for w in waves)
    return seconds, sum(b.numel() for b in batches) / real - 1


def replica_alone(model_dir: str, waves: list[np.ndarray], plan: list[list[int]], precision: str,
                  device: str, threads: int, passes: int, conv_encoder: str = "auto") -> list[float]:
    """Seconds the job's model code takes without Ray on the same batches, per pass (see
    :data:`PASSES`): ``CTCTranscriber.transcribe_batches`` (the conv encoder ``conv_encoder``, see
    ``pipeline.model.invariance.CONV_ENCODERS``) padding, running and decoding each."""
    transcriber = CTCTranscriber(ModelSpec(model_dir), device=device, threads=threads, precision=precision,
                                 conv_encoder=conv_encoder)
    transcriber.transcribe([waves[i] for i in plan[-1]])  # warm-up on the shortest batch
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        # As the job's replicas: each batch started before the one ahead is decoded. Strings come
        # back, so the GPU is done when the clock stops.
        for result in transcriber.transcribe_batches([waves[i] for i in rows] for rows in plan):
            if isinstance(result, Exception):
                raise result
        seconds.append(time.perf_counter() - start)
    return seconds


def stage_alone(p: Plan, threads: int, passes: int) -> list[float]:
    """Seconds the job's transcribe stage (``TranscribeStage``, the replica's code) takes without Ray,
    per pass (see :data:`PASSES`), on the job ``p``'s rows in calls like the job's: decoded
    beforehand by the job's decode stage in blocks of ``decode.rows_per_task`` rows,
    ``inference.rows_per_call`` rows a call, in manifest order (a replica gets blocks as the decode
    tasks finish them, about that order), and ``threads`` torch threads, as 3b. Against 3b (one plan
    over the whole corpus), what the job's calls cost: each plans its own rows (fewer rows to pack, so
    more and smaller batches), and on a GPU each ends with the batches started ahead drained; there
    it runs after 3b, so shapes 3b ran are warm. Raises if a row is missing or comes back without a
    transcript."""
    decode, rows, per_call = p.decode_stage(), p.cfg.decode.rows_per_task, p.cfg.inference.rows_per_call
    decoded = pa.concat_tables([decode(p.manifest.slice(i, rows)) for i in range(0, p.manifest.num_rows, rows)])
    calls = [decoded.slice(i, per_call) for i in range(0, decoded.num_rows, per_call)]
    # log_level None: this process's logging is set up already (a replica's is not, see log_to_stderr).
    stage = TranscribeStage(**{**p.transcribe_stage_kwargs(), "log_level": None,
                               "load": TranscriberLoader(p.spec, p.cfg.inference, threads)})
    stage(decoded.slice(0, 1))  # warm-up on one row
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        out = pa.concat_tables([stage(table) for table in calls])
        seconds.append(time.perf_counter() - start)
        if out[S.ID].to_pylist() != decoded[S.ID].to_pylist():
            raise RuntimeError(f"stage-alone: {out.num_rows} rows came back for {decoded.num_rows}")
        failed = out.filter(pc.is_null(out[S.TRANSCRIPT]))
        if failed.num_rows:
            raise RuntimeError(f"stage-alone: {failed.num_rows} rows without a transcript, the first "
                               f"{failed[S.ERROR][0]}")
    return seconds


def stand_in_alone(rate: float, waves: list[np.ndarray], plan: list[list[int]]) -> float:
    """Seconds the stand-in model (:mod:`jobs.stand_in`) takes for the plan's batches, started ahead
    as the replica does: the ceiling ``job-stand-in`` is measured against."""
    stand_in = StandInTranscriber(rate)
    start = time.perf_counter()
    for _ in stand_in.transcribe_batches([waves[i] for i in rows] for rows in plan):
        pass
    return time.perf_counter() - start


def _decode_file(path: Path) -> int:
    return len(decode_audio(str(path)).audio)


def decode_plain(paths: list[Path], processes: int) -> float:
    """Seconds the CPUs take to decode every file: the job's decode function in ``processes`` plain
    processes (soundfile, soxr, normalisation), without Ray, isolation or Arrow; the pool started,
    and warmed with one file per process, before the clock starts."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_file, paths[:processes], chunksize=1)  # most likely one each: the imports paid
        return timed(lambda: pool.map(_decode_file, paths, chunksize=4))


def decode_on_ray(cfg: JobConfig) -> list[float]:
    """Seconds the job's decode step alone takes on Ray (the same tasks, isolation and blocks), its
    output materialised in Ray's object store as the replicas would take it; Ray started before.
    Twice: the first pass also starts Ray Data's executor and the decode workers (and their
    decoding processes), the second finds them running, as a long job's later blocks do."""
    p = plan_job(cfg)
    with ray_session(cfg):
        return [timed(lambda: decode_dataset(p, p.manifest).materialize()) for _ in range(2)]


def decoding(model_dir: str, waves: list[np.ndarray], plan: list[list[int]], seed: int = 0) -> dict[str, float]:
    """Seconds greedy decoding takes over the plan's batches: the tokenizer's ``batch_decode``
    (how the seed path and the transformers pipeline decode) and the job's ``GreedyCTCDecoder``, on
    the same CTC-like argmax ids (each row's frames as the model gives them: runs of blanks and of
    repeated characters; a random-weight model's own argmax has hardly any blanks). Raises if the
    two decode any row differently."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    decoder = GreedyCTCDecoder(tokenizer, config.vocab_size)
    rng = np.random.default_rng(seed)
    batches = []
    for rows in plan:
        frames = torch.tensor([len(waves[i]) for i in rows])
        for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
            frames = conv_output_frames(frames, kernel, stride)
        blank = tokenizer.pad_token_id
        ids = np.full((len(rows), int(frames.max())), blank, dtype=np.int64)
        for row, n in zip(ids, frames.tolist(), strict=True):
            seq: list[int] = []
            while len(seq) < n:  # 1-3 blanks, then a character (past the 4 special tokens) 1-2 times
                char = int(rng.integers(4, len(tokenizer)))
                seq += [blank] * int(rng.integers(1, 4)) + [char] * int(rng.integers(1, 3))
            row[:n] = seq[:n]
        batches.append((ids, frames.tolist()))
    seconds, texts = {}, {}
    for name, decode in [("batch_decode", lambda ids, frames: tokenizer.batch_decode(
            [ids[i, :n].tolist() for i, n in enumerate(frames)])), ("greedy-ctc-decoder", decoder)]:
        start = time.perf_counter()
        texts[name] = [decode(ids, frames) for ids, frames in batches]
        seconds[name] = time.perf_counter() - start
    if texts["batch_decode"] != texts["greedy-ctc-decoder"]:
        raise RuntimeError("GreedyCTCDecoder decoded a row differently from the tokenizer's batch_decode")
    return seconds


def forward_flops(model_dir: str, waves: list[np.ndarray], plan: list[list[int]]) -> float:
    """The stock forward's arithmetic over the plan's padded batches (3's batches), in FLOPs: its
    matmuls, convolutions and attention, counted by torch's ``FlopCounterMode`` on the meta device
    (shapes only, nothing computed). Eager attention: its products are counted whatever the device,
    where the counter has no formula for some fused kernels (the CPU's flash attention)."""
    from torch.nn.utils import parametrize
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(model_dir, attn_implementation="eager").eval()
    for module in model.modules():
        if parametrize.is_parametrized(module):  # the positional conv's weight norm cannot run on meta
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name)
    model.to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        for rows in plan:
            model(torch.zeros(len(rows), len(waves[rows[0]]), device="meta"))
    return counter.get_total_flops()


def matmul_peak(precision: str, device: str, seconds: float = 3.0) -> float:
    """FLOP/s of (4096 x 768)(768 x 3072) products, wav2vec2-base's feed-forward shape, in
    ``precision``'s dtype (fp32 for ``fp32``): the best case for the model's arithmetic here."""
    dtype = PRECISIONS[precision] or torch.float32
    a = torch.randn(4096, 768, dtype=dtype, device=device)
    b = torch.randn(768, 3072, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    products = 0
    torch.mm(a, b)  # warm-up
    sync()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.mm(a, b)
        sync()
        products += 10
    return 2 * 4096 * 768 * 3072 * products / (time.perf_counter() - start)


def job_config(model_dir: str, manifest_dir: Path, out: Path, precision: str, overrides: list[str],
               device: str = "cpu") -> JobConfig:
    """The job's config for 4 (and stage-alone): the corpus in, ``out`` overwritten, no progress bars;
    with ``device`` cuda, :data:`GPU_CONFIG` with one GPU replica."""
    return load_config(GPU_CONFIG if device == "cuda" else None, overrides=[
        "ray.progress_bars=false", "output.overwrite=true", "input.allowed_roots=[]", *overrides], **{
        "input.path": str(manifest_dir), "output.path": str(out), "model.name": model_dir,
        "inference.precision": precision})


def roofline(flop_per_audio_s: float, speed: dict[str, float], precision: str, device: str) -> dict:
    """Each path's useful arithmetic rate (3's FLOPs per audio second at the path's speed; the seed
    path's batches of 2 pad more, so it computes more than that) against this machine's matmul peak
    at the path's precision (fp32 for the peers, the job's for 3, 3b and 4); prints and returns them."""
    peaks = {p: matmul_peak(p, device) for p in dict.fromkeys(["fp32", precision])}
    ceiling = {p: peak / flop_per_audio_s for p, peak in peaks.items()}
    share = {name: value * flop_per_audio_s / peaks["fp32" if name in ("seed", "hf-pipeline") else precision]
             for name, value in speed.items() if not name.startswith(("stand-in", "job-stand-in", "decode-"))}
    print(f"arithmetic: {flop_per_audio_s / 1e9:.2f} GFLOP per audio second (the stock forward on 3's "
          "batches: matmuls, convolutions, attention)")
    print("matmul peak (4096x768 by 768x3072): " + ", ".join(
        f"{p} {peak / 1e9:,.0f} GFLOP/s ({ceiling[p]:,.1f} audio s/s if every FLOP ran at it)"
        for p, peak in peaks.items()))
    print("share of that peak (3's arithmetic at each path's speed, against the peak at its precision): " + ", ".join(
        f"{name} {value:.2f}" for name, value in share.items()))
    result = {"gflop_per_audio_s": round(flop_per_audio_s / 1e9, 3),
              "matmul_peak_gflop_s": {p: round(peak / 1e9, 1) for p, peak in peaks.items()},
              "ceiling_audio_s_per_s": {p: round(c, 2) for p, c in ceiling.items()},
              "share_of_peak": {name: round(value, 3) for name, value in share.items()}}
    if "seed" in speed:
        result["job/seed_at_peak"] = round(ceiling[precision] / speed["seed"], 2)
        print(f"job/seed if the job ran every FLOP at the {precision} matmul peak: {result['job/seed_at_peak']:.2f}x")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # the re-exec below looks for --glibc-malloc by name
    ap.add_argument("--minutes", type=float, default=10.0, help="audio in the corpus (default 10)")
    ap.add_argument("--model", help="local CTC checkpoint; default: wav2vec2-base config, random weights")
    ap.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                    help="the job's, bare-forward's and replica-alone's (auto: as the job resolves it on --device)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where 1-3 run; with cuda the job gets one GPU replica (inference.gpus_per_replica=1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for 1-3")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; medians are reported")
    ap.add_argument("--skip", nargs="*", default=[], choices=["seed", "hf-pipeline", "model"],
                    help="leave out slow peers; model: every path that runs the model (3, 3b, 4), e.g. to time "
                         "only --stand-in and --decode-ceiling on a long corpus")
    ap.add_argument("--budgets", nargs="*", type=int, default=[], metavar="SAMPLES",
                    help="also time replica-alone at these inference.max_batch_samples, to pick the "
                         "budget for this device (e.g. 400000 800000 1600000 3200000)")
    ap.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                    help="job config overrides, added to the defaults (CPU: one replica with --threads "
                         "torch threads, so it computes on as many cores as 1-3, decode tasks sharing "
                         "them; cuda: one GPU replica with configs/gpu-cluster.yaml's batching, the CPUs "
                         "for decode tasks)")
    ap.add_argument("--json", type=Path, default=Path("out/benchmark.json"))
    ap.add_argument("--stage-alone", action="store_true",
                    help="also time the job's transcribe stage without Ray (stage-alone): 3b in the job's "
                         "calls of inference.rows_per_call rows, in manifest order, each planned alone")
    ap.add_argument("--decode-cost", action="store_true",
                    help="also time greedy decoding alone: the tokenizer's batch_decode against the job's "
                         "GreedyCTCDecoder, on CTC-like ids for the plan's batches")
    ap.add_argument("--encoders", nargs="*", default=[], choices=["stock", *CONV_ENCODERS],
                    help="also time 3b with these conv feature encoders (replica-<name>); the job's own "
                         "is inference.conv_encoder=auto: chunked on CPUs in bf16/fp16, batched on GPUs (with the "
                         "positional conv as products too)")
    ap.add_argument("--compiled", action="store_true",
                    help="also time bare-forward under torch.compile, two passes (bare-forward-compiled; "
                         "the first holds any recompiles for new shapes)")
    ap.add_argument("--job-marginal", action="store_true",
                    help="also run the job on the first half of the files: the job's speed without its "
                         "start-up (job-marginal) and the start-up's estimate")
    ap.add_argument("--roofline", action="store_true",
                    help="also count the forward's arithmetic (GFLOP per audio second) and time this "
                         "machine's matmul peak in fp32 and the job's precision: each path's share of "
                         "that peak, and the speed no path can pass")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="run 1-3b with glibc's default allocator settings instead of the job's replicas' "
                         "ones (needed for the seed path on long corpora: under the replicas' settings its "
                         "heap grew to 24 GB on 30 minutes); the job's replicas keep theirs")
    ap.add_argument("--stand-in", type=float, metavar="RATE",
                    help="also run the job with a stand-in model that takes as long as a model running RATE "
                         "audio s/s of padded batches on an accelerator would, using no CPU (job-stand-in), "
                         "against the stand-in alone: what the job's own machinery costs, on a CPU")
    ap.add_argument("--decode-ceiling", action="store_true",
                    help="also time decoding alone: the job's decode step on Ray (decode-job) against plain "
                         "soundfile + soxr in --threads processes (decode-plain)")
    args = ap.parse_args(argv)
    if args.compiled and "model" in args.skip:
        ap.error("--compiled times a model path: it cannot go with --skip model")
    args.precision = resolve_precision(args.precision, torch.device(args.device))
    # The job's own defaults size it (one CPU replica using every core; one replica per GPU).
    defaults = [f"ray.num_cpus={args.threads}"] + (
        ["inference.max_replicas=1", "inference.device=cuda"] if args.device == "cuda" else ["inference.device=cpu"])
    args.overrides = defaults + (args.overrides or [])
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    passes = PASSES[args.device]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_corpus(tmp / "corpus", args.minutes)
        audio_s = sum(sf.info(p).duration for p in paths)
        if args.job_marginal:
            half = paths[: len(paths) // 2]
            (tmp / "half").mkdir()
            for path in half:
                os.link(path, tmp / "half" / path.name)
            added_s = audio_s - sum(sf.info(p).duration for p in half)
        model_dir = base_model_folder(tmp / "model", args.model)
        job_cfg = job_config(model_dir, tmp / "corpus", tmp / "out", args.precision, args.overrides, args.device)
        inference = job_cfg.inference
        seconds: dict[str, list[float]] = {}
        decode_s: dict[str, list[float]] = {}
        summaries, stand_in_summaries = [], []
        flops = None
        for _ in range(args.repeats):
            if "seed" not in args.skip:
                seconds.setdefault("seed", []).append(timed(lambda: seed_path(model_dir, paths, args.device)))
            if "hf-pipeline" not in args.skip:
                seconds.setdefault("hf-pipeline", []).append(
                    timed(lambda: hf_pipeline(model_dir, paths, args.device)))
            gc.collect()  # 3 and 3b time only their forward passes, after this
            waves, plan = sorted_batches(paths, inference.max_batch_samples, inference.max_padding_waste)
            models = "model" not in args.skip
            if models:
                bare_s, bare_waste = bare_forward(model_dir, waves, plan, args.precision, args.device, passes)
                record(seconds, "bare-forward", bare_s)
                if args.compiled:
                    # two passes: the second past any recompiles
                    compiled_s = bare_forward(model_dir, waves, plan, args.precision, args.device, 2, compiled=True)[0]
                    record(seconds, "bare-forward-compiled", compiled_s)
                    # at once: a GPU check's time limit may end the run before the table
                    print("bare-forward-compiled, then again: " + ", ".join(
                        f"{audio_s / c:.2f}" for c in compiled_s) + " audio s/s (bare-forward: "
                          + ", ".join(f"{audio_s / c:.2f}" for c in bare_s) + ")", flush=True)
                record(seconds, "replica-alone",
                       replica_alone(model_dir, waves, plan, args.precision, args.device, args.threads, passes))
            if args.stage_alone:
                record(seconds, "stage-alone", stage_alone(plan_job(job_cfg), args.threads, passes))
            if args.decode_cost:
                for name, value in decoding(model_dir, waves, plan).items():
                    decode_s.setdefault(name, []).append(value)
            for encoder in args.encoders:
                record(seconds, f"replica-{encoder}", replica_alone(
                    model_dir, waves, plan, args.precision, args.device, args.threads, passes, conv_encoder=encoder))
            if args.roofline and flops is None:
                flops = forward_flops(model_dir, waves, plan)
            if args.stand_in:
                seconds.setdefault("stand-in", []).append(stand_in_alone(args.stand_in, waves, plan))
            del waves
            gc.collect()  # else Ray's driver collects the peers' models and pipelines during the job
            if models:
                summary = run_job(job_cfg)
                summaries.append(summary)
                seconds.setdefault("job", []).append(summary["wall_s"])
                seconds.setdefault("job-run", []).append(summary["phases_s"]["run"])
                record_steady(seconds, "job-steady", summary, audio_s)
            if args.stand_in:
                stand_in_job = run_job(job_cfg, load=StandInLoader(args.stand_in))
                seconds.setdefault("job-stand-in", []).append(stand_in_job["wall_s"])
                seconds.setdefault("job-stand-in-run", []).append(stand_in_job["phases_s"]["run"])
                record_steady(seconds, "job-stand-in-steady", stand_in_job, audio_s)
                stand_in_summaries.append(stand_in_job)
            if args.decode_ceiling:
                seconds.setdefault("decode-plain", []).append(decode_plain(paths, args.threads))
                record(seconds, "decode-job", decode_on_ray(job_cfg))
            if args.job_marginal and models:
                half_summary = run_job(job_config(model_dir, tmp / "half", tmp / "out", args.precision,
                                                  args.overrides, args.device))
                added = summary["wall_s"] - half_summary["wall_s"]
                # As seconds for the whole corpus at the second half's speed, like the other paths.
                seconds.setdefault("job-marginal", []).append(added * audio_s / added_s)
        sweep = {}
        for budget in args.budgets:
            waves, plan = sorted_batches(paths, budget, inference.max_padding_waste)
            # One pass each: the sweep picks a budget for the job, whose batches are new shapes.
            alone = [replica_alone(model_dir, waves, plan, args.precision, args.device, args.threads, 1)[0]
                     for _ in range(args.repeats)]
            sweep[budget] = audio_s / statistics.median(alone)

    speed = {name: audio_s / statistics.median(s) for name, s in seconds.items()}
    jobs = [name for name in ("job", "job-run", "job-steady", "job-marginal") if name in speed]
    # Measures of the job's machinery, each against its own ceiling (below), not against the model paths.
    apart = ("stand-in", "job-stand-in", "job-stand-in-run", "job-stand-in-steady", "decode-plain", "decode-job",
             "decode-job-again")
    ratios = {f"{path}/{name}": speed[path] / speed[name] for path in jobs for name in speed
              if name not in (*jobs, *apart)}
    for path, ceiling in [("job-stand-in", "stand-in"), ("job-stand-in-run", "stand-in"),
                          ("job-stand-in-steady", "stand-in"),
                          ("decode-job", "decode-plain"), ("decode-job-again", "decode-plain")]:
        if path in speed:
            ratios[f"{path}/{ceiling}"] = speed[path] / speed[ceiling]
    for name in ("bare-forward-compiled", "bare-forward-compiled-again"):  # what compiling gives the stock forward
        if name in speed:
            base = name.replace("-compiled", "")
            base = base if base in speed else "bare-forward"  # on a CPU, one pass: shapes cost nothing new
            ratios[f"{name}/{base}"] = speed[name] / speed[base]
    for name in speed:  # the job's calls or another encoder against the job's model code
        if name.startswith(("replica-", "stage-alone")) and name not in ("replica-alone", "replica-alone-again"):
            base = "replica-alone-again" if name.endswith("-again") else "replica-alone"
            ratios[f"{name}/{base}"] = speed[name] / speed[base]
    result = {
        "audio_s": round(audio_s, 1), "files": len(paths), "precision": args.precision,
        "model": args.model or "wav2vec2-base config, random weights",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "device": args.device, "overrides": args.overrides,
        "allocator": "glibc defaults" if args.glibc_malloc else "CPU_REPLICA_ENV",
        "audio_s_per_s": {k: round(v, 2) for k, v in speed.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "padding_waste": round(statistics.median(s["padding_waste"] for s in summaries), 4) if summaries else None,
        "bare_forward_padding_waste": round(bare_waste, 4) if summaries else None,
        "seconds": seconds,
        "replica_alone_by_budget": {str(b): round(v, 2) for b, v in sweep.items()},
        "decoding_audio_s_per_s": {k: round(audio_s / statistics.median(v), 1) for k, v in decode_s.items()},
    }
    print(f"\n{len(paths)} files, {audio_s / 60:.1f} min of audio, {result['model']}, job precision "
          f"{args.precision}, {result['machine']}")
    width = max(map(len, [*speed, *ratios]))
    print(f"{'path':{width}s} {'audio s/s':>10s}")
    for name, value in speed.items():
        print(f"{name:{width}s} {value:10.2f}")
    for name, value in ratios.items():
        print(f"{name:{width}s} {value:9.2f}x")
    if summaries:
        print(f"padding waste: job {result['padding_waste']:.2%}, bare forward (one plan over the whole "
              f"corpus) {bare_waste:.2%}")
        result["job_phases_s"] = {k: round(statistics.median(s["phases_s"][k] for s in summaries), 2)
                                  for k in summaries[0]["phases_s"]}
        print("the job's phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["job_phases_s"].items()))
    for name, runs in [("job", summaries), ("job-stand-in", stand_in_summaries)]:
        if runs and all(r.get("replicas") for r in runs):
            keys = ("first_batch_s", "last_batch_s", "busy_fraction", "device_busy_fraction",
                    "model_audio_s_per_s", "decode_audio_s_per_cpu_s", "decode_cpus_per_replica")
            result[f"{name}_replicas"] = timing = {
                k: statistics.median(r["replicas"][k] for r in runs) for k in keys
                if all(r["replicas"].get(k) is not None for r in runs)}
            print(f"{name}: first batch {timing['first_batch_s']:.2f} s after the command started, last batch "
                  f"ended at {timing['last_batch_s']:.2f} s; the replicas in calls {timing['busy_fraction']:.1%} "
                  f"of the time between, their device busy {timing.get('device_busy_fraction', math.nan):.1%}")
            if "decode_cpus_per_replica" in timing:
                print(f"{name}: the replicas ran {timing['model_audio_s_per_s']:,.0f} audio s/s inside calls, decode "
                      f"{timing['decode_audio_s_per_cpu_s']:,.0f} per CPU-second held: "
                      f"{timing['decode_cpus_per_replica']:.2f} decoding CPUs per replica")
    if args.job_marginal and summaries:
        startup = statistics.median(seconds["job"]) - statistics.median(seconds["job-marginal"])
        result["job_startup_s"] = round(startup, 1)
        print(f"job start-up, estimated (job's wall time less the corpus at job-marginal's speed): {startup:.1f} s")
    if "decode-job-again" in speed and "replica-alone" in speed:
        # How many decoding cores keep one replica busy: its model code's speed over one core's
        # share of the job's decode step (and of plain decoding, what a leaner decode step could reach).
        per_core = {k: speed[k] / args.threads for k in ("decode-job-again", "decode-plain")}
        cores = {k: round(speed["replica-alone"] / v, 2) for k, v in per_core.items()}
        result["decode_cores_per_replica"] = cores
        print("decoding cores one replica needs (replica-alone over one core's decode speed): "
              f"{cores['decode-job-again']:.2f} through the job's decode step, {cores['decode-plain']:.2f} at "
              "plain decoding's speed")
    if args.roofline:
        result["roofline"] = roofline(flops / audio_s, speed, args.precision, args.device)
    if decode_s:
        dec = result["decoding_audio_s_per_s"]
        print(f"greedy decoding alone: batch_decode {dec['batch_decode']:,.0f}, GreedyCTCDecoder "
              f"{dec['greedy-ctc-decoder']:,.0f} audio s/s "
              f"({dec['greedy-ctc-decoder'] / dec['batch_decode']:.2f}x, same texts)")
    for budget, value in sweep.items():
        print(f"replica-alone at max_batch_samples={budget:>9,d}: {value:8.2f} audio s/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    if "--glibc-malloc" not in sys.argv and any(os.environ.get(k) != v for k, v in CPU_REPLICA_ENV.items()):
        # glibc reads these only when a process starts: start again with them.
        os.execve(sys.executable, [sys.executable, "-m", "jobs.benchmark", *sys.argv[1:]],
                  {**os.environ, **CPU_REPLICA_ENV})
    main()
