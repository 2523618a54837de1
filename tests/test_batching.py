import random

from pipeline.batching import padded_size, plan_batches
from pipeline.config import InferenceConfig

WASTE = InferenceConfig().max_padding_waste  # the job's default bound


def test_every_row_once_and_under_budget():
    rng = random.Random(0)
    lengths = [rng.randint(400, 35 * 16_000) for _ in range(300)]
    budget = 2_000_000
    batches = plan_batches(lengths, budget, WASTE)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert padded_size([lengths[i] for i in b]) <= budget or len(b) == 1


def test_sorted_longest_first_and_oversize_rows_alone():
    lengths = [10, 50, 30, 500, 20]
    assert plan_batches(lengths, 100, max_waste=1.0) == [[3], [1, 2], [4, 0]]
    assert plan_batches(lengths, 100, WASTE) == [[3], [1], [2], [4], [0]]  # 5% waste allows no pair here


def test_waste_bound_holds_per_batch_and_in_total():
    rng = random.Random(2)
    lengths = [int(16_000 * min(35.0, 2.0 + rng.gammavariate(2.0, 4.0))) for _ in range(58)]
    for max_waste in (0.0, 0.05, 0.2):
        batches = plan_batches(lengths, 1_600_000, max_waste)
        for b in batches:
            rows = [lengths[i] for i in b]
            assert padded_size(rows) <= (1 + max_waste) * sum(rows) + 1e-6
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    unbounded = plan_batches(lengths, 1_600_000, max_waste=10.0)
    assert len(unbounded) < len(plan_batches(lengths, 1_600_000, WASTE))  # the bound costs batch size


def test_length_sorting_keeps_padding_small():
    rng = random.Random(1)
    lengths = [rng.randint(2 * 16_000, 35 * 16_000) for _ in range(512)]
    batches = plan_batches(lengths, 3_200_000, WASTE)
    padded = sum(padded_size([lengths[i] for i in b]) for b in batches)
    assert padded / sum(lengths) - 1 < 0.05
    assert padded_size([]) == 0
