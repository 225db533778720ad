"""One reverse-diffusion step, written in the normalised (variance-exploding) coordinates x = x0 + sigma n.

DDIM with eta (Song et al. 2021), in VP form
    x_{t'} = sqrt(abar') x0_hat + sqrt(1 - abar' - c^2) eps_hat + c z,
    c = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'),
is, after dividing by sqrt(abar'), the step
    x' = x0_hat + sqrt(sigma'^2 - c_ve^2) eps_hat + c_ve z,   c_ve^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2,
with eps_hat = (x - x0_hat) / sigma. eta = 1 is the DDPM ancestral step (its posterior variance beta_tilde equals c^2),
eta = 0 is deterministic DDIM (the probability-flow Euler step in sigma), and with s = 1 it is k-diffusion's
Euler-ancestral step on an EDM grid.

The probability-flow ODE steps (EDM's Euler and Heun, Karras et al. 2022 Algorithm 1) are here too: training-time
sample grids and DAPS's inner ODE solve use them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffinv_pl.utils.random import GeneratorLike, randn


def ddim_noise_levels(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split sigma_next into the deterministic part and the fresh-noise part of a DDIM(eta) step.

    Returns (sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2 and
    sigma_up = min(sigma_next, eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigma_up = eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma
    sigma_up = torch.minimum(sigma_up, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


def ddim_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    generator: GeneratorLike = None,
) -> Tensor:
    """DDIM(eta) step from noise level sigma to sigma_next in normalised coordinates (see module docstring).

    Args:
        x: current state x = x0 + sigma n.
        denoised: D(x, sigma), the estimate of E[x0 | x].
        sigma, sigma_next: current and next noise levels (scalars), sigma > sigma_next >= 0.
        eta: 0 deterministic DDIM, 1 DDPM ancestral.
        generator: source of the fresh noise z: one generator, or one per sample (see diffinv_pl.utils.random).
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta)
    # denoised + sigma_down * (x - denoised) / sigma, in one pass
    out = torch.lerp(denoised, x, (sigma_down / sigma).to(x.dtype))
    if eta > 0 and float(sigma_up) > 0:
        noise = randn(x.shape, generator, x.dtype, x.device)
        out = out.add_(noise, alpha=float(sigma_up))
    return out


def ode_derivative(x: Tensor, denoised: Tensor, sigma: Tensor | float) -> Tensor:
    """dx/dsigma of the probability-flow ODE in the VE form (Karras et al. 2022, Eq. 3 with s = 1):
    d = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next: x + (sigma_next - sigma) d(x, sigma).
    Equal to the deterministic DDIM step (eta = 0)."""
    return x + (sigma_next - sigma) * ode_derivative(x, denoised, sigma)


def heun_step(
    x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, denoise: Callable[[Tensor, float], Tensor]
) -> tuple[Tensor, int]:
    """One step of EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1, lines 5-8).

    The Euler step to sigma_next is corrected with the average of the slopes at both ends,
    x' = x + (sigma_next - sigma) (d(x, sigma) + d(x_euler, sigma_next)) / 2, except for the last step to
    sigma_next = 0, which stays an Euler step. ``denoise(x, sigma)`` evaluates the denoiser at the Euler point.
    Returns the new state and the number of extra denoiser calls (0 or 1).
    """
    d = ode_derivative(x, denoised, sigma)
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next <= 0:
        return x_euler, 0
    d_next = ode_derivative(x_euler, denoise(x_euler, sigma_next), sigma_next)
    return x + (sigma_next - sigma) * 0.5 * (d + d_next), 1
