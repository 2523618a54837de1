"""The benchmark's roofline counts the forward's arithmetic on the meta device: it must be the real forward's."""

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCTC

from jobs.benchmark import forward_flops


def test_flops_counted_on_the_meta_device_are_the_real_forwards(group_model):
    waves = [np.zeros(n, np.float32) for n in (16_000, 9_000, 4_000, 3_999)]
    plan = [[0, 1], [2, 3]]  # padded to each batch's first (longest) row, as path 3's batches are
    # Its positional conv is weight-normed. Eager attention: the counter has no formula for the CPU's
    # flash attention, so SDPA's products would go uncounted here.
    model = AutoModelForCTC.from_pretrained(group_model, attn_implementation="eager").eval()
    # no_grad: under inference_mode FlopCounterMode cannot compute a weight-normed conv's weight.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for rows in plan:
            model(torch.zeros(len(rows), len(waves[rows[0]])))
    real = counter.get_total_flops()
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.convolution", "aten.addmm", "aten.bmm"}
    assert forward_flops(str(group_model), waves, plan) == real
