import numpy as np
import pytest

from helpers import Reference
from pipeline.audio import normalize
from pipeline.model import CTCTranscriber, ModelSpec, load_front_end, receptive_field


def test_receptive_field_of_base_960h_geometry():
    assert receptive_field((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == 400


def test_front_end_read_from_a_local_folder(group_model, layer_model):
    fe = load_front_end(ModelSpec(str(group_model)))
    assert (fe.sampling_rate, fe.do_normalize) == (16_000, True)


@pytest.fixture
def utterances():
    rng = np.random.default_rng(3)
    lengths = [400, 401, 1_000, 4_000, 9_999, 16_000, 23_456, 40_000]
    return [normalize(rng.standard_normal(n).astype(np.float32)) for n in lengths]


def test_layer_norm_batch_equals_reference_one_at_a_time(layer_model, utterances):
    t = CTCTranscriber(ModelSpec(str(layer_model)), device="cpu", threads=1)
    assert t.use_attention_mask and t.min_samples == 400
    ref = Reference(layer_model)
    expected = [ref(u) for u in utterances]
    assert t.transcribe(utterances) == expected
    assert t.transcribe(utterances[::-1]) == expected[::-1]
    assert any(expected), "the random model should emit some characters"


def test_group_norm_model_gets_no_attention_mask(group_model, utterances):
    t = CTCTranscriber(ModelSpec(str(group_model)), device="cpu")
    assert not t.use_attention_mask
    # One utterance alone has no padding, so it matches the reference exactly.
    ref = Reference(group_model)
    assert [t.transcribe([u])[0] for u in utterances[:3]] == [ref(u) for u in utterances[:3]]
