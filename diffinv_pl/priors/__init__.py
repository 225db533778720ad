"""Priors behind the D(x, sigma) interface: analytic (Gaussian, Gaussian mixture); learned networks come later."""

from diffinv_pl.priors.analytic import GaussianMixture, SpectralCovariance

__all__ = ["GaussianMixture", "SpectralCovariance"]
