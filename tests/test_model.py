"""wav2vec2 inference: exact batch invariance against the seed's one-at-a-time code path."""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_ctc_model

from pipeline.audio import normalize
from pipeline.memory import CPU_REPLICA_ENV
from pipeline.model.invariance import ValidFramesGroupNorm, batch_deviation
from pipeline.model.reference import Reference
from pipeline.model.spec import ModelSpec, load_front_end, receptive_field
from pipeline.model.transcriber import CTCTranscriber


def test_receptive_field_of_base_960h_geometry():
    assert receptive_field((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == 400


def test_front_end_read_from_a_local_folder(group_model, layer_model):
    fe = load_front_end(ModelSpec(str(group_model)))
    assert (fe.sampling_rate, fe.do_normalize) == (16_000, True)


def test_front_end_read_without_torch_as_auto_feature_extractor_reads_it(tmp_path):
    """Settings that name no class are read as the model type's feature extractor, as transformers'
    AutoFeatureExtractor does (which imports torch); a checkpoint's own class goes through it."""
    import json

    from transformers import AutoFeatureExtractor
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    from pipeline.model.spec import WAV2VEC2_FAMILY, _model_config, _reads_as_wav2vec2

    assert {FEATURE_EXTRACTOR_MAPPING_NAMES[kind] for kind in WAV2VEC2_FAMILY} == {"Wav2Vec2FeatureExtractor"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    settings = {"sampling_rate": 8_000, "do_normalize": False, "feature_size": 1, "padding_value": 0.0}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    spec = ModelSpec(str(tmp_path))
    assert _reads_as_wav2vec2(settings, _model_config(spec))
    fe, auto = load_front_end(spec), AutoFeatureExtractor.from_pretrained(tmp_path)
    assert (fe.sampling_rate, fe.do_normalize) == (auto.sampling_rate, auto.do_normalize) == (8_000, False)
    own_class = {**settings, "auto_map": {"AutoFeatureExtractor": "x.MyExtractor"}}
    assert not _reads_as_wav2vec2(own_class, _model_config(spec))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    assert not _reads_as_wav2vec2(settings, _model_config(spec))


@pytest.mark.parametrize("groups", [16, 4, 1])
def test_valid_frames_group_norm_equals_group_norm_on_each_row_alone(groups):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    masked = ValidFramesGroupNorm(norm)
    frames = [37, 5, 2, 20]
    x = torch.randn(len(frames), 16, max(frames)) * 3 + 1
    with torch.no_grad():
        with masked.valid_frames(torch.tensor(frames)):
            y = masked(x)
        for row, n in enumerate(frames):
            torch.testing.assert_close(y[row, :, :n], norm(x[row : row + 1, :, :n])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked(x), norm(x))


def _utterances(seed: int, count: int) -> list[np.ndarray]:
    """Random lengths from the 400-sample minimum to 4 s, always with a very short and a long one."""
    rng = np.random.default_rng(seed)
    lengths = [400, int(rng.integers(401, 900)), 64_000]
    lengths += rng.integers(400, 64_000, size=count - 3).tolist()
    rng.shuffle(lengths)
    return [normalize(rng.standard_normal(n).astype(np.float32)) for n in lengths]


@pytest.mark.parametrize("conv_encoder", ["auto", "batched"])  # fp32 CPU: auto is stock; batched: the GPUs'
@pytest.mark.parametrize("kind", ["group", "layer"])
def test_batched_logits_equal_one_at_a_time_reference(kind, conv_encoder, group_model, layer_model):
    model_dir = group_model if kind == "group" else layer_model
    t = CTCTranscriber(ModelSpec(str(model_dir)), device="cpu", threads=1, precision="fp32", conv_encoder=conv_encoder)
    assert t.batch_invariant and t.use_attention_mask and t.min_samples == 400
    assert (t.encoder is None) == (conv_encoder == "auto")
    ref = Reference.from_pretrained(model_dir)
    worst, texts = 0.0, 0
    for seed, count in [(0, 8), (1, 3), (2, 12), (3, 5)]:
        batch = _utterances(seed, count)
        logits = t.logits(batch)
        for row, (wave, frames) in enumerate(zip(batch, t.frames([len(w) for w in batch]), strict=True)):
            alone = ref.logits(wave)
            assert alone.shape[0] == frames
            worst = max(worst, float((logits[row, :frames] - alone).abs().max()))
        expected = [ref(w) for w in batch]
        assert t.transcribe(batch) == expected
        assert t.transcribe(batch[::-1]) == expected[::-1]
        texts += sum(map(bool, expected))
    print(f"\n{kind}-norm model, {conv_encoder} encoder: max |Δlogit| batched vs one at a time = {worst:.2e}")
    assert worst <= 1e-4
    assert texts > 10, "the random model should emit characters, or the comparison proves little"


def _ctc_like_ids(rng: np.random.Generator, rows: int, vocab: int, blank: int) -> tuple[np.ndarray, list[int]]:
    """Argmax-like rows: runs of blanks and of repeated ids (word delimiters and ids past the
    tokenizer's vocabulary among them), a one-frame row, rows shorter than the batch."""
    frames = [1, 2] + rng.integers(3, 300, size=rows - 2).tolist()
    ids = np.full((rows, max(frames) + 7), blank, dtype=np.int64)
    for row, n in enumerate(frames):
        seq: list[int] = []
        while len(seq) < n:
            seq += [blank] * int(rng.integers(0, 3)) + [int(rng.integers(0, vocab))] * int(rng.integers(1, 4))
        ids[row, :n] = seq[:n]
        ids[row, n:] = rng.integers(0, vocab, size=ids.shape[1] - n)  # padding frames: never read
    return ids, frames


def test_greedy_decoder_gives_the_tokenizers_batch_decode_texts(group_model, tmp_path):
    """The batch-wide merging of GreedyCTCDecoder against the tokenizer's own, on base-960h's
    vocabulary (model ids past it decode as <unk>, as the tokenizer spells them) and on a
    lower-casing tokenizer with another word delimiter, an added token and clean-up; any other
    tokenizer gets the plain call."""
    import json

    from transformers import AutoTokenizer, BertTokenizer, Wav2Vec2CTCTokenizer

    from pipeline.model.ctc import GreedyCTCDecoder

    base = AutoTokenizer.from_pretrained(group_model)
    vocab = {"<pad>": 0, "<unk>": 1, "_": 2, "A": 3, "B": 4, "c": 5, "D": 6, "'": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    other = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="_", do_lower_case=True,
                                 clean_up_tokenization_spaces=True)
    other.add_tokens(["<laugh>"])
    rng = np.random.default_rng(0)
    merged = 0
    for tokenizer, vocab_size in [(base, len(base) + 3), (other, len(other))]:
        decoder = GreedyCTCDecoder(tokenizer, vocab_size)
        assert decoder.canonical is not None
        for _ in range(3):
            ids, frames = _ctc_like_ids(rng, 40, vocab_size, tokenizer.pad_token_id)
            want = tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(frames)])
            assert decoder(ids, frames) == want
            merged += sum(len(t) for t in want)
    assert merged > 1000
    ids[0, 0] = len(decoder.canonical) + 5  # past the vocabulary the config declares: the plain call
    assert decoder(ids, frames) == tokenizer.batch_decode([ids[i, :n].tolist() for i, n in enumerate(frames)])
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nab\ncd\n")
    bert = BertTokenizer(str(tmp_path / "vocab.txt"))
    decoder = GreedyCTCDecoder(bert, 4)
    ids, frames = _ctc_like_ids(rng, 5, 4, 0)
    assert decoder.canonical is None
    assert decoder(ids, frames) == bert.batch_decode([ids[i, :n].tolist() for i, n in enumerate(frames)])


def test_plain_zero_padding_is_what_the_exact_path_fixes(group_model):
    """Without the valid-frames group norm and mask, padding moves a group-norm model's logits: the
    probe that decides the exact path tells the two apart."""
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(group_model).eval()

    def plain(waves):  # zero-padded, no mask: the standard path for a group-norm model
        batch = torch.zeros(len(waves), max(map(len, waves)))
        for row, wave in zip(batch, waves, strict=True):
            row[: len(wave)] = torch.from_numpy(wave)
        with torch.inference_mode():
            return model(batch).logits

    frames = lambda lengths: model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()  # noqa: E731
    assert batch_deviation(plain, frames, 400) > 1e-2
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="fp32")
    assert t.batch_invariant and t.probe() < 1e-4


def test_models_the_exact_path_cannot_fix_fall_back_and_say_why_once(tmp_path, caplog, group_model):
    from transformers import Data2VecAudioConfig, Data2VecAudioForCTC

    torch.manual_seed(0)
    config = Data2VecAudioConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, conv_dim=(16,) * 7, conv_pos_kernel_size=5)
    Data2VecAudioForCTC(config).save_pretrained(tmp_path)
    for name in ("processor_config.json", "tokenizer_config.json", "vocab.json"):
        shutil.copy(group_model / name, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.transcriber"):
        t = CTCTranscriber(ModelSpec(str(tmp_path)), device="cpu", precision="fp32")
    assert not t.batch_invariant and t.valid_lengths.norm is None and not t.use_attention_mask
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data2vec-audio" in warnings[0] and "not batch-invariant" in warnings[0]
    ref = Reference.from_pretrained(tmp_path)
    wave = _utterances(5, 3)[0]
    assert t.transcribe([wave]) == [ref(wave)]  # one row alone is still the reference


def test_a_second_group_norm_model_is_exact_too(tmp_path):
    """A different seed, so invariance is not a property of one set of weights."""
    model_dir = make_ctc_model(tmp_path / "m", norm="group", seed=7)
    t = CTCTranscriber(ModelSpec(str(model_dir)), device="cpu", precision="fp32")
    ref = Reference.from_pretrained(model_dir)
    batch = _utterances(9, 6)
    assert t.transcribe(batch) == [ref(w) for w in batch]


@pytest.fixture
def tf32_settings():
    """torch's fp32 precision settings, restored after the test."""
    b = torch.backends
    parts = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn]
    saved = [part.fp32_precision for part in parts]
    yield
    for part, value in zip(parts, saved, strict=True):
        part.fp32_precision = value


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_forward_runs_without_tf32_and_restores_the_settings(group_model, precision, tf32_settings):
    """cuDNN's convs default to TF32, which changed a GPU fp32 transcript on an H200, and
    ``torch.set_float32_matmul_precision("high")`` gives matmuls TF32: an fp32 forward turns both
    off for its own duration only; reduced precision leaves them alone. Here the process has also
    set convs and RNNs apart, after which reading torch's older ``allow_tf32`` flags raises."""
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision=precision)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    seen = []
    t.model.register_forward_hook(lambda *_: seen.append((conv.fp32_precision, matmul.fp32_precision)))
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # noqa: B018 - the read is what raises
    t.transcribe(_utterances(4, 3))
    assert seen == [("ieee", "ieee") if precision == "fp32" else ("tf32", "tf32")]
    assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")


@pytest.mark.gpu
@pytest.mark.parametrize("conv_encoder", ["auto", "stock"])  # auto: the batched matmul encoder
def test_gpu_replica_fp32_is_batch_invariant_and_agrees_with_the_cpu_reference(group_model, conv_encoder):
    """Run on a GPU machine: ``python -m pytest -m gpu``. Random weights: every frame is a near-tie,
    so this checks exactness in fp32 only: with cuDNN's default TF32 convs it failed on an H200
    (torch 2.11 + CUDA 13; max |Δlogit| 5e-4, 1 of 8 transcripts); with this code's fp32 forward
    the same rows gave 4e-6, all equal (measured outside pytest)."""
    if not torch.cuda.is_available():
        pytest.fail("marked gpu, but torch sees no CUDA device")
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cuda", precision="fp32", conv_encoder=conv_encoder)
    assert t.device.type == "cuda" and t.batch_invariant
    assert (t.encoder is None) == (conv_encoder == "stock")
    ref = Reference.from_pretrained(group_model)
    batch = _utterances(11, 8)
    assert t.transcribe(batch) == [ref(w) for w in batch]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_batches_started_ahead_give_what_each_alone_gives(group_model, precision):
    """``transcribe_batches`` queues each batch before the one ahead is decoded (page-locked
    buffers, an event per batch): the texts are those of each batch transcribed on its own."""
    if not torch.cuda.is_available():
        pytest.fail("marked gpu, but torch sees no CUDA device")
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cuda", precision=precision)
    batches = [_utterances(seed, count) for seed, count in [(20, 6), (21, 3), (22, 9), (23, 4), (24, 5)]]
    want = [t.transcribe(batch) for batch in batches]
    before, started = t.device_s, time.perf_counter()
    assert [t.decode([ids for ids, _ in rows]) for rows in t.transcribe_batches(batches)] == want
    assert sum(map(bool, sum(want, []))) > 5
    # The GPU's time on the batches, from CUDA events: some, and no more than the wall time around them.
    assert 0 < t.device_s - before <= time.perf_counter() - started


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_reduced_precision_matches_cpu_fp32_on_the_demo_model(precision):
    """bf16/fp16 on a GPU against fp32 on the CPU, with the trained demo model (random weights flip
    near-tie frames in any reduced precision: 3 of 8 transcripts changed in bf16 on an H200)."""
    if not torch.cuda.is_available():
        pytest.fail("marked gpu, but torch sees no CUDA device")
    from pipeline.bundled import input_path, model_path
    from tools import demo_model

    manifest = Path(input_path("@heldout"))
    rows = [r for r in demo_model.read_manifest(manifest) if r["condition"] == "16k"]
    waves = [normalize(demo_model.load_for_reference(manifest.parent / r["path"])) for r in rows]
    gpu = CTCTranscriber(ModelSpec(model_path("@demo")), device="cuda", precision=precision)
    cpu = CTCTranscriber(ModelSpec(model_path("@demo")), device="cpu", precision="fp32")
    assert gpu.batch_invariant
    got, expected = gpu.transcribe(waves), cpu.transcribe(waves)
    cer, _ = demo_model.error_rates(expected, got)
    changed = sum(a != b for a, b in zip(got, expected, strict=True))
    print(f"{precision} on {torch.cuda.get_device_name()} vs fp32 on the CPU: {changed} of {len(rows)} "
          f"transcripts change, CER between them {cer:.2%}")
    assert cer <= 0.01, list(zip(expected, got, strict=True))


def test_pickle_weights_are_refused_unless_allowed(group_model, tmp_path):
    """safetensors only by default: a folder with pytorch_model.bin fails fast, naming the fix."""
    from transformers import AutoModelForCTC

    from pipeline.config import load_config
    from pipeline.engine import run_job
    from pipeline.errors import JobError

    pickled = tmp_path / "pickled"
    shutil.copytree(group_model, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCTC.from_pretrained(group_model).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"found pytorch_model.bin.*model.allow_pickle_weights=true"):
        ModelSpec(str(pickled)).check_local_weights()
    cfg = load_config(**{"input.path": "@sample", "output.path": str(tmp_path / "out"), "model.name": str(pickled)})
    with pytest.raises(JobError, match="no safetensors weights"):
        run_job(cfg)
    allowed = ModelSpec(str(pickled), allow_pickle_weights=True)
    allowed.check_local_weights()
    t = CTCTranscriber(allowed, device="cpu", precision="fp32")
    ref = Reference.from_pretrained(group_model)
    batch = _utterances(5, 3)
    assert t.transcribe(batch) == [ref(w) for w in batch]


def test_a_checkpoint_whose_processor_decodes_with_an_lm_loads_and_decodes_greedily(group_model, tmp_path):
    """Such a checkpoint names ``Wav2Vec2ProcessorWithLM``, which ``AutoProcessor`` cannot load
    without pyctcdecode and kenlm and whose ``batch_decode`` takes logits; the replica loads its
    feature extractor and tokenizer alone, and decodes greedily as for any other."""
    import json

    folder = shutil.copytree(group_model, tmp_path / "with-lm")
    config = folder / "processor_config.json"
    settings = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**settings, "processor_class": "Wav2Vec2ProcessorWithLM"}))
    batch = _utterances(6, 3)
    got = CTCTranscriber(ModelSpec(str(folder)), device="cpu", precision="fp32").transcribe(batch)
    assert got == CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="fp32").transcribe(batch)
    assert got == [Reference.from_pretrained(group_model)(w) for w in batch]


@pytest.mark.parametrize("model", ["demo", "base-shape"])
def test_positional_conv_runs_in_bf16_only_where_this_cpu_computes_it_right(model):
    """A probe decides per model; after it, the positional conv under bf16 autocast is within bf16's
    error of fp32. (On torch 2.13's CPU kernels the demo model's shape, 16 groups of 12 channels with
    kernel 64, is wrong in bf16 and goes to fp32; wav2vec2-base's, 16 groups of 48 with kernel 128,
    stays in bf16.)"""
    from transformers import AutoModelForCTC, Wav2Vec2Config, Wav2Vec2ForCTC

    from pipeline.bundled import model_path
    from pipeline.model.loading import POSITIONAL_CONV_TOLERANCE, guard_positional_conv

    torch.manual_seed(0)
    if model == "demo":
        ctc = AutoModelForCTC.from_pretrained(model_path("@demo")).eval()
    else:
        ctc = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, num_hidden_layers=1, intermediate_size=64)).eval()
    conv = ctc.base_model.encoder.pos_conv_embed
    hidden = torch.randn(3, 257, ctc.config.hidden_size)

    def deviation():
        with torch.inference_mode():
            want = conv(hidden)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = conv(hidden).float()
        return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))

    before = deviation()
    in_fp32 = guard_positional_conv(ctc, torch.bfloat16)
    after = deviation()
    print(f"\n{model}: bf16 deviation {before:.3g}, guarded: {in_fp32}, after {after:.3g}")
    assert in_fp32 == (before > POSITIONAL_CONV_TOLERANCE)
    assert after <= 0.02 and (after == 0.0) == in_fp32


def test_a_positional_conv_the_probe_cannot_call_stays_in_fp32():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from pipeline.model.loading import guard_positional_conv

    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, num_hidden_layers=1, intermediate_size=64,
                                        hidden_size=64, num_attention_heads=2)).eval()

    def needs_a_mask(hidden_states, mask):
        return hidden_states

    ctc.base_model.encoder.pos_conv_embed.forward = needs_a_mask
    assert guard_positional_conv(ctc, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_weights_cast_once_give_autocasts_logits_bit_for_bit(dtype):
    """Autocast casts each linear weight on every forward; storing them cast changes no logit."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from pipeline.model.loading import cast_linear_weights

    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, num_hidden_layers=2, intermediate_size=128,
                                        hidden_size=64, num_attention_heads=2)).eval()
    inputs = torch.randn(2, 8_000)

    def logits():
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
            return ctc(inputs).logits.float()

    before = logits()
    assert cast_linear_weights(ctc, dtype) == 2 * 4 + 2 * 2 + 2  # attention, feed-forward, projection, head
    assert ctc.lm_head.weight.dtype == dtype
    assert ctc.base_model.feature_projection.layer_norm.weight.dtype == torch.float32
    assert torch.equal(logits(), before)


def test_a_reduced_precision_replica_keeps_its_linear_weights_cast(group_model):
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="bf16")
    linear = [m for m in t.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert t.batch_invariant  # its probe ran in fp32, before the cast


def test_release_free_heap_gives_a_replica_heaps_free_pages_back():
    """Under the replicas' glibc settings a freed block stays resident until the heap is trimmed."""
    script = """
import numpy as np
from pipeline.memory import release_free_heap
def anon():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) >> 10
big = np.ones(300 << 20, np.uint8)
pinned = np.ones(1 << 10, np.uint8)  # a live block above it: only a trim can give its pages back
before = anon()
del big
kept = anon()
assert release_free_heap()
print(before, kept, anon())
"""
    env = {**os.environ, **CPU_REPLICA_ENV}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    before, kept, trimmed = map(int, out.stdout.split())
    assert kept > before - 20, "the settings keep a freed block resident"
    assert trimmed < kept - 250, f"{kept} MB resident after the trim as before it"


@pytest.mark.parametrize("avx512_bf16, amx, precision", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "fp32")])
def test_auto_precision_is_bf16_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, precision):
    from pipeline.model.loading import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", torch.device("cpu")) == precision
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # a set precision is kept
