"""Long recordings cut into windows exactly as the transformers ASR pipeline cuts them."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.windows import Window, Windowing

RATE, HOP = 16_000, 320


class _Extractor:
    """What chunk_iter needs of a feature extractor: its rate, and a call (here: the chunk as is)."""

    sampling_rate = RATE

    def __call__(self, chunk, **_):
        return {"input_values": chunk}


@pytest.mark.parametrize("window_s, strides", [(40.0, (40 / 6, 40 / 6)), (10.0, (2.0, 3.0)), (6.0, (0.0, 1.0))])
@pytest.mark.parametrize("samples", [399, 640_000, 640_001, 700_000, 1_000_003, 16_000 * 95 + 17])
def test_windows_and_kept_frames_are_the_pipelines(window_s, strides, samples):
    """The windows and the frames kept of each are those of ``chunk_iter`` and ``rescale_stride``
    (transformers' own functions, run here), for recordings shorter than, equal to and longer than
    a window; every recording frame is kept once, in order."""
    np = pytest.importorskip("numpy")
    asr = pytest.importorskip("transformers.pipelines.automatic_speech_recognition")
    w = Windowing.of(window_s, strides, RATE, HOP)
    theirs = []
    if samples > w.length:
        recording = np.arange(samples, dtype=np.float32)
        for item in asr.chunk_iter(recording, _Extractor(), w.length, w.left, w.right):
            total, left, right = asr.rescale_stride([item["stride"]], 1 / HOP)[0]
            start = int(item["input_values"][0])
            theirs.append(Window(start, start + item["stride"][0], left, total - right))
    else:
        theirs = [Window(0, samples, 0, samples)]  # one whole input: nothing cut, nothing dropped
    ours = w.windows(samples)
    assert ours == theirs
    frames = [max(0, (x.stop - x.start - 400) // HOP + 1) for x in ours]  # what the model gives each window
    kept = [x.start // HOP + f for x, n in zip(ours, frames, strict=True) for f in range(x.first, min(x.last, n))]
    assert kept == list(range(len(kept))) and len(kept) >= (samples - 400) // HOP


def test_seconds_round_to_whole_frames_and_bad_strides_are_config_errors():
    assert Windowing.of(10.01, (1.0, 1.0), RATE, HOP) == Windowing(160_000, 16_000, 16_000, HOP, RATE)
    assert load_config().inference.strides == (4.0, 4.0)
    assert load_config(overrides=["inference.window_stride_s=[1, 2.5]"]).inference.strides == (1.0, 2.5)
    with pytest.raises(ConfigError, match=r"inference.window_stride_s = 5.0: strides of 5 s and 5 s leave no centre "
                                          r"in inference.window_s = 10; make them non-negative and together shorter"):
        load_config(overrides=["inference.window_s=10", "inference.window_stride_s=5"])
    with pytest.raises(ConfigError, match=r"inference.window_s = 0"):
        load_config(overrides=["inference.window_s=0"])


def test_a_window_below_the_models_receptive_field_is_refused_before_any_work(tmp_path):
    """Known only once the model's conv stack is read: still before Ray starts, naming the key."""
    from pipeline.engine import plan

    cfg = load_config(overrides=["inference.window_s=0.02", "inference.window_stride_s=0"],
                      **{"input.path": "@sample", "output.path": str(tmp_path / "out"), "model.name": "@demo"})
    with pytest.raises(ConfigError, match=r"inference.window_s = 0.02: shorter than the model's receptive field "
                                          r"\(0.025 s\)"):
        plan(cfg)
    no_left = load_config(overrides=["inference.window_stride_s=[0, 2]"],
                          **{"input.path": "@sample", "output.path": str(tmp_path / "out"), "model.name": "@demo"})
    with pytest.raises(ConfigError, match=r"the left stride must be at least the model's receptive field"):
        plan(no_left)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
