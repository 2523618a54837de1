"""Column names, the Arrow schemas between the steps and of the output, and the audio column's layout:
named once, here. (Error kinds and stages: :mod:`pipeline.errors`.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

# Manifest columns after normalisation (see pipeline.manifest).
ID = "id"
PATH = "path"
DATASET_ROW = "dataset_row"  # a Hugging Face dataset row's index in its data file (pipeline.hf)
REFERENCE = "reference"

# Decoded audio travelling from the decode stage to the inference actors.
AUDIO = "audio"
NUM_SAMPLES = "num_samples"

# Output columns.
TRANSCRIPT = "transcript"
ERROR = "error"
ERROR_KIND = "error_kind"
ERROR_STAGE = "error_stage"
DURATION_S = "duration_s"
SAMPLE_RATE = "sample_rate"
NUM_CHANNELS = "num_channels"
MODEL = "model"
PADDED_SAMPLES = "padded_samples"
CONFIDENCE = "confidence"
WORDS = "words"
WER = "wer"
CER = "cer"
# Between the replicas and the LM decoding step (pipeline.lm): each frame's log-probabilities over
# the vocabulary, float16, frames one after another.
LOGPROBS = "logprobs"

# One recognised word: its text, where it starts and ends (seconds from the file's start) and its confidence.
WORD = pa.struct([("word", pa.string()), ("start_s", pa.float32()), ("end_s", pa.float32()),
                  ("confidence", pa.float32())])

# Accepted spellings of manifest columns, first match wins.
PATH_ALIASES = (PATH, "audio_filepath", "file", "audio_path")
REFERENCE_ALIASES = ("text", "transcript", "sentence")

# The manifest: every input normalised to these columns (pipeline.manifest).
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string()),
        pa.field(DATASET_ROW, pa.int64()),
        pa.field(REFERENCE, pa.string()),
    ]
)

# Rows between the stages: the manifest plus what the decode stage learned.
DECODED_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string()),
        pa.field(REFERENCE, pa.string()),
        pa.field(DURATION_S, pa.float64()),
        pa.field(SAMPLE_RATE, pa.int32()),
        pa.field(NUM_CHANNELS, pa.int32()),
        pa.field(ERROR_KIND, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field(ERROR_STAGE, pa.string()),
        pa.field(NUM_SAMPLES, pa.int64()),
        # large_list: one block may hold more than 2**31 samples (a few hours of audio).
        pa.field(AUDIO, pa.large_list(pa.float32())),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string()),
        pa.field(TRANSCRIPT, pa.string()),
        pa.field(ERROR_KIND, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field(ERROR_STAGE, pa.string()),
        pa.field(DURATION_S, pa.float64()),
        pa.field(SAMPLE_RATE, pa.int32()),
        pa.field(NUM_CHANNELS, pa.int32()),
        pa.field(REFERENCE, pa.string()),
        pa.field(WER, pa.float32()),
        pa.field(CER, pa.float32()),
        pa.field(MODEL, pa.string()),
        pa.field(NUM_SAMPLES, pa.int64()),
        pa.field(PADDED_SAMPLES, pa.int64()),
        pa.field(CONFIDENCE, pa.float32()),
        pa.field(WORDS, pa.list_(WORD)),
    ]
)

METADATA_KEY = b"corpus_transcribe"


def output_schema(metadata: dict, *, words: bool) -> pa.Schema:
    """The output schema carrying ``metadata`` (model id, revision, versions) as JSON; without the
    words column unless ``words``."""
    schema = OUTPUT_SCHEMA if words else OUTPUT_SCHEMA.remove(OUTPUT_SCHEMA.get_field_index(WORDS))
    return schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def word_entries(found: list[tuple[str, int, int, float]], seconds) -> tuple[list[dict], float | None]:
    """One row's :data:`WORDS` entries from its ``(word, first frame, end frame, confidence)``
    tuples (``seconds(frame)``: where a frame starts), and the row's :data:`CONFIDENCE`: the mean of
    its words' (None without words)."""
    words = [{"word": w, "start_s": seconds(a), "end_s": seconds(b), "confidence": c} for w, a, b, c in found]
    return words, (float(np.mean([w["confidence"] for w in words])) if words else None)


def with_logprobs(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the :data:`LOGPROBS` column the replicas hand to the LM decoding step."""
    return schema.append(pa.field(LOGPROBS, pa.large_list(pa.float16())))


def audio_column(waves: list[np.ndarray]) -> pa.LargeListArray:
    """The ``audio`` column for ``waves``: one Arrow list array over a single concatenated float32
    buffer (no per-row Python objects)."""
    offsets = np.zeros(len(waves) + 1, dtype=np.int64)
    np.cumsum([len(w) for w in waves], out=offsets[1:])
    values = np.concatenate(waves) if waves else np.zeros(0, dtype=np.float32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))


def logprobs_column(rows: list[np.ndarray | None]) -> pa.LargeListArray:
    """The :data:`LOGPROBS` column: each row's ``(frames, vocabulary)`` float16 array flattened, or null."""
    flat = [np.zeros(0, np.float16) if r is None else r.astype(np.float16, copy=False).ravel() for r in rows]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in flat], out=offsets[1:])
    values = np.concatenate(flat) if flat else np.zeros(0, np.float16)
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float16()), mask=mask)


def audio_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row of an ``audio`` column as a zero-copy numpy view, chunk by chunk: Ray Data hands a
    replica one chunk per decode task's block, and combining them would copy every sample."""
    waves = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()  # a sliced chunk's offsets index its unsliced values
        values = chunk.values.to_numpy(zero_copy_only=True)
        waves.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return waves
