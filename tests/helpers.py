"""Small real models and audio for the tests (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

from tools.demo_model import VOCAB as BASE_960H_VOCAB  # base-960h's vocabulary, id for id
from tools.synth import chirp

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def start_transcribe(*args: str, **popen_kwargs) -> subprocess.Popen:
    """The ``transcribe`` command line as a user runs it, from the checkout, output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.transcribe", *args], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs,
    )


def make_ctc_model(folder: Path, norm: str = "group", seed: int = 0) -> Path:
    """Save a tiny random-weight Wav2Vec2ForCTC with base-960h's conv geometry and vocabulary.

    ``norm="group"`` is wav2vec2-base-960h's kind (no attention mask); ``norm="layer"`` is the
    large/lv60 kind, whose feature extractor returns an attention mask.
    """
    torch.manual_seed(seed)
    layer = norm == "layer"
    config = Wav2Vec2Config(
        vocab_size=len(BASE_960H_VOCAB),
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, feat_extract_norm=norm, do_stable_layer_norm=layer,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        pad_token_id=0, ctc_loss_reduction="mean",
    )
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        # Spread the logits so greedy decoding is not a coin toss between near-equal classes.
        model.lm_head.weight.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps(BASE_960H_VOCAB))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
        return_attention_mask=layer,
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tone_clips(folder: Path, durations_s: list[float], rate: int = 16_000, seed: int = 0) -> list[Path]:
    """Write FLAC clips of the given lengths: chirps plus noise, different per clip."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, dur in enumerate(durations_s):
        path = folder / f"clip{i:03d}.flac"
        sf.write(path, chirp(dur, rng, rate), rate)
        paths.append(path)
    return paths
