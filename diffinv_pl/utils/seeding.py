"""Per-sample randomness: every random choice for a sample comes from a generator seeded by (seed, sample key, run),
so results do not depend on batch composition, batch size or the number of ranks."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def hash_seed(*parts: object) -> int:
    """A 63-bit seed from sha256 of the parts joined by "/" (stable across processes, platforms and Python versions,
    unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def key_generator(seed: int, key: str, run: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from sha256("seed/key/run") (63 bits)."""
    return torch.Generator(device).manual_seed(hash_seed(seed, key, run))


def params_for_keys(operator, keys: list[str], seed: int, run: int = 0) -> Tensor:
    """Random operator parameters (masks, kernels) for a batch of sample keys, one key-seeded draw each."""
    if not hasattr(operator, "sample_params"):
        raise TypeError(f"{type(operator).__name__} has no random parameters")
    return torch.cat([operator.sample_params(1, key_generator(seed, key, run)) for key in keys])
