"""The matmul conv feature encoders (chunked for CPUs, batched for GPUs) against the stock transformers encoder."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCTC,
    Data2VecAudioConfig,
    HubertConfig,
    SEWConfig,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
    WavLMConfig,
)
from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioPositionalConvEmbedding
from transformers.models.hubert.modeling_hubert import HubertPositionalConvEmbedding
from transformers.models.sew.modeling_sew import SEWPositionalConvEmbedding
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2NoLayerNormConvLayer, Wav2Vec2PositionalConvEmbedding
from transformers.models.wavlm.modeling_wavlm import WavLMPositionalConvEmbedding

from pipeline.audio import normalize
from pipeline.bundled import input_path, model_path
from pipeline.model import conv_encoder
from pipeline.model.conv_encoder import (
    BatchedMatmulFeatureEncoder,
    MatmulFeatureEncoder,
    MatmulPositionalConv,
    UnsupportedEncoder,
    conv_output_frames,
)
from pipeline.model.invariance import checked_swap, install_matmul_encoder
from pipeline.model.spec import ModelSpec
from pipeline.model.transcriber import CTCTranscriber
from tools import demo_model

LENGTHS = [400, 401, 3_217, 16_000, 40_000]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded rows of these lengths, and the lengths."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(len(LENGTHS), max(LENGTHS))
    for row, n in enumerate(LENGTHS):
        x[row, :n] = torch.from_numpy(normalize(rng.standard_normal(n).astype(np.float32)))
    return x, torch.tensor(LENGTHS)


KINDS = ["group", "layer", "conv-bias"]
BOTH = [MatmulFeatureEncoder, BatchedMatmulFeatureEncoder]


def _encoders(kind: str, group_model: Path, layer_model: Path, encoder=MatmulFeatureEncoder):
    if kind == "conv-bias":  # large-lv60's kind: layer norm in every conv layer, conv bias
        torch.manual_seed(3)
        config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                conv_dim=(16,) * 7, feat_extract_norm="layer", conv_bias=True)
        model = Wav2Vec2ForCTC(config).eval()
    else:
        model = AutoModelForCTC.from_pretrained(group_model if kind == "group" else layer_model).eval()
    stock = model.base_model.feature_extractor
    return stock, encoder(stock)


@pytest.mark.parametrize("encoder", BOTH)
@pytest.mark.parametrize("kind", KINDS)
def test_equals_the_stock_encoder_in_fp32(kind, encoder, group_model, layer_model):
    stock, fast = _encoders(kind, group_model, layer_model, encoder)
    x, _ = _batch()
    with torch.inference_mode():
        want, got = stock(x), fast(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_of_a_few_frames_give_the_same_result(kind, group_model, layer_model):
    """Frames are computed chunk_frames at a time: cut every few frames, in every layer, the
    result is still the stock encoder's (with and without lengths)."""
    stock, fast = _encoders(kind, group_model, layer_model)
    small = MatmulFeatureEncoder(stock, chunk_frames=7)
    x, lengths = _batch(3)
    with torch.inference_mode():
        whole = fast(x)
        with fast.valid_lengths(lengths):
            whole_valid = fast(x)
        with small.valid_lengths(lengths):
            pieces_valid = small(x)
        pieces, want = small(x), stock(x)
    torch.testing.assert_close(pieces, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pieces_valid, whole_valid, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encoder", BOTH)
@pytest.mark.parametrize("kind", KINDS)
def test_under_bf16_autocast_it_is_as_close_to_fp32_as_the_stock_encoder(kind, encoder, group_model, layer_model):
    """Same output dtype as the stock encoder under autocast, and no more bf16 error than it has."""
    stock, fast = _encoders(kind, group_model, layer_model, encoder)
    x, _ = _batch(2)
    with torch.inference_mode():
        exact = stock(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = stock(x), fast(x.t().contiguous().t())  # a non-contiguous input too
    assert got.dtype == want.dtype and got.shape == want.shape
    stock_error = float((want.float() - exact).abs().max())
    assert float((got.float() - exact).abs().max()) <= 2 * stock_error + 1e-3


@pytest.mark.parametrize("encoder", BOTH)
@pytest.mark.parametrize("kind", KINDS)
def test_with_lengths_each_row_is_its_result_alone(kind, encoder, group_model, layer_model):
    """Valid frames equal the stock encoder on the row alone; with the chunked encoder a group
    norm's padded frames are zeros (the batched one leaves them to the model's mask)."""
    stock, fast = _encoders(kind, group_model, layer_model, encoder)
    x, lengths = _batch(1)
    with torch.inference_mode(), fast.valid_lengths(lengths):
        got = fast(x)
        for row, n in enumerate(LENGTHS):
            alone = stock(x[row : row + 1, :n])[0]
            frames = alone.shape[1]
            torch.testing.assert_close(got[row, :, :frames], alone, atol=1e-5, rtol=1e-4)
    if kind == "group" and encoder is MatmulFeatureEncoder:  # the raw-audio layer alone: padded frames are zeros
        first_only = torch.nn.Module()
        first_only.conv_layers = torch.nn.ModuleList(stock.conv_layers[:1])
        layer = MatmulFeatureEncoder(first_only)
        with torch.inference_mode(), layer.valid_lengths(lengths):
            normed = layer(x)
        frames = conv_output_frames(lengths, layer.layers[0].kernel, layer.layers[0].stride)
        for row, n in enumerate(frames.tolist()):
            assert normed[row, :, :n].abs().sum(0).all() and not normed[row, :, n:].any()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_rows_of_any_width_and_company_are_their_results_alone(kind, group_model, layer_model):
    """The batched encoder pads rows to a multiple of the stack's stride and lays them end to end:
    widths that are no such multiple, and any company a row keeps, still give each row's valid
    frames as the stock encoder gives them for the row alone (and the stock batch's frames without
    lengths)."""
    stock, fast = _encoders(kind, group_model, layer_model, BatchedMatmulFeatureEncoder)
    rng = np.random.default_rng(5)
    waves = [torch.from_numpy(normalize(rng.standard_normal(n).astype(np.float32)))
             for n in (400, 401, 719, 1_217, 16_001, 33_333)]
    with torch.inference_mode():
        alone = [stock(w[None])[0] for w in waves]
        for rows in ([5, 0, 3], [1], [2, 4, 1, 0, 5, 3], [3, 2]):
            x = torch.zeros(len(rows), max(len(waves[i]) for i in rows))
            for r, i in enumerate(rows):
                x[r, : len(waves[i])] = waves[i]
            with fast.valid_lengths(torch.tensor([len(waves[i]) for i in rows])):
                got = fast(x)
            assert got.shape == stock(x).shape
            for r, i in enumerate(rows):
                torch.testing.assert_close(got[r, :, : alone[i].shape[1]], alone[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(fast(x), stock(x), atol=1e-5, rtol=1e-4)


def test_no_layer_computes_more_than_a_chunk_at_once(group_model, monkeypatch):
    """Rows go through the stack chunk_frames output frames at a time: no layer ever sees more
    input than those frames need, however long the row (here 40 000 samples, 124 frames)."""
    stock, _ = _encoders("group", group_model, None)
    fast = MatmulFeatureEncoder(stock, chunk_frames=16)
    x, _ = _batch()
    seen = []
    conv_frames = conv_encoder._Layer.conv_frames

    def recording(self, h, steps=None):
        seen.append(h.shape[0])
        return conv_frames(self, h, steps)

    monkeypatch.setattr(conv_encoder._Layer, "conv_frames", recording)
    with torch.inference_mode():
        out = fast(x)
    assert out.shape[2] == 124 and seen
    assert max(seen) <= (16 - 1) * 64 + 79  # the second layer's input for 16 frames: the first one's output


def test_bf16_replica_uses_it_on_the_demo_model():
    """On the CPU in bf16 the replica takes the matmul encoder; its transcripts stay close to fp32's
    and to its own one-at-a-time ones. (bf16 is not bit-exact across batch shapes with either
    encoder: both give max |Δlogit| 0.25 between a batch and its rows alone on these clips.)"""
    manifest = Path(input_path("@heldout"))
    rows = [r for r in demo_model.read_manifest(manifest) if r["condition"] == "16k"]
    waves = [normalize(demo_model.load_for_reference(manifest.parent / r["path"])) for r in rows]
    bf16 = CTCTranscriber(ModelSpec(model_path("@demo")), device="cpu", precision="bf16")
    assert isinstance(bf16.model.base_model.feature_extractor, MatmulFeatureEncoder) and bf16.batch_invariant
    fp32 = CTCTranscriber(ModelSpec(model_path("@demo")), device="cpu", precision="fp32")
    assert not isinstance(fp32.model.base_model.feature_extractor, MatmulFeatureEncoder)
    batched, expected = bf16.transcribe(waves), fp32.transcribe(waves)
    alone = [bf16.transcribe([w])[0] for w in waves]
    for name, other in [("fp32", expected), ("bf16 one at a time", alone)]:
        cer, _ = demo_model.error_rates(other, batched)
        changed = sum(a != b for a, b in zip(batched, other, strict=True))
        print(f"\nbf16 batched (matmul encoder) vs {name}: {changed} of {len(waves)} differ, CER {cer:.2%}")
        assert changed <= 2 and cer <= 0.01


class _ScaledConvLayer(Wav2Vec2NoLayerNormConvLayer):
    """A conv layer whose forward does more than conv → activation: the encoder cannot know."""

    def forward(self, hidden_states):
        return 2 * super().forward(hidden_states)


def test_unknown_layers_keep_the_stock_encoder_and_say_why(group_model, caplog):
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="fp32")
    stock = t.model.base_model.feature_extractor
    stock.conv_layers[0].layer_norm = stock.conv_layers[0].layer_norm.norm  # fp32's ValidFramesGroupNorm off
    stock.conv_layers[2].__class__ = _ScaledConvLayer
    with caplog.at_level(logging.WARNING, logger="pipeline.model"):
        assert install_matmul_encoder(t.model, "scaled", "chunked") is None
    assert t.model.base_model.feature_extractor is stock
    assert "keeping the stock conv feature encoder (the matmul one differs by" in caplog.text

    stock.conv_layers[2].__class__ = Wav2Vec2NoLayerNormConvLayer
    stock.conv_layers[0].layer_norm = torch.nn.GroupNorm(4, 16)
    with pytest.raises(UnsupportedEncoder, match="GroupNorm this encoder does not compute"):
        MatmulFeatureEncoder(stock)
    stock.conv_layers[0].layer_norm = torch.nn.GroupNorm(16, 16)
    stock.conv_layers[1].layer_norm = torch.nn.GroupNorm(16, 16)
    with pytest.raises(UnsupportedEncoder, match="a group norm after the raw-audio layer"):
        MatmulFeatureEncoder(stock)


# (module, config): wav2vec2-base's kernel and groups at a smaller width, an odd kernel, HuBERT's and
# WavLM's copies of the module.
POSITIONAL = [
    (Wav2Vec2PositionalConvEmbedding, Wav2Vec2Config(hidden_size=64, num_conv_pos_embeddings=128,
                                                     num_conv_pos_embedding_groups=16)),
    (Wav2Vec2PositionalConvEmbedding, Wav2Vec2Config(hidden_size=24, num_conv_pos_embeddings=7,
                                                     num_conv_pos_embedding_groups=3)),
    (HubertPositionalConvEmbedding, HubertConfig(hidden_size=32, num_conv_pos_embeddings=16,
                                                 num_conv_pos_embedding_groups=4)),
    (WavLMPositionalConvEmbedding, WavLMConfig(hidden_size=32, num_conv_pos_embeddings=32,
                                               num_conv_pos_embedding_groups=2)),
]


def _frames(channels: int, valid=(300, 1, 217, 64), seed: int = 0) -> torch.Tensor:
    """Rows of these valid frames, zero-padded as the encoder zeroes them before the positional conv."""
    torch.manual_seed(seed)
    x = torch.randn(len(valid), max(valid), channels)
    for row, n in enumerate(valid):
        x[row, n:] = 0
    return x


@pytest.mark.parametrize("block", [conv_encoder.POSITIONAL_BLOCK_FRAMES, 5])
@pytest.mark.parametrize("module, config", POSITIONAL, ids=lambda p: getattr(p, "__name__", ""))
def test_matmul_positional_conv_equals_the_stock_one(module, config, block):
    """fp32: the same outputs as the stock module, in blocks of any size (5: windows of one block
    straddle two rows); bf16 autocast: within bf16's rounding of fp32's, in bf16 as the stock
    module's. (The whole replica with it against the stock model: tests/test_model.py's batched
    encoder cases.)"""
    torch.manual_seed(1)
    stock = module(config).eval()
    fast = MatmulPositionalConv(stock, block_frames=block)
    x = _frames(config.hidden_size)
    with torch.inference_mode():
        want, got = stock(x), fast(x)
        assert got.shape == want.shape == x.shape
        assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
        one = fast(x[1:2, :1])  # a row of one frame alone
        assert float((one - want[1:2, :1]).abs().max()) <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(x)
            stock_low = stock(x)
    assert low.dtype == stock_low.dtype == torch.bfloat16
    assert float((low.float() - want).abs().max()) <= 0.01 * max(1.0, float(want.abs().max()))  # measured ~0.005


def test_positional_convs_it_does_not_know_raise_or_fail_the_probe(group_model, caplog):
    with pytest.raises(UnsupportedEncoder, match=r"not a lone grouped conv \(\['batch_norm'\]\)"):
        MatmulPositionalConv(HubertPositionalConvEmbedding(HubertConfig(hidden_size=32, conv_pos_batch_norm=True)))
    data2vec = Data2VecAudioConfig(hidden_size=32, num_conv_pos_embeddings=5)
    with pytest.raises(UnsupportedEncoder, match=r"not a lone grouped conv \(\['layers'\]\)"):
        MatmulPositionalConv(Data2VecAudioPositionalConvEmbedding(data2vec))  # a stack of convs
    with pytest.raises(UnsupportedEncoder, match="strided"):
        MatmulPositionalConv(SEWPositionalConvEmbedding(SEWConfig(hidden_size=32, squeeze_factor=2)))
    # Unsqueezed, SEW's passes the structure check, but it takes (B, C, T): the probe keeps it.
    sew = SEWPositionalConvEmbedding(SEWConfig(hidden_size=32, squeeze_factor=1))
    with caplog.at_level(logging.WARNING, logger="pipeline.model"):
        assert checked_swap("sew", "positional conv", sew, MatmulPositionalConv, _frames(32)) is None
    assert "sew: keeping the stock positional conv (it does not take the probe" in caplog.text


def test_the_gpu_layout_takes_the_matmul_positional_conv(group_model):
    """conv_encoder batched (the GPUs' auto) swaps it in after its probe; the CPU's auto keeps the stock one."""
    batched = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="fp32", conv_encoder="batched")
    assert batched.matmul_positional_conv
    assert isinstance(batched.model.base_model.encoder.pos_conv_embed, MatmulPositionalConv)
    auto = CTCTranscriber(ModelSpec(str(group_model)), device="cpu", precision="bf16")
    assert not auto.matmul_positional_conv
    assert isinstance(auto.model.base_model.encoder.pos_conv_embed, Wav2Vec2PositionalConvEmbedding)
