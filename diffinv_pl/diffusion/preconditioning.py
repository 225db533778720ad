"""Preconditioning wrappers: every model, learned or analytic, is called as ``D(x, sigma) -> E[x0 | x]``.

``x`` is in the variance-exploding form ``x = x0 + sigma * n`` and ``sigma`` is a tensor broadcastable to the batch
dimension ``x.shape[0]`` (a scalar is allowed). The wrapped networks know nothing of noise parameterisation: they
receive ``(c_in * x, c_noise)`` and return a raw output ``F`` that the wrapper mixes as
``D = c_skip * x + c_out * F`` (Karras et al. 2022, Table 1). Extra keyword arguments of a wrapper call (e.g. the
positional channels ``pos`` of a patch network) are passed to the network unchanged: conditioning inputs are not
scaled by c_in (PaDIS, methods.md §3.2).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.schedules import (
    alpha_bar_from_betas,
    linear_betas,
    sigma_from_alpha_bar,
    sqrt_linear_betas,
    vp_continuous_t,
)


@runtime_checkable
class Denoiser(Protocol):
    """The one denoiser interface: D(x, sigma) -> E[x0 | x0 + sigma n = x]."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def broadcast_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return sigma shaped (B, 1, ..., 1) to broadcast against x of shape (B, ...); raise if sigma <= 0 or mismatched."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    if not bool((sigma > 0).all()):
        raise ValueError(f"sigma must be > 0 for a denoiser call, got min {float(sigma.min())}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_coefficients(x: Tensor, sigma: Tensor | float, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) for a batch x: the first three shaped (B, 1, ..., 1), c_noise (B,)."""
    sigma = broadcast_sigma(sigma, x)
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1.0 / (sigma**2 + sd2).sqrt()
    c_noise = (sigma.log() / 4).reshape(-1).expand(x.shape[0])
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022): c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4, with s = sigma and sd = sigma_data.

    ``net(x_in, c_noise)`` takes c_noise of shape (B,) and returns a tensor shaped like x.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, **net_kwargs: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_coefficients(x, sigma, self.sigma_data)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, **net_kwargs)


class VEPrecond(nn.Module):
    """VE (NCSN++) preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, sigma: Tensor, **net_kwargs: Tensor) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        c_noise = (0.5 * sigma).log().reshape(-1).expand(x.shape[0])
        return x + sigma * self.net(x, c_noise, **net_kwargs)


class VPEpsPrecond(nn.Module):
    """An epsilon-prediction DDPM network seen as an EDM denoiser (the wrapper DAPS uses).

    With abar = 1/(1 + sigma^2): x_t = sqrt(abar) x, eps = net(x_t, t), D = x - sigma * eps, i.e. c_skip = 1,
    c_out = -sigma, c_in = 1/sqrt(1 + sigma^2). The network time is ``(num_train_steps - 1) * t(sigma)`` with t(sigma)
    the inverse of the continuous VP schedule (beta_min, beta_d). ``learned_variance`` networks return 2C channels;
    only the first C (the epsilon prediction) are used.
    """

    def __init__(
        self,
        net: nn.Module,
        num_train_steps: int = 1000,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_train_steps = num_train_steps
        self.beta_min = beta_min
        self.beta_d = beta_d
        self.learned_variance = learned_variance

    def network_time(self, sigma: Tensor) -> Tensor:
        """(num_train_steps - 1) * t(sigma) for sigma of shape (B,)."""
        return (self.num_train_steps - 1) * vp_continuous_t(sigma, self.beta_min, self.beta_d)

    def forward(
        self, x: Tensor, sigma: Tensor, network_sigma: Tensor | float | None = None, **net_kwargs: Tensor
    ) -> Tensor:
        """D(x, sigma); ``network_sigma`` (default sigma) sets only the network time (module docstring)."""
        return _eps_denoise(self, x, sigma, network_sigma, net_kwargs)


def _eps_denoise(wrapper: nn.Module, x: Tensor, sigma: Tensor | float, network_sigma, net_kwargs: dict) -> Tensor:
    """D = x - sigma * eps(x / sqrt(1 + sigma^2), time(network_sigma)) for an eps wrapper with ``network_time``."""
    sigma = broadcast_sigma(sigma, x)
    time_sigma = sigma if network_sigma is None else broadcast_sigma(network_sigma, x)
    c_in = 1.0 / (1.0 + sigma**2).sqrt()
    t = wrapper.network_time(time_sigma.reshape(-1)).expand(x.shape[0])
    eps = wrapper.net(c_in * x, t, **net_kwargs)
    if wrapper.learned_variance:
        eps = eps[:, : x.shape[1]]
    if eps.shape != x.shape:
        raise ValueError(
            f"epsilon network returned shape {tuple(eps.shape)} for input {tuple(x.shape)}; "
            "set learned_variance=true for networks that also predict the variance"
        )
    return x - sigma * eps


DISCRETE_BETA_SCHEDULES = ("sqrt_linear", "linear")


def discrete_vp_sigmas(
    beta_schedule: str = "sqrt_linear",
    num_train_steps: int = 1000,
    linear_start: float = 0.0015,
    linear_end: float = 0.0195,
) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), t = 0..T-1 (float64, increasing) of a discrete DDPM schedule.

    ``sqrt_linear``: sqrt(beta) linear from sqrt(linear_start) to sqrt(linear_end) (latent diffusion's schedule,
    called ``linear`` in the CompVis code); ``linear``: beta linear from linear_start to linear_end (no 1000/T rescale).
    """
    if beta_schedule == "sqrt_linear":
        betas = sqrt_linear_betas(num_train_steps, linear_start, linear_end)
    elif beta_schedule == "linear":
        scale = num_train_steps / 1000  # linear_betas rescales by 1000 / T
        betas = linear_betas(num_train_steps, linear_start * scale, linear_end * scale)
    else:
        valid = ", ".join(DISCRETE_BETA_SCHEDULES)
        raise ValueError(f"unknown discrete beta schedule {beta_schedule!r}; valid: {valid}")
    return sigma_from_alpha_bar(alpha_bar_from_betas(betas))


def discrete_time(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Continuous timestep index of noise levels ``sigma`` on the increasing grid ``sigmas`` (T,): linear in
    log sigma between neighbouring grid points, exactly t at sigma = sigmas[t], clamped to [0, T - 1] outside."""
    log_grid = sigmas.to(device=sigma.device, dtype=torch.float64).log()
    log_s = sigma.to(torch.float64).log().clamp(log_grid[0], log_grid[-1])
    hi = torch.searchsorted(log_grid, log_s).clamp(1, len(log_grid) - 1)
    lo = hi - 1
    frac = (log_s - log_grid[lo]) / (log_grid[hi] - log_grid[lo])
    return (lo + frac).to(sigma.dtype)


class DiscreteVPEpsPrecond(nn.Module):
    """An eps-prediction network trained on a discrete DDPM schedule (LDM: ``sqrt_linear`` 0.0015 -> 0.0195, 1000
    steps) seen as an EDM denoiser.

    sigma_t = sqrt((1 - abar_t) / abar_t) (:func:`discrete_vp_sigmas`); D(x, sigma) = x - sigma * eps(c_in x, t)
    with c_in = 1/sqrt(1 + sigma^2) (so c_in x = sqrt(abar) x0 + sqrt(1 - abar) n is the DDPM state) and network
    time t = :func:`discrete_time` (sigma): the training index at the 1000 grid points, interpolated in log sigma in
    between. ``network_sigma`` (forward) gives the time while ``sigma`` keeps the coefficients.
    """

    def __init__(
        self,
        net: nn.Module,
        beta_schedule: str = "sqrt_linear",
        num_train_steps: int = 1000,
        linear_start: float = 0.0015,
        linear_end: float = 0.0195,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.learned_variance = learned_variance
        self.sigmas = discrete_vp_sigmas(beta_schedule, num_train_steps, linear_start, linear_end)  # not a buffer

    def network_time(self, sigma: Tensor) -> Tensor:
        return discrete_time(sigma, self.sigmas)

    def forward(
        self, x: Tensor, sigma: Tensor, network_sigma: Tensor | float | None = None, **net_kwargs: Tensor
    ) -> Tensor:
        return _eps_denoise(self, x, sigma, network_sigma, net_kwargs)


def score_from_denoiser(denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """Score of the sigma-noised marginal by Tweedie: grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    return (denoised - x) / broadcast_sigma(sigma, x) ** 2
