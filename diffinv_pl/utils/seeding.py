"""Per-sample randomness: every random choice for a sample comes from a generator seeded by (seed, sample key, run),
so results do not depend on batch composition, batch size or the number of ranks."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def key_generator(seed: int, key: str, run: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from sha256("seed/key/run") (63 bits)."""
    digest = hashlib.sha256(f"{seed}/{key}/{run}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def params_for_keys(operator, keys: list[str], seed: int, run: int = 0) -> Tensor:
    """Random operator parameters (masks, kernels) for a batch of sample keys, one key-seeded draw each."""
    if not hasattr(operator, "sample_params"):
        raise TypeError(f"{type(operator).__name__} has no random parameters")
    return torch.cat([operator.sample_params(1, key_generator(seed, key, run)) for key in keys])
