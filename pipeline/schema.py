"""Column names, error kinds and the output Arrow schema: named once, here."""

from __future__ import annotations

import json

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

# Stages named in ``error_stage``.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_TRANSCRIBE = "transcribe"


class ErrorKind:
    """The fixed set of machine-readable error kinds written to ``error_kind``."""

    NOT_FOUND = "not_found"  # the file does not exist (or is a dangling symlink)
    UNREADABLE = "unreadable"  # exists but cannot be read: a directory, a FIFO, no permission, a symlink loop
    NOT_ALLOWED = "not_allowed"  # outside input.allowed_roots (after resolving symlinks and "..")
    TOO_LARGE = "too_large"  # the file is larger than audio.max_file_bytes
    DECODE_ERROR = "decode_error"  # libsndfile cannot decode it
    EMPTY = "empty"  # decodes to zero samples
    NON_FINITE = "non_finite"  # NaN or Inf samples
    TOO_LONG = "too_long"  # longer than audio.max_duration_s (by its header, checked before reading)
    TOO_SHORT = "too_short"  # shorter than the model's receptive field
    TIMEOUT = "timeout"  # decoding took longer than decode.timeout_s; its process was killed
    WORKER_CRASH = "worker_crash"  # the decoding process died on it decode.max_attempts times
    INFERENCE_ERROR = "inference_error"  # the model failed on this row alone

    ALL = (NOT_FOUND, UNREADABLE, NOT_ALLOWED, TOO_LARGE, DECODE_ERROR, EMPTY, NON_FINITE, TOO_LONG,
           TOO_SHORT, TIMEOUT, WORKER_CRASH, INFERENCE_ERROR)


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
