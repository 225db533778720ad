"""A latent prior with a linear decoder, for exact tests of latent solvers (latent_api.md §3).

    z ~ GaussianMixture (dimension dz),   x = decode(z) = W z + b   (W: (dx, dz), b: (dx,))
    encode(x) = W^+ (x - b)               (least squares; exact on the range of the decoder)
    denoise(z, sigma) = E[z0 | z0 + sigma n = z]   (the mixture's exact Tweedie mean, in latent space)

With y = A x + sigma_y n the posterior of z is the mixture's posterior for the operator A' = A W and the measurement
y - A b (exact_posterior.md §3.6); x | y is its push-forward through the decoder.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.priors.analytic import GaussianMixture
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike


class LinearDecoderPrior(Prior):
    """Gaussian-mixture latent prior with the decoder x = W z + offset (module docstring).

    Args:
        latent: the mixture on z (dimension dz; with P problems the states are (P, ..., dz), one W for all).
        W: (dx, dz) decoder matrix, in the mixture's dtype.
        offset: optional (dx,) decoder offset (default 0).
    """

    def __init__(self, latent: GaussianMixture, W: Tensor, offset: Tensor | None = None) -> None:
        W = torch.as_tensor(W, dtype=latent.means.dtype)
        if W.ndim != 2 or W.shape[1] != latent.dim:
            raise ValueError(f"W must have shape (dx, {latent.dim}) for a latent of dimension {latent.dim}, got {tuple(W.shape)}")
        self.latent = latent
        self.W = W
        self.offset = torch.zeros(W.shape[0], dtype=W.dtype) if offset is None else torch.as_tensor(offset, dtype=W.dtype)
        if self.offset.shape != (W.shape[0],):
            raise ValueError(f"offset must have shape ({W.shape[0]},), got {tuple(self.offset.shape)}")
        self.W_pinv = torch.linalg.pinv(W)
        self.sigma_range = latent.sigma_range

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    def denoise(
        self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None, network_sigma: Tensor | float | None = None
    ) -> Tensor:
        """The latent mixture's exact E[z0 | z]; ``network_sigma`` (a network-time input) is accepted and ignored."""
        return self.latent.denoise(x, sigma, generator=generator)

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        self.check_data_shape(data_shape)
        return (self.latent_dim,)

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        if tuple(data_shape) != (self.data_dim,):
            raise ValueError(f"this linear-decoder prior decodes to vectors of shape ({self.data_dim},), got data of shape {tuple(data_shape)}")

    def encode(self, x: Tensor) -> Tensor:
        """W^+ (x - offset)."""
        return (x - self.offset) @ self.W_pinv.T

    def decode(self, z: Tensor) -> Tensor:
        """W z + offset (differentiable)."""
        return z @ self.W.T + self.offset

    def latent_posterior(self, A: Tensor, y: Tensor, sigma_y: Tensor | float) -> GaussianMixture:
        """Exact p(z | y) for y = A (W z + offset) + sigma_y n: the mixture posterior with A' = A W, y' = y - A offset."""
        A = torch.as_tensor(A, dtype=self.W.dtype)
        y = torch.as_tensor(y, dtype=self.W.dtype) - self.offset @ A.transpose(-1, -2)
        return self.latent.posterior(A @ self.W, y, sigma_y)

    def sample(self, num_samples: int, generator: GeneratorLike = None) -> Tensor:
        """Exact data samples W z + offset, shape (num_samples, dx) (one-problem mixture) or (P, num_samples, dx)."""
        z = self.latent.sample(num_samples, generator)
        return self.decode(z[0] if self.latent.num_problems == 1 else z)
