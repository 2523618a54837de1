import random

from pipeline.batching import padded_size, plan_batches


def test_every_row_once_and_under_budget():
    rng = random.Random(0)
    lengths = [rng.randint(400, 35 * 16_000) for _ in range(300)]
    budget = 2_000_000
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert padded_size([lengths[i] for i in b]) <= budget or len(b) == 1


def test_sorted_longest_first_and_oversize_rows_alone():
    lengths = [10, 50, 30, 500, 20]
    assert plan_batches(lengths, 100) == [[3], [1, 2], [4, 0]]


def test_length_sorting_keeps_padding_small():
    rng = random.Random(1)
    lengths = [rng.randint(2 * 16_000, 35 * 16_000) for _ in range(512)]
    batches = plan_batches(lengths, 3_200_000)
    padded = sum(padded_size([lengths[i] for i in b]) for b in batches)
    assert padded / sum(lengths) - 1 < 0.05
    assert padded_size([]) == 0
