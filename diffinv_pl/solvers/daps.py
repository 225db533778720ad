"""Decoupled Annealing Posterior Sampling (DAPS; Zhang et al., CVPR 2025) with the semantics of the released code,
main branch (methods.md §5 and the corrections of §0.5).

    sigma_0 > ... > sigma_{K-1} > sigma_K = 0      (annealing levels, :func:`annealing_sigmas`)
    x ~ sigma_0 N(0, I)                             (drawn from the generator, or x_init)
    for k = 0 .. K-1:
        x0_hat = ODE(x, sigma_k -> sigma_ode_min)   # S Euler steps of the probability-flow ODE (:func:`ode_sigmas`)
        x0     = MCMC on p(x0 | x_k, y) ~ N(x0; x0_hat, sigma_k^2 I) exp(-c ||A(decode x0) - y||^2 / tau^2),
                 started at x0_hat, L steps, lr_k = lr (1 + k / (K + 1) (lr_min_ratio - 1))
        x      = x0 + sigma_{k+1} n                 # re-noise
    return decode(x)                                 (= decode(x0) of the last level, sigma_K = 0)

* Grid (``annealing: main``): K + 1 poly-rho points from sigma_max to sigma_min, sigma_min dropped, 0 appended, so the
  last nonzero level is ~0.106 for K = 200. ``annealing: legacy`` (the ``legacy`` branch) visits sigma_min (K poly-rho
  points, then 0), ends the ODE with an Euler step to 0 (S - 1 poly-rho steps to sigma_ode_min and one to 0) and
  decays the step size with k / K. NFE per level = S either way.
* Likelihood (``likelihood: main``): c = 1, i.e. -||A x - y||^2 / tau^2 (twice the weight of the exact Gaussian at
  tau = sigma_y); ``legacy``: c = 1/2. ``tau_relative: true`` reads tau in units of sigma_y (tau_eff = tau sigma_y,
  per problem; the main weight then equals the exact 1/(2 sigma_y^2) at tau = sqrt(2)).
* MCMC (``mcmc``): ``langevin``  x0 <- x0 + lr s + sqrt(2 lr) n;
  ``hmc``  v <- m v + sqrt(lr) s + sqrt(2 (1 - m)) n, x0 <- x0 + sqrt(lr) v, with v ~ N(0, I) redrawn at every level;
  s = -grad c ||A(decode x0) - y||^2 / tau^2 + (x0_hat - x0) / sigma_k^2 (the "gaussian" prior solver: the MCMC
  steps call the operator, never the network). ``grad_clip`` clips the likelihood gradient elementwise (LatentDAPS
  uses 1).
* ``lr_relative: true`` reads lr in units of 1 / L_k, the largest precision of the inner target of level k for a
  linear operator: L_k = 1 / sigma_k^2 + 2 c ||A||^2 / tau_eff^2 (per problem when tau is relative), so lr = 0.5
  is a stable Langevin step at every level and every sigma_y (methods.md §0.5, for analytic benchmarks whose sigma_y
  spans decades). Nonlinear operators are refused in this mode (no ||A||).
* ``x0_hat: tweedie`` uses D(x_k, sigma_k) (one NFE) instead of the ODE end point: the inner target is then much less
  biased for analytic priors (methods.md §0.5).
* The state lives in the prior's state space: the ODE and the MCMC run on it, the operator sees ``prior.decode(x0)``
  and the gradient flows through ``decode``, so a latent prior makes this LatentDAPS without change.
* A NaN/Inf raises ``FloatingPointError`` naming DAPS, the level and sigma (the released code returns zeros).
* :func:`daps_annealing` is the annealing loop with the inner sampler as an argument: tests replace the MCMC by an
  exact draw from p(x0 | x_k, y), which makes the loop exact.

``task`` picks the DAPS-1K pixel MCMC constants of one task from :data:`PIXEL_LANGEVIN` (``mcmc: langevin``) or
:data:`PIXEL_HMC` (``mcmc: hmc``), replacing ``mcmc_steps``, ``lr``, ``lr_min_ratio`` (and ``momentum``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import edm_sigmas
from diffinv_pl.diffusion.steps import euler_step
from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator, LinearOperator
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
from diffinv_pl.utils.random import GeneratorLike, randn

ANNEALING = ("main", "legacy")
LIKELIHOODS = ("main", "legacy")
MCMC = ("langevin", "hmc")
X0_HAT = ("ode", "tweedie")

# DAPS-1K pixel MCMC constants per task (configs/task/*.yaml of zhangbingliang2019/DAPS; methods.md §5.3), tau = 0.01.
# Langevin ("pixel"): (L, lr, lr_min_ratio).
PIXEL_LANGEVIN: dict[str, tuple[int, float, float]] = {
    "phase_retrieval": (100, 5e-5, 0.01),
    "down_sampling": (100, 1e-4, 0.01),
    "inpainting": (100, 5e-5, 0.01),
    "inpainting_rand": (100, 1e-4, 0.01),
    "gaussian_blur": (100, 1e-4, 0.01),
    "motion_blur": (100, 5e-5, 0.01),
    "nonlinear_blur": (200, 1e-5, 0.01),
    "hdr": (100, 2e-5, 0.01),
}
# HMC ("pixel_hmc", W&B-sweep tuned): (L, lr, lr_min_ratio, momentum).
PIXEL_HMC: dict[str, tuple[int, float, float, float]] = {
    "phase_retrieval": (62, 9.75e-6, 0.019, 0.73),
    "down_sampling": (12, 1.04e-4, 0.012, 0.90),
    "inpainting": (84, 1.15e-5, 0.014, 0.003),
    "inpainting_rand": (11, 3.56e-5, 0.015, 0.80),
    "gaussian_blur": (82, 4.04e-5, 0.011, 0.10),
    "motion_blur": (96, 3.69e-5, 0.01, 0.11),
    "nonlinear_blur": (85, 1.20e-5, 0.012, 0.46),
    "hdr": (100, 2.18e-5, 0.013, 0.23),
}

# (x0_hat, x_k, sigma_k, k) -> a draw of x0 given x_k (and y)
InnerSampler = Callable[[Tensor, Tensor, float, int], Tensor]


def annealing_sigmas(
    sigma_max: float, sigma_min: float, num_levels: int, rho: float = 7.0, annealing: str = "main"
) -> list[float]:
    """The K annealing levels followed by 0 (K + 1 numbers, decreasing). ``main``: K + 1 poly-rho points from
    sigma_max to sigma_min with sigma_min dropped; ``legacy``: K poly-rho points ending at sigma_min."""
    _check_grid(sigma_max, sigma_min, num_levels, rho, annealing)
    if annealing == "main":
        levels = edm_sigmas(num_levels + 1, sigma_min, sigma_max, rho)[:-1].tolist()
    else:
        levels = edm_sigmas(num_levels, sigma_min, sigma_max, rho).tolist() if num_levels > 1 else [float(sigma_max)]
    levels[0] = float(sigma_max)  # exactly (the start's std), not the rounded poly-rho value
    return [*levels, 0.0]


def ode_sigmas(sigma: float, sigma_ode_min: float, ode_steps: int, rho: float = 7.0, annealing: str = "main") -> list[float]:
    """The S + 1 noise levels of the per-level ODE solve from ``sigma``: poly-rho down to sigma_ode_min (main), or
    S poly-rho points to sigma_ode_min then 0 (legacy)."""
    if annealing == "main":
        levels = edm_sigmas(ode_steps + 1, sigma_ode_min, sigma, rho).tolist()
    else:
        levels = [*(edm_sigmas(ode_steps, sigma_ode_min, sigma, rho).tolist() if ode_steps > 1 else [sigma]), 0.0]
    levels[0] = float(sigma)
    return levels


def _check_grid(sigma_max: float, sigma_min: float, num_levels: int, rho: float, annealing: str) -> None:
    if annealing not in ANNEALING:
        raise UserError(f"DAPS: unknown annealing {annealing!r}; valid: {', '.join(ANNEALING)}")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise UserError(f"DAPS: num_levels must be an integer >= 1, got {num_levels!r}")
    if not (math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise UserError(
            f"DAPS: the annealing grid needs 0 < sigma_min < sigma_max (finite), got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max}"
        )
    if not (math.isfinite(rho) and rho > 0):
        raise UserError(f"DAPS: rho must be > 0, got {rho}")


def _event_shape_weight(problem: InverseProblem, weight: Tensor) -> Tensor:
    """A weight given per measurement batch (shape broadcastable to y's batch shape) gets trailing event dims."""
    batch_ndim = len(problem.y_batch_shape)
    if weight.ndim <= batch_ndim:
        weight = weight.reshape(*weight.shape, *([1] * len(problem.operator.out_shape)))
    return weight


def likelihood_weight(problem: InverseProblem, tau: float, tau_relative: bool, likelihood: str) -> Tensor:
    """c / tau_eff^2 (c = 1 main, 1/2 legacy), broadcastable against A(x) - y. Raises UserError for tau_eff <= 0."""
    y, dtype = problem.y, problem.state_dtype
    if not (math.isfinite(tau) and tau > 0):
        raise UserError(f"DAPS: the likelihood temperature tau must be > 0 (and finite), got {tau}")
    tau_eff = torch.as_tensor(tau, dtype=dtype, device=y.device)
    if tau_relative:
        sigma_y = torch.as_tensor(problem.sigma_y, dtype=dtype, device=y.device)
        if bool((sigma_y <= 0).any()):
            raise UserError("DAPS: tau_relative needs sigma_y > 0 (tau is read in units of sigma_y); set tau_relative=false")
        tau_eff = tau_eff * _event_shape_weight(problem, sigma_y)
    scale = 1.0 if likelihood == "main" else 0.5
    return scale / tau_eff**2


def likelihood_gradient(
    problem: InverseProblem, prior: Prior, x0: Tensor, weight: Tensor | float, grad_clip: float | None = None
) -> Tensor:
    """grad_{x0} sum weight * (A(decode x0) - y)^2 (one operator forward and one backward), optionally clipped
    elementwise to [-grad_clip, grad_clip]. For a linear operator and a pixel prior (decode = identity) it is the
    closed form 2 A^T (weight (A x0 - y)), without building an autograd graph (the same operator calls, less time:
    experiments/solvers/README.md); otherwise autograd through decode and the operator."""
    operator = problem.operator
    if isinstance(operator, LinearOperator) and type(prior).decode is Prior.decode:
        with torch.no_grad():
            grad = operator.adjoint((operator(x0) - problem.y).mul_(2 * weight))
    else:
        with torch.enable_grad():
            x = x0.detach().requires_grad_(True)
            residual = operator(prior.decode(x)) - problem.y
            loss = (weight * residual.pow(2)).sum()
            (grad,) = torch.autograd.grad(loss, x)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad


def daps_mcmc(
    problem: InverseProblem,
    prior: Prior,
    x0_hat: Tensor,
    sigma: float,
    *,
    mcmc: str = "langevin",
    steps: int = 100,
    lr: float = 1e-4,
    momentum: float = 0.0,
    weight: Tensor | float = 1e4,
    grad_clip: float | None = None,
    generator: GeneratorLike = None,
) -> Tensor:
    """DAPS's inner chain on N(x0; x0_hat, sigma^2 I) exp(-sum weight (A(decode x0) - y)^2), started at x0_hat:
    ``steps`` Langevin or HMC steps of size ``lr`` (module docstring; a tensor ``lr`` broadcast against the state
    gives one step size per row). Returns the last state."""
    x0_hat = x0_hat.detach()
    x = x0_hat.clone()
    prec = 1.0 / sigma**2
    v = randn(x.shape, generator, x.dtype, x.device) if mcmc == "hmc" else None
    root_lr = lr.sqrt() if isinstance(lr, Tensor) else math.sqrt(lr)
    root_2lr = (2 * lr).sqrt() if isinstance(lr, Tensor) else math.sqrt(2 * lr)
    for _ in range(steps):
        score = (x0_hat - x).mul_(prec).sub_(likelihood_gradient(problem, prior, x, weight, grad_clip))
        noise = randn(x.shape, generator, x.dtype, x.device)
        if v is None:  # Langevin: x + lr s + sqrt(2 lr) n
            x = _add_scaled(_add_scaled(x, score, lr), noise, root_2lr)
        else:  # HMC: v <- m v + sqrt(lr) s + sqrt(2 (1 - m)) n, x <- x + sqrt(lr) v
            v = _add_scaled(v.mul_(momentum), score, root_lr).add_(noise, alpha=math.sqrt(2 * (1 - momentum)))
            x = _add_scaled(x, v, root_lr)
    return x


def _add_scaled(x: Tensor, y: Tensor, a: float | Tensor) -> Tensor:
    """x += a y in place, for a float ``a`` or a tensor broadcast against ``y`` (one value per row); y unchanged."""
    return x.addcmul_(y, a) if isinstance(a, Tensor) else x.add_(y, alpha=a)


def relative_step_scale(problem: InverseProblem, weight: Tensor, state_ndim: int) -> Callable[[float], Tensor]:
    """sigma_k -> 1 / L_k with L_k = 1 / sigma_k^2 + 2 weight ||A||^2, the largest precision of the inner target
    N(x0_hat, sigma_k^2 I) exp(-weight ||A x0 - y||^2) (``lr_relative``); shaped (batch, 1, ..., 1) against a
    state of ``state_ndim`` dimensions. Needs a linear operator (:func:`check_daps_hyperparameters` refuses others)."""
    operator = problem.operator
    squared_norm = operator.norm() ** 2
    batch = weight.reshape(weight.shape[: weight.ndim - len(operator.out_shape)])
    batch = batch.reshape(*batch.shape, *([1] * (state_ndim - batch.ndim)))

    def scale(sigma: float) -> Tensor:
        return 1.0 / (1.0 / sigma**2 + 2 * batch * squared_norm)

    return scale


def daps_annealing(
    problem: InverseProblem,
    prior: Prior,
    inner: InnerSampler,
    *,
    sigmas: list[float],
    ode_steps: int = 5,
    sigma_ode_min: float = 0.01,
    rho: float = 7.0,
    annealing: str = "main",
    x0_hat: str = "ode",
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
    counted: CountingDenoiser | None = None,
) -> SolverResult:
    """The DAPS annealing loop over ``sigmas`` (K levels then 0) with the inner sampler ``inner(x0_hat, x_k,
    sigma_k, k)`` (the MCMC in :func:`daps`, or an exact draw in tests). Starts from sigma_0 N(0, I) unless x_init.
    The callback gets step k, sigma_k, ``x`` (the re-noised state), ``denoised`` (x0_hat) and ``x0`` (the draw)."""
    counted = counted if counted is not None else CountingDenoiser(prior)
    x = initial_state(problem, prior, sigmas[0], generator, x_init)
    num_levels = len(sigmas) - 1
    with cost_meter(problem, counted) as cost:
        for k in range(num_levels):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            if x0_hat == "tweedie":
                estimate = counted(x, torch.as_tensor(sigma, dtype=x.dtype, device=x.device), generator=generator)
            else:
                estimate = x
                levels = ode_sigmas(sigma, sigma_ode_min, ode_steps, rho, annealing)
                for s, s_next in zip(levels[:-1], levels[1:]):
                    denoised = counted(estimate, torch.as_tensor(s, dtype=x.dtype, device=x.device), generator=generator)
                    estimate = euler_step(estimate, denoised, s, s_next)
            check_finite(estimate, "DAPS x0_hat (probability-flow ODE)", k, sigma, "check the denoiser (prior)")
            x0 = inner(estimate, x, sigma, k)
            check_finite(
                x0, "DAPS MCMC sample x0", k, sigma,
                "reduce lr (the step must be below ~1/precision of the inner target), raise tau, or check the operator",
            )
            x = x0 + sigma_next * randn(x0.shape, generator, x0.dtype, x0.device) if sigma_next > 0 else x0
            if callback is not None:
                callback({"step": k, "sigma": sigma, "x": x, "denoised": estimate, "x0": x0})
        samples = prior.decode(x)
    return SolverResult(samples, cost)


def check_daps_hyperparameters(
    operator: ForwardOperator,
    *,
    num_levels: int,
    sigma_max: float,
    sigma_min: float,
    rho: float,
    annealing: str,
    ode_steps: int,
    sigma_ode_min: float,
    x0_hat: str,
    mcmc: str,
    mcmc_steps: int,
    lr: float,
    lr_min_ratio: float,
    lr_relative: bool,
    momentum: float,
    tau: float,
    tau_relative: bool,
    likelihood: str,
    grad_clip: float | None,
    task: str | None,
    **_: object,
) -> tuple[int, float, float, float]:
    """Refuse bad DAPS hyperparameters (UserError naming the setting) without running anything; returns the inner
    chain's (mcmc_steps, lr, lr_min_ratio, momentum) after ``task``'s DAPS-1K table. Called by :func:`daps` and, through
    ``daps.check_hyperparameters``, by the evaluation task before it writes anything."""
    if task is not None:
        table = PIXEL_LANGEVIN if mcmc == "langevin" else PIXEL_HMC
        if task not in table:
            raise UserError(f"DAPS: no DAPS-1K constants for task {task!r}; valid: {', '.join(table)} (or task=null)")
        if mcmc == "langevin":
            mcmc_steps, lr, lr_min_ratio = PIXEL_LANGEVIN[task]
        else:
            mcmc_steps, lr, lr_min_ratio, momentum = PIXEL_HMC[task]
    sigmas = annealing_sigmas(sigma_max, sigma_min, num_levels, rho, annealing)
    if isinstance(ode_steps, bool) or not isinstance(ode_steps, int) or ode_steps < 1:
        raise UserError(f"DAPS: ode_steps must be an integer >= 1, got {ode_steps!r}")
    if not 0 < sigma_ode_min < sigmas[num_levels - 1]:
        raise UserError(
            f"DAPS: sigma_ode_min must be in (0, {sigmas[num_levels - 1]:.4g}) (below the last annealing level), "
            f"got {sigma_ode_min}"
        )
    for name, value, valid in (("annealing", annealing, ANNEALING), ("likelihood", likelihood, LIKELIHOODS),
                               ("mcmc", mcmc, MCMC), ("x0_hat", x0_hat, X0_HAT)):
        if value not in valid:
            raise UserError(f"DAPS: unknown {name} {value!r}; valid: {', '.join(valid)}")
    if isinstance(mcmc_steps, bool) or not isinstance(mcmc_steps, int) or mcmc_steps < 0:
        raise UserError(f"DAPS: mcmc_steps must be an integer >= 0, got {mcmc_steps!r}")
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(lr_min_ratio) and lr_min_ratio > 0):
        raise UserError(f"DAPS: lr and lr_min_ratio must be > 0, got lr={lr}, lr_min_ratio={lr_min_ratio}")
    if not 0 <= momentum < 1:
        raise UserError(f"DAPS: the HMC momentum must be in [0, 1), got {momentum}")
    if grad_clip is not None and not grad_clip > 0:
        raise UserError(f"DAPS: grad_clip must be > 0 or null, got {grad_clip}")
    if not (math.isfinite(tau) and tau > 0):
        raise UserError(f"DAPS: the likelihood temperature tau must be > 0 (and finite), got {tau}")
    if lr_relative and not isinstance(operator, LinearOperator):
        raise UserError(
            f"DAPS: lr_relative needs a linear operator (its step unit uses ||A||), got {type(operator).__name__}; "
            "set lr_relative=false and give an absolute lr"
        )
    return mcmc_steps, lr, lr_min_ratio, momentum


def daps(
    problem: InverseProblem,
    prior: Prior,
    *,
    num_levels: int = 200,
    sigma_max: float = 100.0,
    sigma_min: float = 0.1,
    rho: float = 7.0,
    annealing: str = "main",
    ode_steps: int = 5,
    sigma_ode_min: float = 0.01,
    x0_hat: str = "ode",
    mcmc: str = "langevin",
    mcmc_steps: int = 100,
    lr: float = 1e-4,
    lr_min_ratio: float = 0.01,
    lr_relative: bool = False,
    momentum: float = 0.0,
    tau: float = 0.01,
    tau_relative: bool = False,
    likelihood: str = "main",
    grad_clip: float | None = None,
    task: str | None = None,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """Run DAPS; see the module docstring. Defaults: DAPS-1K pixel (``edm_daps``: K = 200, sigma 100 -> 0.1, S = 5,
    sigma_ode_min = 0.01; Langevin L = 100, lr = 1e-4, lr_min_ratio = 0.01, tau = 0.01 as for down_sampling and
    gaussian_blur). All inputs are checked (UserError) before any denoiser or operator call."""
    mcmc_steps, lr, lr_min_ratio, momentum = check_daps_hyperparameters(
        problem.operator, num_levels=num_levels, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho, annealing=annealing,
        ode_steps=ode_steps, sigma_ode_min=sigma_ode_min, x0_hat=x0_hat, mcmc=mcmc, mcmc_steps=mcmc_steps, lr=lr,
        lr_min_ratio=lr_min_ratio, lr_relative=lr_relative, momentum=momentum, tau=tau, tau_relative=tau_relative,
        likelihood=likelihood, grad_clip=grad_clip, task=task,
    )
    sigmas = annealing_sigmas(sigma_max, sigma_min, num_levels, rho, annealing)
    weight = likelihood_weight(problem, tau, tau_relative, likelihood)
    if not isinstance(weight, Tensor) or weight.ndim == 0:
        weight = torch.as_tensor(weight).reshape([1] * (len(problem.y_batch_shape) + len(problem.operator.out_shape)))
    state_ndim = len(problem.batch_shape) + len(prior.state_shape(problem.operator.in_shape))
    unit = relative_step_scale(problem, weight, state_ndim) if lr_relative else None
    decay_steps = num_levels + 1 if annealing == "main" else num_levels

    def inner(estimate: Tensor, x: Tensor, sigma: float, k: int) -> Tensor:
        step = lr * (1 + (k / decay_steps) * (lr_min_ratio - 1))
        if unit is not None:
            step = (step * unit(sigma)).to(dtype=estimate.dtype, device=estimate.device)
        return daps_mcmc(
            problem, prior, estimate, sigma, mcmc=mcmc, steps=mcmc_steps, lr=step, momentum=momentum,
            weight=weight, grad_clip=grad_clip, generator=generator,
        )

    return daps_annealing(
        problem, prior, inner, sigmas=sigmas, ode_steps=ode_steps, sigma_ode_min=sigma_ode_min, rho=rho,
        annealing=annealing, x0_hat=x0_hat, generator=generator, callback=callback, x_init=x_init,
    )


daps.check_hyperparameters = check_daps_hyperparameters  # type: ignore[attr-defined]
