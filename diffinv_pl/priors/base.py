"""The ``Prior`` object every solver receives: a denoiser plus the space it works in.

A solver never calls a bare network. It calls ``prior.denoise(x, sigma, generator=...)`` on its *state* ``x``, which
lives in the prior's state space: pixels for pixel and patch priors (``encode``/``decode`` are the identity), a latent
space for latent priors (``encode``/``decode`` are real maps). The forward operator always stays in pixel space, so a
latent solver measures ``A(decode(z))``.

    x = x0 + sigma n  (variance-exploding form, see diffinv_pl.diffusion.preconditioning)
    prior.denoise(x, sigma, generator=g) = E[x0 | x]                        (state space)
    prior.state_shape(data_shape)        = event shape of the state for data of event shape ``data_shape``
    prior.initial_state(batch_shape, data_shape, std, generator) = std * N(0, I) of shape batch + state shape
    prior.data_range                     = (lo, hi) of the images it denoises, or None (plain vectors)
    prior.sigma_range                    = (sigma_min, sigma_max) the denoiser is meant for, in data-range units

Randomness: priors that draw random numbers (the patch-assembly shift of PaDIS) draw them from the ``generator``
passed to ``denoise`` (one generator, or one per sample of the leading batch dimension), never from a generator of
their own, so a sample gets the same result in any batch, on any rank and after a resume.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffinv_pl.utils.random import GeneratorLike, randn


class Prior(ABC):
    """Base class of every prior given to a solver (module docstring).

    Subclasses implement :meth:`denoise`; latent priors also override :meth:`state_shape`, :meth:`encode` and
    :meth:`decode`. ``data_range`` and ``sigma_range`` are plain attributes.
    """

    data_range: tuple[float, float] | None = None
    sigma_range: tuple[float, float] = (0.0, math.inf)

    @abstractmethod
    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        """E[x0 | x0 + sigma n = x] for states x of shape (..., *state_shape); sigma a scalar or one per sample."""

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Event shape of the solver state for data (the operator's input) of event shape ``data_shape``."""
        return tuple(data_shape)

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        """Raise a clear error when the prior cannot work on data of this event shape (default: any shape)."""

    def encode(self, x: Tensor) -> Tensor:
        """Data -> state (identity for pixel priors)."""
        return x

    def decode(self, z: Tensor) -> Tensor:
        """State -> data (identity for pixel priors)."""
        return z

    def initial_state(
        self,
        batch_shape: tuple[int, ...],
        data_shape: tuple[int, ...],
        std: float,
        generator: GeneratorLike = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Pure noise ``std * N(0, I)`` of shape ``batch_shape + state_shape(data_shape)`` (row b from generator b)."""
        shape = (*batch_shape, *self.state_shape(tuple(data_shape)))
        return std * randn(shape, generator, dtype, device)
