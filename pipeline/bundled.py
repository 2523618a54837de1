"""Data shipped inside the package, addressed by ``@name`` wherever a path or model id is accepted.

``@sample`` and ``@heldout`` are manifests (the sample clips of the demo, the held-out set of the
demo model); ``@demo`` is the small wav2vec2 CTC model trained on espeak-ng speech
(``pipeline/models/demo-wav2vec2``), ``@demo-lm`` a word 3-gram language model for it
(``tools/make_demo_lm.py``). They resolve through ``importlib.resources``, so they work
from a checkout and from an installed wheel alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PREFIX = "@"
INPUTS: dict[str, str] = {"@sample": "sample/manifest.csv", "@heldout": "heldout/manifest.csv"}
MODELS: dict[str, str] = {"@demo": "models/demo-wav2vec2"}
LANGUAGE_MODELS: dict[str, str] = {"@demo-lm": "models/demo-lm/demo-3gram.arpa"}


def _resolve(value: str, table: dict[str, str], what: str) -> str:
    if not value.startswith(PREFIX):
        return value
    if value not in table:
        raise ValueError(f"{what} = {value!r}: unknown bundled name; use one of {', '.join(table)}")
    return str(Path(str(resources.files("pipeline"))) / table[value])


def input_path(value: str) -> str:
    """``@sample``/``@heldout`` → the bundled manifest's path; any other value unchanged."""
    return _resolve(value, INPUTS, "input.path")


def model_path(value: str) -> str:
    """``@demo`` → the bundled model's folder; any other value (hub id, folder) unchanged."""
    return _resolve(value, MODELS, "model.name")


def lm_path(value: str) -> str:
    """``@demo-lm`` → the bundled language model's file; any other value unchanged."""
    return _resolve(value, LANGUAGE_MODELS, "decoding.lm")
