"""Column names, the Arrow schemas between the steps and of the output, and the audio column's layout:
named once, here. (Error kinds and stages: :mod:`pipeline.errors`.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

# Manifest columns after normalisation (see pipeline.manifest).
ID = "id"
PATH = "path"
AUDIO_BYTES = "audio_bytes"
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

# Accepted spellings of manifest columns, first match wins.
PATH_ALIASES = (PATH, "audio_filepath", "file", "audio_path")
REFERENCE_ALIASES = ("text", "transcript", "sentence")

# The manifest: every input normalised to these columns (pipeline.manifest).
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string()),
        pa.field(AUDIO_BYTES, pa.binary()),
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
        pa.field(MODEL, pa.string()),
        pa.field(NUM_SAMPLES, pa.int64()),
        pa.field(PADDED_SAMPLES, pa.int64()),
    ]
)

METADATA_KEY = b"corpus_transcribe"


def output_schema(metadata: dict) -> pa.Schema:
    """The output schema carrying ``metadata`` (model id, revision, versions) as JSON."""
    return OUTPUT_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def audio_column(waves: list[np.ndarray]) -> pa.LargeListArray:
    """The ``audio`` column for ``waves``: one Arrow list array over a single concatenated float32
    buffer (no per-row Python objects)."""
    offsets = np.zeros(len(waves) + 1, dtype=np.int64)
    np.cumsum([len(w) for w in waves], out=offsets[1:])
    values = np.concatenate(waves) if waves else np.zeros(0, dtype=np.float32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))


def audio_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row of an ``audio`` column as a zero-copy numpy view, chunk by chunk: Ray Data hands a
    replica one chunk per decode task's block, and combining them would copy every sample."""
    waves = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()  # a sliced chunk's offsets index its unsliced values
        values = chunk.values.to_numpy(zero_copy_only=True)
        waves.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return waves
