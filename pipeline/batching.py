"""Length-bucketed batch planning under a padded-samples budget. Pure: no Ray, no torch."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch_samples: int) -> list[list[int]]:
    """Group row indices into batches whose padded size ``rows * longest`` fits the budget.

    Rows are sorted longest first so each batch holds similar lengths (little padding); a row
    longer than the whole budget still gets a batch of its own. Returns indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a batch's first row is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_samples:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def padded_size(lengths: Sequence[int]) -> int:
    """Samples a batch of these lengths occupies once zero-padded to its longest row."""
    return len(lengths) * max(lengths, default=0)
