"""Noise from explicit generators, per batch or per sample.

A sequence of generators (one per element of the leading batch dimension, e.g. seeded by
:func:`diffinv_pl.utils.seeding.key_generator` from each sample's key) makes a sample's noise independent of the batch
it is evaluated in, so results are identical for any batch size and any number of ranks. CPU generators draw on the
CPU and the noise is moved to ``device``, so a run gives the same numbers on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int], generator: GeneratorLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Tensor:
    """N(0, I) noise of ``shape``; row b of a per-sample ``generator`` sequence comes from generator b."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        draw_device = generator.device if generator is not None else "cpu"
        return torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)
    generators = list(generator)
    if not shape or len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} per-sample generators for noise of shape {shape}: need one per row")
    rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device) for g in generators]
    return torch.stack(rows).to(device)
