"""Step 2, transcribe: decoded rows → output rows. Pure: no Ray, and no torch until the injected
loader runs (in the replica).

Each call sorts its rows by length and packs them into padded batches under a budget
(:func:`pipeline.batching.plan_batches`); error rows pass through untouched, a row too short for
the model becomes a ``too_short`` row, and a batch that fails is retried row by row, so only a row
that fails alone becomes an ``inference_error`` row.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.audio import normalize
from pipeline.batching import plan_batches
from pipeline.config import InferenceConfig
from pipeline.errors import ErrorKind, Stage
from pipeline.logs import log_to_stderr
from pipeline.scoring import row_scores
from pipeline.windows import Window, Windowing

log = logging.getLogger(__name__)

# One row's (or window's) argmax token ids and each frame's top posterior, over its own frames (and,
# when asked for, each frame's float16 log-probabilities over the vocabulary).
Emission = tuple[np.ndarray, ...]


class Transcriber(Protocol):
    """What the stage needs of a model replica (:class:`pipeline.model.transcriber.CTCTranscriber`)."""

    min_samples: int  # shorter rows are too_short
    precision: str  # as it runs (inference.precision's auto resolved), recorded in the output's metadata
    # A transcriber may also count its device's time on batches so far in ``device_s`` (seconds;
    # CTCTranscriber's: CUDA events on a GPU) for the summary's device_busy_fraction; without it, none.

    def transcribe_batches(self, batches: Iterable[Sequence[np.ndarray]],
                           logprobs: bool = False) -> Iterator[list[Emission] | Exception]:
        """For each batch in turn, its rows' emissions over their own frames (with ``logprobs``, their
        log-probabilities too), or the exception that batch raised. ``batches`` is consumed lazily,
        one batch ahead."""

    def decode(self, sequences: Sequence[np.ndarray]) -> list[str]:
        """The texts of argmax token id sequences (greedy CTC)."""

    def words(self, ids: np.ndarray, confidence: np.ndarray) -> list[tuple[str, int, int, float]]:
        """One row's words: ``(word, start frame, end frame (exclusive), confidence)``."""

    def release_memory(self) -> None:
        """Called after each call's batches."""


@dataclass(frozen=True)
class CallSpan:
    """When one call's model work ran, in wall-clock seconds (``time.time()``, comparable across the
    node's processes): from its first batch handed to the model to its last batch's result; and the
    audio of the rows it ran (a long row's once, whatever its windows' overlap)."""

    start: float
    end: float
    audio_s: float
    device_s: float | None = None  # the device's time on the call's batches, where the transcriber says


@dataclass(frozen=True)
class ReplicaStart:
    """When a replica's process started (None where the platform does not say), and when its
    transcriber's load (imports, weights, probes) began and ended; wall-clock seconds."""

    process: float | None
    load_start: float
    load_end: float


def process_start_time() -> float | None:
    """This process's start, wall-clock seconds (Linux's /proc; None elsewhere). /proc counts it in
    clock ticks on the boot-time clock, whose "now" converts it to wall-clock time to ~10 ms."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


# Replicas inside calls less than this share of their time were starved of decoded audio.
STARVED_BELOW = 0.9


def replica_timing(spans: Mapping[Any, Sequence[CallSpan]], since: float,
                   starts: Mapping[Any, ReplicaStart] | None = None,
                   decoded: tuple[float, float] | None = None) -> dict[str, Any]:
    """The replicas' own account of a run, from each replica's call spans: when the first batch
    started and the last ended (seconds after ``since``, the command's start), the busy fraction
    (time inside calls over each replica's first-start-to-last-end, summed over replicas), the
    steady-state speed (the audio over first start to last end) and the model's speed (the audio
    over the time inside calls); where every call says its device time, the device's busy fraction
    over the same spans. With ``starts``, also when the replica that ran the first batch started its
    process, was ready, and how long its load took: where the start-up went. With ``decoded``, the
    decode tasks' (audio seconds decoded, CPU seconds held): decode's speed per CPU and the CPUs
    decode needs to keep one replica busy at the model's speed. Empty without spans."""
    spans = {r: s for r, s in spans.items() if s}
    if not spans:
        return {}
    calls = [c for s in spans.values() for c in s]
    first, last = min(c.start for c in calls), max(c.end for c in calls)
    active = sum(max(c.end for c in s) - min(c.start for c in s) for s in spans.values())
    timing: dict[str, Any] = {"replicas": len(spans), "calls": len(calls)}
    leader = min(spans, key=lambda r: min(c.start for c in spans[r]))  # the replica that ran the first batch
    if starts and leader in starts:
        start = starts[leader]
        timing |= {"process_start_s": None if start.process is None else round(start.process - since, 3),
                   "ready_s": round(start.load_end - since, 3), "load_s": round(start.load_end - start.load_start, 3)}
    audio, inside = sum(c.audio_s for c in calls), sum(c.end - c.start for c in calls)
    timing |= {"first_batch_s": round(first - since, 3), "last_batch_s": round(last - since, 3),
               "busy_fraction": round(inside / active, 4) if active > 0 else 1.0}
    if active > 0 and all(c.device_s is not None for c in calls):
        timing["device_busy_fraction"] = round(sum(c.device_s for c in calls) / active, 4)
    timing["steady_audio_s_per_s"] = round(audio / (last - first), 2) if last > first else None
    model = audio / inside if inside > 0 else None
    timing["model_audio_s_per_s"] = None if model is None else round(model, 2)
    if decoded is not None and decoded[0] > 0 and decoded[1] > 0:
        per_cpu = decoded[0] / decoded[1]  # rounded only when stored: a slow decode must not round to 0
        timing["decode_audio_s_per_cpu_s"] = round(per_cpu, 2)
        timing["decode_cpus_per_replica"] = None if model is None else round(model / per_cpu, 2)
    return timing


def decode_shortfall(timing: Mapping[str, Any], decode_cpus: float) -> str | None:
    """Why the replicas waited, where they did (inside calls under :data:`STARVED_BELOW` of the
    time) and the ``decode_cpus`` the cluster left beside them are fewer than the replicas need at
    this run's measured speeds (:func:`replica_timing`); else None."""
    need = timing.get("decode_cpus_per_replica")
    if not need or timing.get("busy_fraction", 1.0) >= STARVED_BELOW or decode_cpus >= need * timing["replicas"]:
        return None
    return (f"the replicas waited for audio {1 - timing['busy_fraction']:.0%} of the time: each needs ~{need:g} "
            f"decoding CPUs at this run's speeds (the model ran {timing['model_audio_s_per_s']:,.0f} audio s/s, "
            f"decode {timing['decode_audio_s_per_cpu_s']:,.0f} per CPU), and the cluster left {decode_cpus:g} CPUs "
            f"for {timing['replicas']} replicas; give GPU nodes more CPUs per GPU, or run fewer replicas "
            "(inference.max_replicas) for the same speed (docs/design.md, Sizing decode)")


class TranscribeStage:
    """Decoded rows (:data:`pipeline.schema.DECODED_SCHEMA`) → output rows (the output schema with
    ``metadata``), one for one, in order. ``load`` builds the transcriber once, in the replica.

    A row longer than one of ``windowing``'s windows runs as windows (:mod:`pipeline.windows`),
    each normalised on its own where ``windowing.normalize``, packed into the same batches as the
    other rows; its kept frames are stitched in order and decoded as one sequence. A window that
    fails alone fails its row.

    Each transcribed row also gets its words (with ``words``, the column; each word's start and end
    in seconds and its confidence: the mean top posterior over its frames) and a ``confidence``: the
    mean of its words' confidences (null without words). With ``lm``, rows get neither text nor
    words here but their stitched log-probabilities (:data:`pipeline.schema.LOGPROBS`), for the
    LM decoding step (:mod:`pipeline.lm`).

    :attr:`start` says when the replica started and loaded; after each call, :attr:`last_span` says
    when its model work ran (None when no row ran)."""

    def __init__(self, load: Callable[[], Transcriber], inference: InferenceConfig, model_name: str,
                 metadata: dict, windowing: Windowing, *, words: bool, lm: bool = False,
                 log_level: int | None = None):
        if log_level is not None:  # in a Ray worker (see log_to_stderr)
            log_to_stderr(log_level)
        started = time.time()
        self.transcriber = load()
        self.start = ReplicaStart(process_start_time(), started, time.time())
        log.info("replica ready in %.1f s (imports, model load and probes)", self.start.load_end - started)
        self.model_name = model_name
        self.max_batch_samples = inference.max_batch_samples
        self.max_padding_waste = inference.max_padding_waste
        self.windowing = windowing
        self.words, self.lm = words, lm
        self.schema = S.output_schema({**metadata, "precision": self.transcriber.precision}, words=words)
        if lm:
            self.schema = S.with_logprobs(self.schema)
        self.last_span: CallSpan | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        waves = S.audio_views(table[S.AUDIO])
        transcripts: list[str | None] = [None] * n
        words: list[list[dict] | None] = [None] * n
        confidence: list[float | None] = [None] * n
        logprobs: list[np.ndarray | None] = [None] * n
        kinds = table[S.ERROR_KIND].to_pylist()
        errors = table[S.ERROR].to_pylist()
        stages = table[S.ERROR_STAGE].to_pylist()
        padded = [0] * n

        def fail(i: int, kind: ErrorKind, message: str) -> None:
            kinds[i], errors[i], stages[i] = kind, f"{kind}: {message}", Stage.TRANSCRIBE

        paths = table[S.PATH].to_pylist()
        items: list[tuple[int, Window]] = []  # what runs: whole rows, and the windows of long ones
        min_samples = self.transcriber.min_samples
        for i in range(n):
            if kinds[i] is not None:
                continue
            if len(waves[i]) < min_samples:
                fail(i, ErrorKind.TOO_SHORT, f"{paths[i]}: {len(waves[i])} samples after resampling, "
                     f"the model needs at least {min_samples}")
            else:
                items.extend((i, w) for w in self.windowing.windows(len(waves[i])))

        def wave(k: int) -> np.ndarray:
            i, w = items[k]
            if w.start == 0 and w.stop == len(waves[i]):
                return waves[i]
            piece = waves[i][w.start:w.stop]
            return normalize(piece) if self.windowing.normalize else piece

        def fail_item(k: int, exc: Exception) -> None:
            i = items[k][0]
            fail(i, ErrorKind.INFERENCE_ERROR, f"{paths[i]}: {type(exc).__name__}: {exc}")

        left = Counter(i for i, _ in items)  # windows still to run, per row
        pieces: dict[int, list[tuple]] = {i: [] for i in left}  # (window start, *its emission's kept frames)
        lengths = [w.stop - w.start for _, w in items]
        plan = plan_batches(lengths, self.max_batch_samples, self.max_padding_waste)
        call_started, device_before = time.time(), getattr(self.transcriber, "device_s", None)
        for done in self._run(plan, wave, lengths, fail_item):
            complete = []
            for k, emission, padded_len in done:
                i, w = items[k]
                pieces[i].append((w.start, *(part[w.first:w.last] for part in emission)))
                padded[i] = max(padded[i], padded_len)
                left[i] -= 1
                if left[i] == 0 and kinds[i] is None:
                    complete.append(i)
            # in the recording's order, whatever order the batches ran the windows in
            stitched = [tuple(np.concatenate(part) for part in list(zip(*sorted(pieces.pop(i), key=lambda p: p[0]),
                                                                          strict=True))[1:]) for i in complete]
            if self.lm:  # decoded by the LM step
                for i, emission in zip(complete, stitched, strict=True):
                    logprobs[i] = emission[2]
            elif complete:  # decoded while the next batch runs
                texts = self.transcriber.decode([ids for ids, *_ in stitched])
                for i, text, (ids, top) in zip(complete, texts, stitched, strict=True):
                    transcripts[i] = text
                    words[i], confidence[i] = S.word_entries(self.transcriber.words(ids, top), self.windowing.seconds)
        # left keeps every row handed to the model (failed ones too: the model ran them)
        device_s = None if device_before is None else self.transcriber.device_s - device_before
        self.last_span = CallSpan(call_started, time.time(), sum(len(waves[i]) for i in left) / self.windowing.rate,
                                  device_s) if items else None
        self.transcriber.release_memory()

        out = {
            S.ID: table[S.ID], S.PATH: table[S.PATH], S.TRANSCRIPT: transcripts,
            S.ERROR_KIND: kinds, S.ERROR: errors, S.ERROR_STAGE: stages,
            S.DURATION_S: table[S.DURATION_S], S.SAMPLE_RATE: table[S.SAMPLE_RATE],
            S.NUM_CHANNELS: table[S.NUM_CHANNELS], S.REFERENCE: table[S.REFERENCE],
            **dict(zip((S.WER, S.CER), row_scores(table[S.REFERENCE].to_pylist(), transcripts), strict=True)),
            S.MODEL: [self.model_name] * n, S.NUM_SAMPLES: table[S.NUM_SAMPLES], S.PADDED_SAMPLES: padded,
            S.CONFIDENCE: confidence, **({S.WORDS: words} if self.words else {}),
            **({S.LOGPROBS: S.logprobs_column(logprobs)} if self.lm else {}),
        }
        return pa.table(out, schema=self.schema)

    def _run(self, batches, wave, lengths, fail):
        """For each batch of items in turn, yield its ``(item, emission, padded length)`` triples. A failed
        batch is retried item by item, so a bad item fails alone (``fail(item, exception)``)."""
        results = self.transcriber.transcribe_batches(([wave(k) for k in batch] for batch in batches),
                                                      logprobs=self.lm)
        for batch, result in zip(batches, results, strict=True):
            if not isinstance(result, Exception):
                padded_len = max(lengths[k] for k in batch)
                yield [(k, ids, padded_len) for k, ids in zip(batch, result, strict=True)]
            elif len(batch) == 1:
                fail(batch[0], result)
            else:
                log.warning("batch of %d rows failed (%s); retrying them one at a time", len(batch), result)
                yield from self._run([[k] for k in batch], wave, lengths, fail)
