"""Diffusion Posterior Sampling (Chung et al., ICLR 2023) with the semantics of the released code (methods.md §2).

    x_N ~ initial state
    for i = 0 .. N-1:                       (grid of (s_i, sigma_i), ending at sigma = 0)
        x0_hat = D(x_i / s_i, sigma_i)                          # optionally clipped to the data range
        x'     = s_{i+1} * DDIM_eta(x_i / s_i -> sigma_{i+1})   # eta = 1: DDPM ancestral step
        g      = grad_{x_i} ||y - A(x0_hat)||                   # the norm, not squared, through the denoiser
        x_{i+1} = x' - zeta * g

On a VP grid (``vp_grid``) the state is the DDPM x_t and this is DPS as released; on an EDM grid (s = 1) it is the
EDM-grid variant. ``norm: l2_squared`` uses ||.||^2 instead (config, default as released).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.diffusion.preconditioning import Denoiser
from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.diffusion.steps import ddim_step
from diffinv_pl.solvers.base import (
    Callback,
    CountingDenoiser,
    InverseProblem,
    SolverResult,
    check_finite,
    cost_meter,
)
from diffinv_pl.utils.random import GeneratorLike

NORMS = ("l2", "l2_squared")


def dps_guidance(
    problem: InverseProblem,
    denoiser: Denoiser,
    x: Tensor,
    scale: float,
    sigma: float,
    norm: str = "l2",
    clip_denoised: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DPS guidance at state x = s (x0 + sigma n): returns (grad_x loss, x0_hat, per-sample residual norms, x / s).

    loss = sum_b ||y - A(x0_hat_b)|| (``l2``) or its square (``l2_squared``), x0_hat = D(x / s, sigma), so that
    grad = J_D^T A^T (A x0_hat - y) / (s ||A x0_hat - y||) per sample for ``l2``.
    """
    x = x.detach().requires_grad_(True)
    x_norm = x / scale
    denoised = denoiser(x_norm, torch.as_tensor(sigma, dtype=x.dtype, device=x.device))
    if clip_denoised is not None:
        denoised = denoised.clamp(*clip_denoised)
    residual = problem.operator.residual_norm(problem.y - problem.operator(denoised))
    loss = residual.sum() if norm == "l2" else residual.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, denoised.detach(), residual.detach(), x_norm.detach()


def dps(
    problem: InverseProblem,
    denoiser: Denoiser,
    x_init: Tensor,
    *,
    grid: SamplingGrid,
    zeta: float = 1.0,
    norm: str = "l2",
    eta: float = 1.0,
    clip_denoised: tuple[float, float] | None = None,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
) -> SolverResult:
    """Run DPS; see the module docstring. ``zeta`` is the guidance step size, ``clip_denoised`` the data range."""
    if norm not in NORMS:
        raise ValueError(f"unknown DPS norm {norm!r}; valid: {', '.join(NORMS)}")
    if zeta < 0:
        raise ValueError(f"zeta must be >= 0, got {zeta}")
    problem.check_state(x_init)
    counted = CountingDenoiser(denoiser)
    sigmas, scales = grid.sigmas.tolist(), grid.scales.tolist()
    with cost_meter(problem, counted) as cost:
        x = x_init
        for i in range(grid.num_steps):
            sigma, sigma_next, s, s_next = sigmas[i], sigmas[i + 1], scales[i], scales[i + 1]
            grad, denoised, residual, x_norm = dps_guidance(problem, counted, x, s, sigma, norm, clip_denoised)
            # A NaN/Inf state shows up in the next residual; checking the (P, n) norms is cheaper than the state.
            check_finite(residual, "DPS residual", i, sigma, f"reduce zeta (now {zeta}) or check the denoiser and operator")
            x_next = ddim_step(x_norm, denoised, sigma, sigma_next, eta, generator)
            x = torch.add(x_next.mul_(s_next), grad, alpha=-zeta)
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised, "residual": residual})
        check_finite(x, "DPS state", grid.num_steps - 1, sigmas[-2], f"reduce zeta (now {zeta})")
    return SolverResult(x, cost)
