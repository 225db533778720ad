"""Exact evaluation across ranks: each index exactly once, no padding (conventions.md §6).

Lightning's DistributedSampler pads the last batch with duplicates, which biases paper numbers; instead give rank r
of world size w ``Subset(dataset, rank_indices(len(dataset), r, w))`` (with ``use_distributed_sampler=False``). The
shares differ by at most one sample, so ranks may run different numbers of batches: evaluation loops must not call
collectives per batch (gather results keyed by sample key at the end). ``skip_finished`` drops samples whose results
a previous, interrupted run already wrote, keyed by the stable sample key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

SPLITS = ("strided", "contiguous")


def rank_indices(num_samples: int, rank: int, world_size: int, split: str = "strided") -> list[int]:
    """Rank ``rank``'s share of ``range(num_samples)``: ``rank, rank + w, ...`` ("strided") or one block of
    consecutive indices ("contiguous"); the shares are disjoint, cover every index and differ in size by at most 1."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if split == "strided":
        return list(range(rank, num_samples, world_size))
    if split == "contiguous":
        base, extra = divmod(num_samples, world_size)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (rank < extra)))
    raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def skip_finished(indices: Sequence[int], keys: Sequence[str], finished_keys: Iterable[str]) -> list[int]:
    """The ``indices`` whose sample key ``keys[i]`` is not in ``finished_keys``, in order. ``keys`` lists the whole
    dataset's keys by index (``dataset.keys``); finished keys that the dataset does not have are reported, since they
    mean the run is being resumed on different data."""
    done = set(finished_keys)
    unknown = done.difference(keys)
    if unknown:
        log.warning(
            "%d finished key(s) are not in this dataset (resuming on different data?), e.g. %s",
            len(unknown),
            sorted(unknown)[:5],
        )
    return [i for i in indices if keys[i] not in done]
