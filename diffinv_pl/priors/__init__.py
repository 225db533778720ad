"""Priors behind one :class:`Prior` object (``denoise(x, sigma, generator=...)``, state space, data and sigma ranges):
analytic Gaussian mixtures and stationary Gaussian image priors, whole-image networks, PaDIS patch-assembled networks,
range-adapted wrappers, and the loader of priors trained with ``train.py``."""

from diffinv_pl.priors.analytic import GaussianMixture, SpectralCovariance, StationaryGaussianPrior
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior

__all__ = [
    "GaussianMixture",
    "NetworkPrior",
    "PatchAssembledPrior",
    "Prior",
    "RangeAdaptedPrior",
    "SpectralCovariance",
    "StationaryGaussianPrior",
]
