"""Benchmark: long recordings (windows) against the same audio as short files, with each step's memory.

    python -m jobs.long_audio --minutes 1 10 60 [--model DIR] [--precision fp32] [--json out/long_audio.json]

For each duration it writes one 16 kHz FLAC of held-out clips with pauses between them
(:func:`long_recording`), then runs, each in a fresh process so that its peak memory is its own:

- decode: the job's decode step (``DecodeStage``, isolated child process included) on the file;
- replica: the job's transcribe step (``TranscribeStage`` with the job's model code and default
  windows) on the decoded recording (``long``), then on the same clips as separate rows
  (``as-clips``: no windows, no overlap) in the same process.

It prints seconds, audio seconds per second, the peak resident memory of each process (the decode
task and its decoding child separately; the replica after loading its model and after the long
file) and ``long/as-clips``: what windows cost, their overlap included. Time should grow linearly
with duration, and memory stay bounded (the acceptance figure: no process over ~2 GB for an hour).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf

from pipeline import bundled
from pipeline import schema as S
from pipeline.audio import decode, normalize
from pipeline.config import AudioConfig, DecodeConfig, InferenceConfig, InputConfig
from pipeline.decode import DecodeStage

RATE = 16_000


def long_recording(path: Path, seconds: float, seed: int = 0) -> list[tuple[int, int]]:
    """Write the demo's held-out clips one after another, with 0.2-0.8 s of faint noise between
    them, to a 16 kHz FLAC of at least ``seconds``; return each clip's ``(start, stop)`` sample."""
    folder = Path(bundled.input_path("@heldout")).parent
    clips = [decode(str(p), do_normalize=False).audio for p in sorted(folder.glob("heldout-0?.flac"))]
    rng = np.random.default_rng(seed)
    spans, at = [], 0
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as out:
        while at < seconds * RATE:
            gap = (rng.standard_normal(int(rng.uniform(0.2, 0.8) * RATE)) * 1e-3).astype(np.float32)
            clip = clips[rng.integers(len(clips))]
            out.write(np.concatenate([gap, clip]))
            spans.append((at + len(gap), at + len(gap) + len(clip)))
            at += len(gap) + len(clip)
    return spans


def _front_end(model: str):
    from pipeline.model.spec import ModelSpec, load_front_end

    return load_front_end(ModelSpec(model))


def _windowing(model: str, inf: InferenceConfig):
    from pipeline.windows import Windowing

    fe = _front_end(model)
    return Windowing.of(inf.window_s, inf.strides, fe.sampling_rate, fe.hop, fe.do_normalize)


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def decode_step(model: str, inf: InferenceConfig, path: Path, out: Path) -> dict:
    """The job's decode step on one file; the waveform saved to ``out``."""
    manifest = pa.table({S.ID: ["long"], S.PATH: [str(path)], S.DATASET_ROW: pa.nulls(1, pa.int64()),
                         S.REFERENCE: [None]}, schema=S.MANIFEST_SCHEMA)
    stage = DecodeStage(_front_end(model), InputConfig(), AudioConfig(), DecodeConfig(), _windowing(model, inf).length)
    started = time.perf_counter()
    table = stage(manifest)
    seconds = time.perf_counter() - started
    assert table[S.ERROR][0].as_py() is None, table[S.ERROR][0]
    stage.close()  # the decoding child ends, so its peak counts in RUSAGE_CHILDREN
    np.save(out, S.audio_views(table[S.AUDIO])[0])
    return {"seconds": seconds, "peak_mb": _peak_mb(), "child_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN)}


def decoded_table(waves: list[np.ndarray]) -> pa.Table:
    """Decoded rows holding 16 kHz ``waves``, as a replica receives them."""
    n = len(waves)
    return pa.table({
        S.ID: [f"r{i}" for i in range(n)], S.PATH: [f"r{i}" for i in range(n)], S.REFERENCE: [None] * n,
        S.DURATION_S: [len(w) / RATE for w in waves], S.SAMPLE_RATE: [RATE] * n, S.NUM_CHANNELS: [1] * n,
        S.ERROR_KIND: [None] * n, S.ERROR: [None] * n, S.ERROR_STAGE: [None] * n,
        S.NUM_SAMPLES: [len(w) for w in waves], S.AUDIO: S.audio_column(waves),
    }, schema=S.DECODED_SCHEMA)


def replica_step(model: str, inf: InferenceConfig, wave_file: Path, spans: list[tuple[int, int]], device: str,
                 precision: str, threads: int, lm_file: str | None) -> dict:
    """The job's transcribe step on the long recording, then on its clips as rows; then the long
    recording without words, and with ``lm_file`` the replica's share and the LM step's."""
    from pipeline.lm import LanguageModel, LMDecodeStage
    from pipeline.model.spec import ModelSpec, ctc_labels
    from pipeline.model.transcriber import CTCTranscriber
    from pipeline.transcribe import TranscribeStage

    transcriber = CTCTranscriber(ModelSpec(model), device=device, threads=threads, precision=precision)
    stage = TranscribeStage(lambda: transcriber, inf, model, {}, _windowing(model, inf), words=True)
    stage(decoded_table([normalize(np.sin(np.arange(RATE, dtype=np.float32)))]))  # warm-up
    loaded_mb = _peak_mb()
    table = decoded_table([np.load(wave_file)])  # the block a replica receives; its only copy of the audio here
    wave = S.audio_views(table[S.AUDIO])[0]
    started = time.perf_counter()
    row = stage(table).to_pylist()[0]
    long_s = time.perf_counter() - started
    assert row[S.ERROR] is None, row[S.ERROR]
    long_mb = _peak_mb()
    clips = [normalize(wave[a:b]) for a, b in spans]
    rows_per_call = inf.rows_per_call
    started = time.perf_counter()
    for i in range(0, len(clips), rows_per_call):
        stage(decoded_table(clips[i:i + rows_per_call]))
    clips_s = time.perf_counter() - started
    result = {"long_s": long_s, "as_clips_s": clips_s, "clips_audio_s": sum(map(len, clips)) / RATE,
              "loaded_peak_mb": loaded_mb, "long_peak_mb": long_mb, "words": len(row[S.TRANSCRIPT].split())}
    no_words = TranscribeStage(lambda: transcriber, inf, model, {}, _windowing(model, inf), words=False)
    started = time.perf_counter()
    no_words(table)
    result["long_no_words_s"] = time.perf_counter() - started
    if lm_file:
        lm = LanguageModel(tuple(ctc_labels(ModelSpec(model))), file=lm_file)
        handing = TranscribeStage(lambda: transcriber, inf, model, {}, _windowing(model, inf), words=True, lm=True)
        lm_stage = LMDecodeStage(lm, _windowing(model, inf))
        lm_stage(handing(decoded_table([clips[0]])))  # loads the LM
        started = time.perf_counter()
        handed = handing(table)
        result["long_logprobs_s"] = time.perf_counter() - started
        started = time.perf_counter()
        lm_stage(handed)
        result["lm_decode_s"] = time.perf_counter() - started
    return result


def _in_child(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "jobs.long_audio", *args], capture_output=True, text=True,
                         check=False)
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    ap.add_argument("--model", default="@demo", help="a local CTC checkpoint (default: the bundled demo model)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--window-s", type=float, default=InferenceConfig().window_s, help="inference.window_s")
    ap.add_argument("--stride-s", type=float, default=InferenceConfig().window_stride_s,
                    help="inference.window_stride_s, each side")
    ap.add_argument("--lm", default="@demo-lm", help="also time the LM decoding step with this KenLM model "
                    "('' to skip; @demo-lm fits the demo's vocabulary, which the default --model shares)")
    ap.add_argument("--json", type=Path, default=Path("out/long_audio.json"))
    ap.add_argument("--step", choices=["decode", "replica"], help=argparse.SUPPRESS)  # a child's work
    ap.add_argument("--files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model = bundled.model_path(args.model)
    inf = InferenceConfig(window_s=args.window_s, window_stride_s=args.stride_s)
    if args.step == "decode":
        result = decode_step(model, inf, *args.files)
    elif args.step == "replica":
        spans = json.loads(args.files[1].read_text())
        result = replica_step(model, inf, args.files[0], spans, args.device, args.precision, args.threads,
                              args.lm or None)
    else:
        result = {}
        with tempfile.TemporaryDirectory() as tmp:
            for minutes in args.minutes:
                flac, wave, spans = Path(tmp, "long.flac"), Path(tmp, "wave.npy"), Path(tmp, "spans.json")
                spans.write_text(json.dumps(long_recording(flac, minutes * 60)))
                common = ["--model", model, "--device", args.device, "--precision", args.precision,
                          "--window-s", str(args.window_s), "--stride-s", str(args.stride_s), "--lm", args.lm,
                          *(["--threads", str(args.threads)] if args.threads else [])]
                dec = _in_child("--step", "decode", "--files", str(flac), str(wave), *common)
                rep = _in_child("--step", "replica", "--files", str(wave), str(spans), *common)
                audio_s = sf.info(flac).duration
                long, clips = audio_s / rep["long_s"], rep["clips_audio_s"] / rep["as_clips_s"]  # the pauses: long only
                result[f"{minutes:g} min"] = {
                    "audio_s": audio_s, "decode": dec, "replica": rep, "decode_audio_s_per_s": audio_s / dec["seconds"],
                    "long_audio_s_per_s": long, "as_clips_audio_s_per_s": clips, "long/as-clips": long / clips,
                }
                result[f"{minutes:g} min"]["words_cost"] = rep["long_s"] / rep["long_no_words_s"] - 1
                lm = f", LM step {audio_s / rep['lm_decode_s']:.0f} audio s/s" if "lm_decode_s" in rep else ""
                print(f"{minutes:6g} min: decode {audio_s / dec['seconds']:8.0f} audio s/s, peak {dec['peak_mb']:5.0f} "
                      f"MB (child {dec['child_peak_mb']:5.0f} MB) | replica long {long:6.1f} audio s/s, as clips "
                      f"{clips:6.1f} (long/as-clips {long / clips:.2f}), peak {rep['loaded_peak_mb']:5.0f} MB loaded, "
                      f"{rep['long_peak_mb']:5.0f} MB after the long file | words cost "
                      f"{rep['long_s'] / rep['long_no_words_s'] - 1:+.1%}{lm}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.step:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
