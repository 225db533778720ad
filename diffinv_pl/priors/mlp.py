"""A small residual MLP denoiser network for flat vectors (the learned prior of the Gaussian-mixture toys).

It is the raw network ``F`` behind a preconditioning wrapper (:class:`~diffinv_pl.diffusion.preconditioning.EDMPrecond`):
it is called as ``net(c_in * x, c_noise)`` and knows nothing about the noise parameterisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Fixed Fourier features of a scalar: e(c) = [cos(w_1 c), ..., cos(w_F c), sin(w_1 c), ..., sin(w_F c)].

    The angular frequencies are geometric, w_j = max_freq^((j - 1) / (F - 1)) for j = 1..F (w_1 = 1 rad per unit
    of c, so the lowest pair is injective over EDM's c_noise = ln(sigma) / 4 in about [-1.6, 1.1]).
    Input (B,), output (B, 2F).
    """

    def __init__(self, num_frequencies: int = 16, max_freq: float = 64.0) -> None:
        super().__init__()
        if num_frequencies < 2 or max_freq <= 1:
            raise ValueError(f"need num_frequencies >= 2 and max_freq > 1, got {num_frequencies}, {max_freq}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_frequencies))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        angles = c.to(self.freqs.dtype)[:, None] * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResidualBlock(nn.Module):
    """h <- h + W_2 SiLU(W_1 LayerNorm(h) + E e), with E e the block's projection of the noise embedding."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb = nn.Linear(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.emb(emb)))


class MLPDenoiserNet(nn.Module):
    """Residual MLP ``F(x, c_noise)`` for flat vectors.

    Shapes: ``x`` (B, dim), ``c_noise`` (B,) -> (B, dim). The noise level enters through
    :class:`SinusoidalEmbedding` followed by a two-layer MLP (width ``hidden_dim``), added inside every one of the
    ``num_blocks`` residual blocks. The output layer is zero-initialised, so an untrained network returns F = 0 and
    the EDM denoiser starts at D(x, sigma) = c_skip(sigma) x.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        num_frequencies: int = 16,
        max_freq: float = 64.0,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1 or num_blocks < 1:
            raise ValueError(f"need dim, hidden_dim, num_blocks >= 1, got {dim}, {hidden_dim}, {num_blocks}")
        self.dim = dim
        self.embedding = nn.Sequential(
            SinusoidalEmbedding(num_frequencies, max_freq),
            nn.Linear(2 * num_frequencies, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
        )
        self.inp = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiserNet expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        emb = self.embedding(c_noise)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))
