"""A small wav2vec2 CTC model trained from scratch on espeak-ng speech: the offline demo and test oracle.

The real checkpoint (``facebook/wav2vec2-base-960h``) cannot be downloaded everywhere, and a model
with random weights transcribes noise. This module builds a model of the same family (raw-waveform
conv front end with ``feat_extract_norm="group"``, transformer encoder, character CTC head with
exactly base-960h's 32-token vocabulary), synthesises English speech with espeak-ng, trains, and
saves the model with its processor so ``from_pretrained(folder)`` loads it like a hub model.

``tools/train_demo_model.py`` is the thin command line over it. A developer's tool: the job never
imports it; the trained model ships as package data (``@demo``).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.audio import decode, normalize
from tools.synth import require_espeak, synthesize

SAMPLE_RATE = 16_000

# facebook/wav2vec2-base-960h's vocabulary, ids included. "<pad>" (0) is the CTC blank.
VOCAB: dict[str, int] = {
    "<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8, "N": 9,
    "I": 10, "H": 11, "S": 12, "R": 13, "D": 14, "L": 15, "U": 16, "M": 17, "W": 18, "C": 19,
    "F": 20, "G": 21, "Y": 22, "P": 23, "B": 24, "V": 25, "K": 26, "'": 27, "X": 28, "J": 29,
    "Q": 30, "Z": 31,
}  # fmt: skip

# Common English words; exact homophones (there/their, right/write, no/know, ...) and words whose
# pronunciation depends on meaning (read, lead, live, wind, close, ...) were removed after comparing
# espeak-ng phoneme strings, so every word is recoverable from its sound.
_WORD_TEXT = """
the of and a in is it you that he was for on are with as i his they be at one have this from or
had by word but what some we can out other were all there when up use your how said each she
which do time if will way about many then them would like so these her long make thing see him
has look more day could go come did number sound no most people my over water call first who may
down side been now find any new work part take get place made where after back little only round
man year came show every good me give our under name very through just form sentence great think
say help low line turn cause much mean before move right boy old same tell does set three want
air well also play small end put home hand port large spell add even land must big high such
follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school
grow study still learn plant cover food sun four between state keep never last let thought city
tree cross farm hard start might story saw far draw left late run don't while press night real
life few north open seem together next white children begin got walk example paper group always
music those both mark often letter until mile river car feet care second book carry took science
eat room friend began idea fish mountain stop once base hear horse cut sure watch color face
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct leave song measure door product black short class question happen complete ship
area half rock order fire south problem piece told pass since top whole king space heard best
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule pull cold notice voice
unit power town fine certain fly fall cry dark machine note wait plan figure star box noun field
rest correct able pound done beauty drive stood contain front teach week final gave green quick
develop ocean warm free strong special mind behind clear tail fact street inch nothing course
stay wheel full force blue decide surface deep moon island foot system busy test boat common
gold possible dry wonder laugh thousand ago ran check game shape hot miss brought heat snow tire
bring yes distant fill east paint language among it's can't i'm that's won't didn't zero jump
quiet zebra jazz puzzle queen quality extra exact seven eight nine window garden kitchen yellow
orange purple winter summer spring autumn doctor teacher village market bridge forest desert
valley
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

# espeak-ng voices are "<language>+<variant>". Training combines these at random; the held-out
# voices below use languages and variants that training never sees (and a few it does).
TRAIN_LANGUAGES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
)  # fmt: skip
TRAIN_VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3",
    "klatt5", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique",
    "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "adam", "anika", "antonio",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma", "iven",
)  # fmt: skip
# More natural-sounding variants, used with ``TrainSettings.extended_voices`` (stage 3 on): voice
# variety is what the unseen held-out voices lack. The held-out variants' siblings (steph2, steph3)
# and the robotic, whispering and novelty variants are left out.
EXTRA_TRAIN_VARIANTS: tuple[str, ...] = (
    "Gene2", "edward2", "iven2", "iven3", "iven4", "john", "klatt6", "m8", "marcelo", "max",
    "michel", "miguel", "norbert", "pablo", "pedro", "quincy", "rob", "robert", "sandro", "shelby",
    "travis", "victor", "zac", "gustave", "grandpa",
)  # fmt: skip
# (voice, seen in training?) -- languages en-us-nyc and en-gb-x-gbcwmd and variants m7, f5,
# klatt4, linda, paul, steph are never used for training.
HELDOUT_VOICES: tuple[tuple[str, bool], ...] = (
    ("en-us-nyc+m7", False),
    ("en-gb-x-gbcwmd+f5", False),
    ("en-us+linda", False),
    ("en-gb+paul", False),
    ("en-us+klatt4", False),
    ("en-gb-x-rp+steph", False),
    ("en-us+m3", True),
    ("en-gb+f2", True),
    ("en-029+klatt2", True),
    ("en-gb-scotland+Alex", True),
)

_NOT_IN_VOCAB = re.compile(r"[^A-Z' ]+")


def normalize_text(text: str) -> str:
    """Upper-case; keep letters, apostrophes and single spaces (the model's output alphabet)."""
    return " ".join(_NOT_IN_VOCAB.sub(" ", text.upper()).split())


def encode_text(text: str) -> list[int]:
    """Label ids for ``text`` (already normalised): letters and "'" map to themselves, " " to "|"."""
    return [VOCAB["|"] if c == " " else VOCAB[c] for c in text]


# ------------------------------------------------------------------------------------------------
# Utterances
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything needed to synthesise one utterance deterministically."""

    text: str  # normalised (upper case)
    voice: str
    speed_wpm: int
    pitch: int


def sample_sentence(rng: random.Random, words: Sequence[str] = WORDS, min_words: int = 1,
                    max_words: int = 12) -> str:
    """A random word sequence (not grammatical), normalised."""
    n = rng.randint(min_words, max_words)
    return normalize_text(" ".join(rng.choice(words) for _ in range(n)))


def sample_training_specs(n: int, seed: int, exclude: Iterable[str] = (),
                          variants: Sequence[str] = TRAIN_VARIANTS) -> list[UtteranceSpec]:
    """``n`` training utterances: random sentences, language+variant voices, speeds and pitches."""
    rng = random.Random(seed)
    excluded = set(exclude)
    specs = []
    while len(specs) < n:
        text = sample_sentence(rng)
        if text in excluded:
            continue
        variant = rng.choice(variants)
        voice = rng.choice(TRAIN_LANGUAGES) + (f"+{variant}" if variant else "")
        specs.append(UtteranceSpec(text, voice, rng.randint(120, 230), rng.randint(15, 85)))
    return specs


def sample_heldout_specs(n: int, seed: int) -> list[UtteranceSpec]:
    """``n`` held-out utterances cycling through :data:`HELDOUT_VOICES`, moderate speeds."""
    rng = random.Random(seed)
    specs, seen = [], set()
    while len(specs) < n:
        text = sample_sentence(rng, min_words=3, max_words=12)
        if text in seen:
            continue
        seen.add(text)
        voice = HELDOUT_VOICES[len(specs) % len(HELDOUT_VOICES)][0]
        specs.append(UtteranceSpec(text, voice, rng.randint(140, 200), rng.randint(30, 70)))
    return specs


def synthesize_spec(spec: UtteranceSpec) -> np.ndarray:
    """float32 mono 16 kHz audio for one spec (espeak-ng gets the lower-case text)."""
    return synthesize(spec.text.lower(), voice=spec.voice, speed_wpm=spec.speed_wpm,
                      pitch=spec.pitch, sample_rate=SAMPLE_RATE)


def _synth_int16(spec: UtteranceSpec) -> np.ndarray:
    audio = synthesize_spec(spec)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


@dataclass
class Corpus:
    """Synthesised utterances held as int16 arrays (16 kHz) with their texts."""

    audio: list[np.ndarray]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def hours(self) -> float:
        return sum(len(a) for a in self.audio) / SAMPLE_RATE / 3600


def synthesize_corpus(specs: Sequence[UtteranceSpec], processes: int = 2,
                      cache: Path | None = None, log: Callable[[str], None] = print) -> Corpus:
    """Synthesise ``specs`` with ``processes`` workers; cache as one ``.npz`` when ``cache`` is set.

    The cache is keyed by the specs themselves, so changing the seed or the count re-synthesises.
    """
    require_espeak()
    if cache is not None:
        import hashlib

        key = hashlib.sha256(json.dumps([asdict(s) for s in specs]).encode()).hexdigest()[:16]
        path = Path(cache) / f"corpus-{len(specs)}-{key}.npz"
        if path.exists():
            data = np.load(path, allow_pickle=False)
            offsets = data["offsets"]
            flat = data["audio"]
            audio = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            log(f"loaded {len(audio)} cached utterances from {path}")
            return Corpus(audio, [s.text for s in specs])
    start = time.monotonic()
    if processes > 1 and len(specs) > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            audio = pool.map(_synth_int16, specs, chunksize=64)
    else:
        audio = [_synth_int16(s) for s in specs]
    corpus = Corpus(audio, [s.text for s in specs])
    log(f"synthesised {len(specs)} utterances ({corpus.hours():.2f} h) "
        f"in {time.monotonic() - start:.0f} s")
    if cache is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(a) for a in audio]).astype(np.int64)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, audio=np.concatenate(audio), offsets=offsets)
        os.replace(tmp, path)
    return corpus


# ------------------------------------------------------------------------------------------------
# Model and processor
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelSize:
    """Architecture knobs; everything else matches wav2vec2-base-960h's config."""

    conv_channels: int = 64
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    pos_conv_kernel: int = 64
    pos_conv_groups: int = 16


def build_config(size: ModelSize | None = None):
    from transformers import Wav2Vec2Config

    size = size or ModelSize()
    return Wav2Vec2Config(
        vocab_size=len(VOCAB),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        hidden_act="gelu",
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        feat_extract_norm="group",
        feat_extract_activation="gelu",
        conv_dim=(size.conv_channels,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        num_conv_pos_embeddings=size.pos_conv_kernel,
        num_conv_pos_embedding_groups=size.pos_conv_groups,
        # Pre-LN encoder (layer norm before each block, as in wav2vec2-large-lv60): trained from
        # scratch, the post-LN encoder of base-960h stayed on the all-blank CTC plateau here for
        # 1,500+ steps while this one left it within ~200. The conv front end is base-960h's.
        do_stable_layer_norm=True,
        apply_spec_augment=True,
        mask_time_prob=0.05,
        mask_time_length=5,
        mask_feature_prob=0.0,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
        pad_token_id=VOCAB["<pad>"],
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        architectures=["Wav2Vec2ForCTC"],
    )


def build_processor():
    """A ``Wav2Vec2Processor`` equal to base-960h's: same vocabulary and feature extractor."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps(VOCAB))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(vocab_file), unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
            eos_token="</s>", word_delimiter_token="|", do_lower_case=False,
        )
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=False,
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Speed perturbation, band limiting (8 kHz round trip), silence padding and noise."""
    import soxr

    if rng.random() < 0.5:
        factor = rng.uniform(0.88, 1.12)  # >1: faster (and higher)
        x = soxr.resample(x, SAMPLE_RATE, SAMPLE_RATE / factor, quality="LQ")
    if rng.random() < 0.15:
        x = soxr.resample(soxr.resample(x, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)
    if rng.random() < 0.5:
        lead, tail = rng.integers(0, SAMPLE_RATE // 4, size=2)
        x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    x = x * rng.uniform(0.3, 1.5)
    if rng.random() < 0.5:
        snr_db = rng.uniform(8.0, 40.0)
        power = float(np.mean(x**2)) + 1e-10
        x = x + rng.normal(0.0, math.sqrt(power / 10 ** (snr_db / 10)), size=len(x))
    return x.astype(np.float32)


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                   shortest_first: int = 0) -> list[list[int]]:
    """One epoch of batches of similar length (little padding), jittered each call, in training order.

    The order is random, except that the ``shortest_first`` batches of the shortest utterances
    come first, shortest to longest (SortaGrad): CTC leaves its all-blank plateau much sooner on
    short utterances.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * rng.uniform(0.9, 1.1))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    head, rest = batches[:shortest_first], batches[shortest_first:]
    rng.shuffle(rest)
    return head + rest[::-1]


def plan_training(lengths: Sequence[int], batch_size: int, steps: int, rng: random.Random,
                  curriculum_steps: int) -> list[list[int]]:
    """The batch of every step, epoch after epoch (the curriculum in the first epoch only)."""
    plan: list[list[int]] = []
    while len(plan) < steps:
        plan += length_batches(lengths, batch_size, rng, curriculum_steps if not plan else 0)
    return plan[:steps]


def collate(audios: Sequence[np.ndarray], texts: Sequence[str], rng: np.random.Generator,
            train: bool, extra_pad_prob: float = 0.2, pad_multiple: int = 3200):
    """Normalise each utterance alone, then zero-pad (no attention mask); labels padded with -100."""
    import torch

    xs = [normalize(augment(a, rng) if train else a) for a in audios]
    width = max(len(x) for x in xs)
    if train and rng.random() < extra_pad_prob:
        width += int(rng.integers(0, SAMPLE_RATE // 2))
    # Round the padded width up to a multiple of 0.2 s: a few hundred distinct shapes instead of one
    # per batch, so oneDNN reuses its kernels (new shapes cost ~1 s each on CPU).
    width = -(-width // pad_multiple) * pad_multiple
    inputs = np.zeros((len(xs), width), np.float32)
    for row, x in enumerate(xs):
        inputs[row, : len(x)] = x
    ids = [encode_text(t) for t in texts]
    labels = np.full((len(ids), max(len(i) for i in ids)), -100, np.int64)
    for row, i in enumerate(ids):
        labels[row, : len(i)] = i
    return torch.from_numpy(inputs), torch.from_numpy(labels)


@dataclass
class TrainSettings:
    out: Path
    steps: int = 4000
    minutes: float | None = None  # also stop after this wall time (the schedule then shrinks)
    num_utterances: int = 25_000
    num_dev: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 300
    curriculum_steps: int = 800  # first steps on the shortest utterances, shortest first
    weight_decay: float = 0.01
    seed: int = 0
    workdir: Path = Path(tempfile.gettempdir()) / "demo-wav2vec2-work"
    processes: int = 2
    threads: int | None = None
    # bf16 autocast is ~1.5x faster per step on this CPU but, measured on a toy set before the
    # positional conv was kept in fp32 (see ``pipeline.model.loading.positional_conv_in_fp32``), kept the
    # model on the all-blank CTC plateau where fp32 left it within 200 steps: off by default.
    bf16: bool = False
    device: str = "cpu"  # "cuda": train on the GPU (fp32 with TF32 matmuls unless bf16)
    loader_workers: int = 0  # processes that augment and collate batches ahead of the step
    extended_voices: bool = False  # also train on EXTRA_TRAIN_VARIANTS
    eval_every: int = 1000
    log_every: int = 50
    size: ModelSize = field(default_factory=ModelSize)
    # Continue from a saved model (its architecture wins over ``size``) with a fresh LR schedule.
    init_from: Path | None = None


def _lr_factor(progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at ``progress`` = 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return max(0.0, min(warm, 1.0 - progress))


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> tuple[float, float]:
    """(CER, WER) over the whole set, with jiwer."""
    import jiwer

    return jiwer.cer(list(refs), list(hyps)), jiwer.wer(list(refs), list(hyps))


def save_model(model, processor, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def dev_specs_for(settings: TrainSettings) -> list[UtteranceSpec]:
    """The dev sentences of a training run (held-out voices; seeded apart from training's)."""
    return sample_heldout_specs(settings.num_dev, seed=settings.seed + 1_000_003)


def training_specs(settings: TrainSettings) -> list[UtteranceSpec]:
    """The training utterances of a run: none shares its text with a dev sentence."""
    variants = TRAIN_VARIANTS + EXTRA_TRAIN_VARIANTS if settings.extended_voices else TRAIN_VARIANTS
    return sample_training_specs(settings.num_utterances, seed=settings.seed,
                                 exclude={s.text for s in dev_specs_for(settings)}, variants=variants)


class TrainingBatches:
    """Map-style dataset whose item ``step`` is the augmented, collated batch of that step.

    Each step draws from its own seeded generator, so the batches are the same whatever the number
    of loader workers (``torch.utils.data.DataLoader`` forks them; the corpus is shared, not copied).
    """

    def __init__(self, corpus: Corpus, plan: list[list[int]], seed: int):
        self.corpus, self.plan, self.seed = corpus, plan, seed

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, step: int):
        idx = self.plan[step]
        return collate([self.corpus.audio[i].astype(np.float32) / 32768.0 for i in idx],
                       [self.corpus.texts[i] for i in idx], np.random.default_rng([self.seed, step]),
                       train=True)


def train(settings: TrainSettings, log: Callable[[str], None] = print) -> dict:
    """Synthesise (or load cached) data, train, evaluate on held-out voices, save the best model.

    Returns a summary dict (also written to ``<out>/training_summary.json``).
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers import Wav2Vec2ForCTC

    from pipeline.model.loading import positional_conv_in_fp32
    from pipeline.model.reference import Reference

    start = time.monotonic()
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)  # denormal floats are very slow on x86 CPUs
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    dev_specs = dev_specs_for(settings)
    data = synthesize_corpus(training_specs(settings), settings.processes, settings.workdir, log)
    dev = synthesize_corpus(dev_specs, settings.processes, settings.workdir, log)
    synth_s = time.monotonic() - start

    processor = build_processor()
    if settings.init_from:
        model = Wav2Vec2ForCTC.from_pretrained(settings.init_from)
        log(f"continuing from {settings.init_from}")
    else:
        model = Wav2Vec2ForCTC(build_config(settings.size))
    model.to(device)
    if settings.bf16 and device.type == "cpu":
        positional_conv_in_fp32(model)
    n_params = count_parameters(model)
    log(f"model: {n_params:,} parameters; data {data.hours():.2f} h, {len(data)} utterances")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "masked_spec" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "masked_spec" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    plan = plan_training([len(a) for a in data.audio], settings.batch_size, settings.steps,
                         random.Random(settings.seed), settings.curriculum_steps)
    loader = DataLoader(
        TrainingBatches(data, plan, settings.seed), batch_size=None, shuffle=False,
        num_workers=settings.loader_workers, pin_memory=device.type == "cuda",
        prefetch_factor=8 if settings.loader_workers else None,
        multiprocessing_context="fork" if settings.loader_workers else None,
    )
    batches_per_epoch = math.ceil(len(data) / settings.batch_size)
    history: list[dict] = []
    best_cer = math.inf
    train_start = time.monotonic()
    deadline = train_start + settings.minutes * 60 if settings.minutes else None
    step, loss_sum, loss_n = 0, 0.0, 0
    last_loss = math.nan

    def evaluate(step: int) -> float:
        nonlocal best_cer
        model.eval()
        hyps = Reference(model, processor).transcribe(dev.audio)
        model.train()
        cer, wer = error_rates(dev.texts, hyps)
        seen_flags = [dict(HELDOUT_VOICES)[s.voice] for s in dev_specs]
        unseen = [i for i, f in enumerate(seen_flags) if not f]
        ucer, _ = error_rates([dev.texts[i] for i in unseen], [hyps[i] for i in unseen])
        entry = {"step": step, "minutes": round((time.monotonic() - train_start) / 60, 2),
                 "dev_cer": round(cer, 4), "dev_wer": round(wer, 4), "dev_cer_unseen": round(ucer, 4)}
        history.append(entry)
        log(f"eval {entry}")
        if cer <= best_cer:
            best_cer = cer
            save_model(model, processor, settings.out)
            log(f"saved to {settings.out}")
        return cer

    model.train()
    for inputs, labels in loader:
        elapsed = time.monotonic() - train_start
        # The schedule follows steps; with --minutes it follows whichever budget runs out first.
        progress = step / settings.steps
        if deadline is not None:
            progress = max(progress, elapsed / (settings.minutes * 60))
        if progress >= 1.0:
            break
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = settings.lr * _lr_factor(progress, step, settings.warmup_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            loss = model(inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        last_loss = float(loss.detach())
        loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
        if step % settings.log_every == 0:
            log(f"step {step} epoch {step / batches_per_epoch:.2f} loss {loss_sum / loss_n:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {(time.monotonic() - train_start) / 60:.1f} min")
            loss_sum, loss_n = 0.0, 0
        if settings.eval_every and step % settings.eval_every == 0:
            evaluate(step)
    if not history or history[-1]["step"] != step:
        evaluate(step)
    summary = {
        "parameters": n_params,
        "steps": step,
        "epochs": round(step / batches_per_epoch, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final_loss": last_loss,
        "best_dev_cer": best_cer,
        "train_hours": round(data.hours(), 3),
        "train_utterances": len(data),
        "synthesis_seconds": round(synth_s, 1),
        "training_seconds": round(time.monotonic() - train_start, 1),
        "total_seconds": round(time.monotonic() - start, 1),
        "history": history,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    Path(settings.out, "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------
# Held-out set
# ------------------------------------------------------------------------------------------------

# Condition -> (file suffix, writer). Conversions are applied to the first clips of the set.
HELDOUT_CONDITIONS = ("16k", "8k", "44k_stereo", "mp3", "ogg")


def write_heldout_set(folder: Path, num_16k: int = 24, num_per_condition: int = 4,
                      seed: int = 20_240_601) -> Path:
    """Write ``num_16k`` FLAC clips (16 kHz) plus ``num_per_condition`` copies of the first clips
    as 8 kHz mono WAV, 44.1 kHz stereo WAV, MP3 and OGG (Vorbis); and ``manifest.csv``.

    The sentences are sampled with a seed distinct from training's; their texts exclude training
    sentences only statistically (random 3-12 word sequences over 500 words do not repeat).
    """
    import soundfile as sf
    import soxr

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = sample_heldout_specs(num_16k, seed=seed)
    rows = []
    for i, spec in enumerate(specs):
        audio = synthesize_spec(spec)
        clip_id = f"heldout-{i:02d}"
        name = f"{clip_id}.flac"
        sf.write(folder / name, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"id": clip_id, "path": name, "text": spec.text, "condition": "16k",
                     "voice": spec.voice})
        if i >= num_per_condition:
            continue
        variants = {
            "8k": (f"{clip_id}-8k.wav", soxr.resample(audio, SAMPLE_RATE, 8000), 8000, {}),
            "44k_stereo": (f"{clip_id}-44k-stereo.flac",
                           np.stack([a := soxr.resample(audio, SAMPLE_RATE, 44100), 0.8 * a], 1),
                           44100, {}),
            "mp3": (f"{clip_id}.mp3", audio, SAMPLE_RATE, {"format": "MP3"}),
            "ogg": (f"{clip_id}.ogg", audio, SAMPLE_RATE, {"format": "OGG", "subtype": "VORBIS"}),
        }
        for condition, (fname, data, rate, kw) in variants.items():
            sf.write(folder / fname, data, rate, **kw)
            rows.append({"id": f"{clip_id}-{condition.replace('_', '-')}", "path": fname,
                         "text": spec.text, "condition": condition, "voice": spec.voice})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "path", "text", "condition", "voice"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


def read_manifest(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def load_for_reference(path: Path) -> np.ndarray:
    """Decode any clip to float32 mono 16 kHz, unnormalised: the job's decode step."""
    return decode(str(path), target_rate=SAMPLE_RATE, do_normalize=False).audio


def evaluate_heldout(model_dir: Path, manifest: Path) -> dict[str, dict]:
    """CER/WER per condition (and "all") on a held-out manifest, through the reference path."""
    from pipeline.model.reference import Reference

    rows = read_manifest(manifest)
    base = Path(manifest).parent
    audios = [load_for_reference(base / r["path"]) for r in rows]
    hyps = Reference.from_pretrained(model_dir).transcribe(audios)
    results: dict[str, dict] = {}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("condition", "all"), []).append(i)
        if r.get("condition") == "16k":
            seen = dict(HELDOUT_VOICES).get(r.get("voice", ""), None)
            if seen is not None:
                groups.setdefault("16k_seen_voices" if seen else "16k_unseen_voices", []).append(i)
    groups["all"] = list(range(len(rows)))
    for name, idx in groups.items():
        cer, wer = error_rates([rows[i]["text"] for i in idx], [hyps[i] for i in idx])
        results[name] = {"clips": len(idx), "cer": cer, "wer": wer}
    results["_errors"] = {
        rows[i]["id"]: {"ref": rows[i]["text"], "hyp": hyps[i]}
        for i in range(len(rows)) if rows[i]["text"] != hyps[i]
    }
    return results
