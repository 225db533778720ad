"""The PaDIS inverse solvers (Hu et al. 2024; jasonhu4/PaDIS ``inverse_nodist.py``; methods.md §3.4 and §0.5), on any
prior: with a patch prior (``PatchAssembledPrior``) every denoiser call draws a new patch-grid shift from the
solver's per-sample generators. All run on the Karras grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min
(rho 7), ``inner_steps`` steps per level; s(x) = (D(x, sigma) - x) / sigma^2 is the prior score.

``padis_dps`` (what PaDIS's ``main`` runs, "DPS inside annealed Langevin"; README 20-view CT: 100 levels, sigma
10 -> 0.003, zeta 0.3)::

    x = clamp(A^+ y)                                 # FBP / pseudo-inverse start (init: pinv), or sigma_max N(0, I)
    for each level sigma_i, alpha = langevin_scale sigma_i^2 (0.5 as released), inner_steps times:
        D = D(x, sigma_i); s = (D - x) / sigma_i^2   # D and s before the data update (as released)
        x = x - zeta grad_x ||y - A(decode D)||       # per image, the norm not squared, through the network
        x = x + (alpha / 2) s + sqrt(alpha) z         # no noise at the last level
    return clamp(decode x)

``padis_langevin`` (alpha = sigma_i^2; init sigma_max N(0, I))::

    D, s as above; with ddnm: D = A^+ y + D - A^+ A D (range-null-space; no separate data step, as released)
    otherwise the normalised data step x = x + zeta min(40, 200 sigma_i) / ||r|| A^T r, r = y - A(decode x)
    x = x + (alpha / 2) s + sqrt(alpha) z

``padis_pc`` (VE predictor-corrector; fixed as the issue asks: every level runs, down to sigma = 0, the score is
divided by the sigma it was evaluated at, any channel count; the released code runs N - 1 levels, divides D(sigma_i)
by sigma_{i+1}^2 and hard-codes 3 noise channels)::

    predictor  x = x + (sigma_i^2 - sigma_{i+1}^2) s_i + sqrt(sigma_i^2 - sigma_{i+1}^2) z
    data step  x = x + zeta / ||r|| A^T r
    corrector  (sigma_{i+1} > 0) eps = 2 snr ||z|| / ||s||  (not squared, as released); x = x + eps s + sqrt(2 eps) z,
               then x = x + zeta min(40, 200 sigma_{i+1}) / ||r|| A^T r

Data steps use grad_x of ||y - A(decode x)||^2 / 2 = -J_decode^T A^T r, so they act on the image part of any state
(a canvas or a pixel state). Norms are per image. ``clamp``: the prior's data range (PaDIS: [0, 1]). Every constant of
the released code is an argument (conf/solver/padis_*.yaml). A NaN/Inf raises ``FloatingPointError`` naming the
solver, the level and sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import edm_sigmas
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

INITS = ("pinv", "noise")


def padis_levels(num_levels: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> list[float]:
    """The Karras grid sigma_max -> sigma_min with ``num_levels`` points (sigma_min included, no final zero)."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise UserError(f"PaDIS: num_levels must be an integer >= 2, got {num_levels!r}")
    if not (math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise UserError(f"PaDIS: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return edm_sigmas(num_levels, sigma_min, sigma_max, rho).tolist()


def check_padis_hyperparameters(
    operator: ForwardOperator,
    *,
    num_levels: int,
    sigma_max: float,
    sigma_min: float,
    rho: float = 7.0,
    inner_steps: int = 10,
    zeta: float = 1.0,
    init: str = "noise",
    ddnm: bool = False,
    snr: float = 0.16,
    langevin_scale: float = 0.5,
    **_: object,
) -> None:
    """Refuse bad PaDIS-solver hyperparameters (UserError naming the setting) without running anything."""
    padis_levels(num_levels, sigma_max, sigma_min, rho)
    if not (math.isfinite(langevin_scale) and langevin_scale > 0):
        raise UserError(f"PaDIS: langevin_scale must be > 0, got {langevin_scale}")
    if not (math.isfinite(rho) and rho > 0):
        raise UserError(f"PaDIS: rho must be > 0, got {rho}")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise UserError(f"PaDIS: inner_steps must be an integer >= 1, got {inner_steps!r}")
    if not (math.isfinite(zeta) and zeta >= 0):
        raise UserError(f"PaDIS: zeta must be >= 0, got {zeta}")
    if not (math.isfinite(snr) and snr > 0):
        raise UserError(f"PaDIS: the corrector snr must be > 0, got {snr}")
    if init not in INITS:
        raise UserError(f"PaDIS: unknown init {init!r}; valid: {', '.join(INITS)}")
    if (init == "pinv" or ddnm) and not isinstance(operator, LinearOperator):
        raise UserError(
            f"PaDIS: {'init=pinv' if init == 'pinv' else 'ddnm'} needs a linear operator with a pseudo-inverse, got "
            f"{type(operator).__name__}; use init=noise / ddnm=false or padis_dps"
        )


def _clamp(x: Tensor, prior: Prior, clamp: bool) -> Tensor:
    data_range = getattr(prior, "data_range", None)
    return x.clamp(*data_range) if clamp and data_range is not None else x


def _start(problem: InverseProblem, prior: Prior, init: str, std: float, clamp: bool, generator: GeneratorLike,
           x_init: Tensor | None) -> Tensor:
    """x_init, else clamp(A^+ y) in the prior's state space (init pinv), else std N(0, I)."""
    if x_init is None and init == "pinv":
        with torch.no_grad():
            x_init = prior.encode(_clamp(problem.operator.pinv(problem.y).to(problem.state_dtype), prior, clamp))
            x_init = x_init.expand(*problem.batch_shape, *x_init.shape[len(problem.y_batch_shape):]).clone()
    return initial_state(problem, prior, std, generator, x_init)


def _image_norms(t: Tensor, batch_ndim: int) -> Tensor:
    """Per-image L2 norms over the event dimensions, shaped to broadcast back against t."""
    flat = t.reshape(*t.shape[:batch_ndim], -1)
    return flat.norm(dim=-1).reshape(*t.shape[:batch_ndim], *([1] * (t.ndim - batch_ndim)))


def _data_gradient(problem: InverseProblem, prior: Prior, x: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x ||y - A(decode x)||^2 / 2 = -J^T A^T r, ||r|| per image shaped against x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        residual = problem.y - problem.operator(prior.decode(x))
        (grad,) = torch.autograd.grad(residual.pow(2).sum() / 2, x)
    batch_ndim = len(problem.batch_shape)
    r_norm = problem.operator.residual_norm(residual.detach())
    return grad, r_norm.reshape(*r_norm.shape, *([1] * (x.ndim - batch_ndim)))


def _normalised_data_step(problem: InverseProblem, prior: Prior, x: Tensor, size: float) -> Tensor:
    """x + size / ||r|| A^T r (per image; the released normalised step), r = y - A(decode x)."""
    grad, r_norm = _data_gradient(problem, prior, x)
    return x - size * grad / r_norm.clamp_min(torch.finfo(x.dtype).tiny)


def padis_dps(
    problem: InverseProblem,
    prior: Prior,
    *,
    num_levels: int = 100,
    sigma_max: float = 10.0,
    sigma_min: float = 0.003,
    rho: float = 7.0,
    inner_steps: int = 10,
    zeta: float = 0.3,
    langevin_scale: float = 0.5,
    init: str = "pinv",
    clamp: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """PaDIS's DPS inside annealed Langevin (module docstring); defaults: the README's 20-view CT run. NFE =
    num_levels * inner_steps, each with a backward pass through the network."""
    check_padis_hyperparameters(problem.operator, num_levels=num_levels, sigma_max=sigma_max, sigma_min=sigma_min,
                                rho=rho, inner_steps=inner_steps, zeta=zeta, init=init, langevin_scale=langevin_scale)
    sigmas = padis_levels(num_levels, sigma_max, sigma_min, rho)
    counted = CountingDenoiser(prior)
    with cost_meter(problem, counted) as cost:
        x = _start(problem, prior, init, sigma_max, clamp, generator, x_init).detach()
        for i, sigma in enumerate(sigmas):
            alpha = langevin_scale * sigma**2
            last = i == num_levels - 1
            for _ in range(inner_steps):
                with torch.enable_grad():
                    xg = x.requires_grad_(True)
                    denoised = counted(xg, torch.as_tensor(sigma, dtype=x.dtype, device=x.device), generator=generator)
                    residual = problem.operator.residual_norm(problem.y - problem.operator(prior.decode(denoised)))
                    (grad,) = torch.autograd.grad(residual.sum(), xg)
                score = (denoised.detach() - x.detach()) / sigma**2
                x = x.detach() - zeta * grad + (alpha / 2) * score
                if not last:
                    x = x + math.sqrt(alpha) * randn(x.shape, generator, x.dtype, x.device)
                check_finite(residual.detach(), "PaDIS-DPS residual", i, sigma,
                             f"reduce zeta (now {zeta}) or check the denoiser and operator")
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised.detach()})
        check_finite(x, "PaDIS-DPS state", num_levels - 1, sigma_min, f"reduce zeta (now {zeta})")
        samples = _clamp(prior.decode(x), prior, clamp)
    return SolverResult(samples, cost)


def padis_langevin(
    problem: InverseProblem,
    prior: Prior,
    *,
    num_levels: int = 100,
    sigma_max: float = 10.0,
    sigma_min: float = 0.003,
    rho: float = 7.0,
    inner_steps: int = 10,
    zeta: float = 1.0,
    ddnm: bool = False,
    init: str = "noise",
    clamp: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """PaDIS's annealed Langevin with the normalised data step, or its DDNM variant (module docstring)."""
    check_padis_hyperparameters(problem.operator, num_levels=num_levels, sigma_max=sigma_max, sigma_min=sigma_min,
                                rho=rho, inner_steps=inner_steps, zeta=zeta, init=init, ddnm=ddnm)
    data_shape = tuple(problem.operator.in_shape)
    if ddnm and tuple(prior.state_shape(data_shape)) != data_shape:
        raise UserError("PaDIS: ddnm mixes A^+ y into the denoised image, which needs a prior whose state is the image "
                        f"(state shape {prior.state_shape(data_shape)} != {data_shape}); use ddnm=false")
    sigmas = padis_levels(num_levels, sigma_max, sigma_min, rho)
    counted = CountingDenoiser(prior)
    op = problem.operator
    with cost_meter(problem, counted) as cost, torch.no_grad():
        x = _start(problem, prior, init, sigma_max, clamp, generator, x_init)
        pinv_y = op.pinv(problem.y).to(x.dtype) if ddnm else None
        for i, sigma in enumerate(sigmas):
            alpha = sigma**2
            for _ in range(inner_steps):
                denoised = counted(x, torch.as_tensor(sigma, dtype=x.dtype, device=x.device), generator=generator)
                if ddnm:  # range-null-space: A^+ y + (I - A^+ A) D
                    denoised = pinv_y + denoised - op.pinv(op(denoised))
                else:
                    x = _normalised_data_step(problem, prior, x, zeta * min(40.0, 200.0 * sigma))
                score = (denoised - x) / sigma**2
                x = x + (alpha / 2) * score + math.sqrt(alpha) * randn(x.shape, generator, x.dtype, x.device)
            check_finite(x, "PaDIS-Langevin state", i, sigma, f"reduce zeta (now {zeta}) or check the denoiser")
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised})
        samples = _clamp(prior.decode(x), prior, clamp)
    return SolverResult(samples, cost)


def padis_pc(
    problem: InverseProblem,
    prior: Prior,
    *,
    num_levels: int = 100,
    sigma_max: float = 10.0,
    sigma_min: float = 0.003,
    rho: float = 7.0,
    zeta: float = 1.0,
    snr: float = 0.16,
    init: str = "noise",
    clamp: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """PaDIS's VE predictor-corrector with normalised data steps, fixed (module docstring). NFE = 2 num_levels - 1."""
    check_padis_hyperparameters(problem.operator, num_levels=num_levels, sigma_max=sigma_max, sigma_min=sigma_min,
                                rho=rho, zeta=zeta, init=init, snr=snr)
    sigmas = [*padis_levels(num_levels, sigma_max, sigma_min, rho), 0.0]
    counted = CountingDenoiser(prior)
    batch_ndim = len(problem.batch_shape)

    def score(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        denoised = counted(x, torch.as_tensor(sigma, dtype=x.dtype, device=x.device), generator=generator)
        return (denoised - x) / sigma**2, denoised

    with cost_meter(problem, counted) as cost, torch.no_grad():
        x = _start(problem, prior, init, sigma_max, clamp, generator, x_init)
        for i in range(num_levels):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            s, denoised = score(x, sigma)
            variance = sigma**2 - sigma_next**2
            x = x + variance * s
            if sigma_next > 0:
                x = x + math.sqrt(variance) * randn(x.shape, generator, x.dtype, x.device)
            x = _normalised_data_step(problem, prior, x, zeta)
            if sigma_next > 0:  # corrector at the new level, then the scaled data step
                s, _ = score(x, sigma_next)
                z = randn(x.shape, generator, x.dtype, x.device)
                eps = 2 * snr * _image_norms(z, batch_ndim) / _image_norms(s, batch_ndim).clamp_min(torch.finfo(x.dtype).tiny)
                x = x + eps * s + (2 * eps).sqrt() * z
                x = _normalised_data_step(problem, prior, x, zeta * min(40.0, 200.0 * sigma_next))
            check_finite(x, "PaDIS-PC state", i, sigma, f"reduce zeta (now {zeta}) or snr (now {snr})")
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised})
        samples = _clamp(prior.decode(x), prior, clamp)
    return SolverResult(samples, cost)


for _solver in (padis_dps, padis_langevin, padis_pc):
    _solver.check_hyperparameters = check_padis_hyperparameters  # type: ignore[attr-defined]
