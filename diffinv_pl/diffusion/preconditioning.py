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

from diffinv_pl.diffusion.schedules import vp_continuous_t


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

    def forward(self, x: Tensor, sigma: Tensor, **net_kwargs: Tensor) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        c_in = 1.0 / (1.0 + sigma**2).sqrt()
        t = vp_continuous_t(sigma.reshape(-1), self.beta_min, self.beta_d).expand(x.shape[0])
        eps = self.net(c_in * x, (self.num_train_steps - 1) * t, **net_kwargs)
        if self.learned_variance:
            eps = eps[:, : x.shape[1]]
        if eps.shape != x.shape:
            raise ValueError(
                f"epsilon network returned shape {tuple(eps.shape)} for input {tuple(x.shape)}; "
                "set learned_variance=true for networks that also predict the variance"
            )
        return x - sigma * eps


def score_from_denoiser(denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """Score of the sigma-noised marginal by Tweedie: grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    return (denoised - x) / broadcast_sigma(sigma, x) ** 2
