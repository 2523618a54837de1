"""Length-bucketed batch planning under a padded-samples budget. Pure: no Ray, no torch."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch_samples: int, max_waste: float) -> list[list[int]]:
    """Group row indices into batches whose padded size ``rows * longest`` fits the budget.

    Rows are sorted longest first so each batch holds similar lengths; a row joins the current
    batch only while the batch's padding stays within ``max_waste`` of its real samples, so the
    total waste is bounded too (a cut by the budget alone mixes long rows with much shorter ones).
    A row longer than the whole budget gets a batch of its own.
    Returns indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    real = 0
    for i in order:
        if batches:
            # Sorted longest first, so a batch's first row is its longest.
            padded = (len(batches[-1]) + 1) * lengths[batches[-1][0]]
            if padded <= max_batch_samples and padded <= (1 + max_waste) * (real + lengths[i]):
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def padded_size(lengths: Sequence[int]) -> int:
    """Samples a batch of these lengths occupies once zero-padded to its longest row."""
    return len(lengths) * max(lengths, default=0)
