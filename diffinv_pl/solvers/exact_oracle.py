"""Oracle sampler: the same DDIM(eta) loop driven by the exact noised-posterior denoiser (exact_posterior.md §3.6).

With an analytic Gaussian-mixture prior and a linear operator, p_sigma(x | y) is again a Gaussian mixture, so
E[x0 | x_sigma, y] is exact and the only errors left are discretisation and initialisation. This separates them from
the guidance approximation of a real solver.

    x_N ~ init_std * N(0, I)  (drawn from the generator, or x_init)
    for i = 0 .. N-1:  x_{i+1} = s_{i+1} * DDIM_eta(x_i / s_i -> sigma_{i+1}) with x0_hat = E[x0 | x_i / s_i, y]
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.diffusion.steps import ddim_step
from diffinv_pl.operators.matrix import MatrixOperator
from diffinv_pl.priors.analytic import GaussianMixture
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers.base import (
    Callback,
    CountingDenoiser,
    InverseProblem,
    SolverResult,
    check_finite,
    cost_meter,
    initial_state,
)
from diffinv_pl.utils.random import GeneratorLike


def exact_posterior_denoiser(problem: InverseProblem, prior: Prior) -> GaussianMixture:
    """E[x0 | x_sigma, y] as a Gaussian mixture; needs an analytic mixture prior and a dense linear operator."""
    if not isinstance(prior, GaussianMixture):
        raise TypeError(f"the oracle sampler needs an analytic GaussianMixture prior, got {type(prior).__name__}")
    if not isinstance(problem.operator, MatrixOperator):
        raise TypeError(f"the oracle sampler needs a MatrixOperator, got {type(problem.operator).__name__}")
    # The closed form is computed in float64 and cast back to the sampling precision.
    A = problem.operator.matrix.to(torch.float64)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("oracle: the operator matrix contains NaN/Inf values; check how the operator was built")
    dy = A.shape[-2]
    y = problem.y.reshape(-1, dy).to(torch.float64)
    if y.shape[0] not in (1, problem.operator.num_problems):
        raise ValueError(f"oracle: one measurement per problem expected, got y of shape {tuple(problem.y.shape)}")
    sigma_y = torch.as_tensor(problem.sigma_y, dtype=torch.float64).reshape(-1)
    return prior.to(torch.float64).posterior(A, y, sigma_y).to(prior.means.dtype)


def oracle(
    problem: InverseProblem,
    prior: Prior,
    *,
    grid: SamplingGrid,
    eta: float = 1.0,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """Sample p(x0 | y) with the exact noised-posterior denoiser; ``prior`` must be the analytic mixture."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    posterior = exact_posterior_denoiser(problem, prior)
    x_init = initial_state(problem, prior, grid.init_std, generator, x_init)
    counted = CountingDenoiser(posterior)
    sigmas, scales = grid.sigmas.tolist(), grid.scales.tolist()
    with cost_meter(problem, counted) as cost:
        x = x_init
        for i in range(grid.num_steps):
            x_norm = x / scales[i]
            denoised = counted(x_norm, torch.as_tensor(sigmas[i], dtype=x.dtype), generator=generator)
            check_finite(denoised, "oracle posterior mean", i, sigmas[i], "check the operator, y and sigma_y")
            x = scales[i + 1] * ddim_step(x_norm, denoised, sigmas[i], sigmas[i + 1], eta, generator)
            if callback is not None:
                callback({"step": i, "sigma": sigmas[i], "x": x, "denoised": denoised})
    return SolverResult(x, cost)
