"""CoDPS and CoDPS+ (Yismaw, Kamilov, Asif, "Gaussian is All You Need", arXiv 2409.08906; methods.md §0.5, §6).

Covariance-corrected Gaussian likelihood: p(x0 | x_t) is replaced by N(m_t, v_t I), the posterior of the forward-noise
likelihood and a Gaussian "prior" N(x0_hat, 1/inv_var I) centred at the network's estimate, so that

    p(y | x_t) ~ N(A mu, C),  C = sigma_y^2 I + v_t A A^T,  v_t = 1 / (1/sigma_t^2 + inv_var)

and the guidance J A^T C^-1 (y - A mu), J = v_t / (s_t sigma_t^2) (the scalar dm_t/dx_t), needs no backpropagation
through the network. In the grid's variables (state x_i = s_i (x0 + sigma_i n); on a VP grid s = sqrt(abar_t),
sigma^2 = (1 - abar_t)/abar_t, so 1/sigma^2 = abar/(1 - abar) and J = sqrt(abar)/(1 - abar) v_t as in the paper):

    for i = 0 .. N-1:
        x0_hat = D(x_i / s_i, sigma_i)                                  # no graph; optionally clipped
        x'     = s_{i+1} DDIM_eta(x_i / s_i -> sigma_{i+1})              # eta = 1: DDPM ancestral proposal
        CoDPS : mu = m = v_i (x' / (s_i sigma_i^2) + inv_var x0_hat)     # at the proposal, step-i coefficients
        CoDPS+: mu = x0_hat                         # released: no guidance on the final step, t = 0 (skip_last)
        x_{i+1} = x' + zeta_i J_i A^T C_i^-1 (y - A mu)

C^-1 is the operator's exact ``gram_inverse`` (FFT for circular blurs, the alias average for blur + stride SR, the
eigenbasis for bicubic SR, a diagonal for masks; dense matrices: :func:`dense_gram_inverse`, eigh of A A^T);
``gram_solver="cg"`` instead solves the Gram system by conjugate gradients to ``cg_tol`` (stated fallback for operators
without one; it costs one A and one A^T per iteration, counted, and raises if it does not converge). Operators without an exact Gram inverse, and reflect-padded blurs (whose ``gram_inverse`` is only
the circulant model), are refused before sampling in ``exact`` mode. sigma_y is floored at ``sigma_y_floor`` (1e-5 in
the released CoDPS+); a per-problem sigma_y is supported (C^-1 = sigma^-2 (I + v/sigma^2 A A^T)^-1 per row).

Step sizes: ``schedule="constant"`` (released code): zeta_i = scale, divided by div_ratio where the respaced step index
(N-1-i, i.e. t on the respaced grid) is < t_div. ``schedule="matched"``: zeta_i = scale * s_i s_{i+1} sigma_i
(sigma_i - sigma_down), the change of the DDIM(eta) step per unit change of x0_hat times the Tweedie factor
s_i sigma_i^2; on a VP grid with eta = 1 it is (abar_prev - abar_i) / sqrt(abar_i abar_prev) (methods.md §0.5). With
scale = 1, no div_ratio, and an isotropic Gaussian prior N(mu0, (1/inv_var) I), CoDPS+ adds exactly the likelihood
score and samples the posterior up to discretisation (tests/test_codps.py); CoDPS (DDPM) is biased there because
its mean m mixes the proposal x' (at level i+1) with level-i coefficients (``guidance_at="current"`` evaluates it at
x_i instead, a documented deviation from the released code).

Defaults (conf/solver/codps.yaml, codps_plus.yaml) are the FFHQ Gaussian-deblur configs of the released code; the
released code runs batch 1, this runs any batch (every quantity is per row).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.diffusion.steps import ddim_noise_levels, ddim_step
from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator, LinearOperator, conjugate_gradient
from diffinv_pl.operators.matrix import MatrixOperator
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

SCHEDULES = ("constant", "matched")
GRAM_SOLVERS = ("exact", "cg")
GUIDANCE_AT = ("proposal", "current")


def check_codps_hyperparameters(
    operator: ForwardOperator,
    *,
    scale: float,
    t_div: int,
    div_ratio: float,
    inv_var: float,
    eta: float,
    schedule: str,
    gram_solver: str,
    cg_tol: float,
    cg_max_iter: int,
    sigma_y_floor: float,
    clip_denoised: tuple[float, float] | None,
    guidance_at: str = "proposal",
    name: str = "CoDPS",
    **_: object,
) -> None:
    """Refuse bad CoDPS/CoDPS+ hyperparameters, a nonlinear operator and (``gram_solver: exact``) an operator without
    an exact Gram inverse, with a UserError naming the setting, without running anything. Called by the solvers and,
    through ``codps.check_hyperparameters``, by the evaluation task before it writes anything."""
    if schedule not in SCHEDULES:
        raise UserError(f"{name}: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if gram_solver not in GRAM_SOLVERS:
        raise UserError(f"{name}: unknown gram_solver {gram_solver!r}; valid: {', '.join(GRAM_SOLVERS)}")
    if guidance_at not in GUIDANCE_AT:
        raise UserError(f"{name}: unknown guidance_at {guidance_at!r}; valid: {', '.join(GUIDANCE_AT)}")
    values = {"scale": (scale, 0, True), "t_div": (t_div, 0, True), "div_ratio": (div_ratio, 0, False),
              "inv_var": (inv_var, 0, True), "eta": (eta, 0, True), "cg_tol": (cg_tol, 0, False),
              "cg_max_iter": (cg_max_iter, 1, True), "sigma_y_floor": (sigma_y_floor, 0, False)}
    bad = [
        f"{k} {'>=' if closed else '>'} {lo} (got {val})" for k, (val, lo, closed) in values.items()
        if not (math.isfinite(float(val)) and (val >= lo if closed else val > lo))
    ]
    if bad:
        raise UserError(f"{name}: bad hyperparameters, need {'; '.join(bad)}")
    if clip_denoised is not None and not (len(clip_denoised) == 2 and clip_denoised[0] < clip_denoised[1]):
        raise UserError(f"{name}: clip_denoised must be [lo, hi] with lo < hi, got {clip_denoised}")
    if not isinstance(operator, LinearOperator):
        raise UserError(
            f"{name} needs a linear operator with an adjoint and a Gram inverse, but {type(operator).__name__} is "
            "nonlinear: use a diffusion solver such as solver=dps or solver=daps for this operator"
        )
    if gram_solver != "exact":
        return
    if getattr(operator, "boundary", None) == "reflect":
        raise UserError(
            f"{name}: the Gram inverse of a reflect-padded {type(operator).__name__} is only the circulant approximation; "
            "use the circular operator (e.g. operator=gaussian_blur_circular, as the CoDPS code does) or "
            "solver.gram_solver=cg (conjugate gradients on the exact Gram system)"
        )
    if type(operator).gram_inverse is LinearOperator.gram_inverse and not isinstance(operator, MatrixOperator):
        raise UserError(
            f"{name}: {type(operator).__name__} has no exact (sigma_y^2 I + v A A^T)^-1; use solver.gram_solver=cg "
            "(conjugate gradients on the Gram system) or an operator whose A A^T is diagonalisable (identity, masks, "
            "circular blurs, blur + stride SR)"
        )


def check_codps_operator(name: str, problem: InverseProblem, gram_solver: str) -> None:
    """Probe the operator's exact Gram inverse on a zero measurement (``gram_solver: exact``): refuse one that raises
    or returns NaN/Inf, before sampling. Raises :class:`UserError`."""
    if gram_solver != "exact":
        return
    try:
        probe = _gram_call(problem.operator, torch.zeros_like(problem.y, dtype=problem.state_dtype), 1.0, 1.0)
    except TypeError as err:
        raise UserError(
            f"{name}: {err}. Use solver.gram_solver=cg (conjugate gradients on the Gram system) or another operator"
        ) from err
    if not bool(torch.isfinite(probe).all()):
        raise UserError(f"{name}: the operator's Gram inverse returns NaN/Inf; check how the operator was built")


def dense_gram_inverse(op: MatrixOperator, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
    """(sigma_y^2 I + v A A^T)^-1 y for a dense operator, exact: A A^T = U diag(lam) U^T by ``eigh`` (dy x dy, one per
    problem). ``v`` is a scalar or one value per row of y (y's batch shape). A NaN/Inf matrix raises ValueError.

    (``MatrixOperator.gram_inverse`` itself still raises TypeError, which tests/test_image_operators.py relies on; this
    could move there.)"""
    if not bool(torch.isfinite(op.matrix).all()):
        raise ValueError("MatrixOperator: the matrix contains NaN/Inf values (Gram inverse for CoDPS)")
    mat = op.matrix.to(y.dtype)
    lam, U = torch.linalg.eigh(mat @ mat.transpose(-1, -2))  # (dy,), (dy, dy) or (P, dy), (P, dy, dy)
    lam = lam.clamp(min=0)
    if mat.ndim == 3:  # broadcast (P, dy) over the middle batch dimensions of y (P, ..., dy)
        lam = lam.reshape(lam.shape[0], *([1] * (y.ndim - 2)), lam.shape[-1])
    if torch.is_tensor(v) and v.ndim:
        v = v.to(y.dtype).reshape(y.shape[:-1]).unsqueeze(-1)
    # U^T y per row is y @ U, i.e. op._apply(U^T, y); U z is op._apply(U, z)
    return op._apply(U, op._apply(U.transpose(-1, -2), y) / (sigma_y**2 + v * lam))


def _gram_call(op: LinearOperator, r: Tensor, sigma: float, v: Tensor | float) -> Tensor:
    """The exact Gram inverse on r of shape batch + out_shape with v a scalar or one value per row (batch shape). Image
    operators take flat (B, ...) batches with one v per row; a dense operator keeps its own batch layout. Counted in
    the operator's ``gram_calls``."""
    op.gram_calls += 1
    if isinstance(op, MatrixOperator):
        return dense_gram_inverse(op, r, sigma, v)
    out_shape = tuple(op.out_shape)
    flat = r.reshape(-1, *out_shape)
    v_flat = v.reshape(-1) if torch.is_tensor(v) and v.ndim else v  # one v per flat row
    return op.gram_inverse(flat, sigma, v_flat).reshape(r.shape)


def _gram_cg(
    op: LinearOperator, r: Tensor, c: Tensor | float, tol: float, max_iter: int
) -> tuple[Tensor, bool]:
    """Solve (I + c A A^T) z = r per row by conjugate gradients (SPD, eigenvalues >= 1); returns (z, converged)."""
    nd = len(op.out_shape)
    c_b = c.reshape(*c.shape, *([1] * nd)) if torch.is_tensor(c) and c.ndim else c
    return conjugate_gradient(lambda p: p + c_b * op(op.adjoint(p)), r, nd, tol, max_iter)


def _codps(
    variant: str,
    problem: InverseProblem,
    prior: Prior,
    *,
    grid: SamplingGrid,
    scale: float,
    t_div: int,
    div_ratio: float,
    inv_var: float,
    eta: float,
    schedule: str,
    guidance_at: str,
    clip_denoised: tuple[float, float] | None,
    gram_solver: str,
    cg_tol: float,
    cg_max_iter: int,
    sigma_y_floor: float,
    skip_last: bool,
    generator: GeneratorLike,
    callback: Callback | None,
    x_init: Tensor | None,
) -> SolverResult:
    name = "CoDPS" if variant == "codps" else "CoDPS+"
    check_codps_hyperparameters(
        problem.operator, scale=scale, t_div=t_div, div_ratio=div_ratio, inv_var=inv_var, eta=eta, schedule=schedule,
        gram_solver=gram_solver, cg_tol=cg_tol, cg_max_iter=cg_max_iter, sigma_y_floor=sigma_y_floor,
        clip_denoised=clip_denoised, guidance_at=guidance_at, name=name,
    )
    check_codps_operator(name, problem, gram_solver)
    data_shape = tuple(problem.operator.in_shape)
    if tuple(prior.state_shape(data_shape)) != data_shape:
        raise UserError(f"{name} works in data space; a prior whose state is not the image (state shape "
                        f"{prior.state_shape(data_shape)}: a latent prior, or a patch prior on its padded canvas) is not "
                        "supported: use DPS/DAPS, or prior.canvas_state=false for a patch prior")
    x_init = initial_state(problem, prior, grid.init_std, generator, x_init)
    op: LinearOperator = problem.operator  # type: ignore[assignment]
    dtype, device = x_init.dtype, x_init.device
    batch = tuple(problem.batch_shape)
    sig_y = torch.as_tensor(problem.sigma_y, dtype=dtype, device=device).clamp(min=sigma_y_floor)
    per_row = sig_y.numel() > 1
    if per_row:  # one sigma_y per state row: C^-1 r = sigma^-2 (I + v / sigma^2 A A^T)^-1 r
        sig2 = problem.sigma_y_per_state(dtype, device).clamp(min=sigma_y_floor).clone() ** 2
        sig2_b = sig2.reshape(*batch, *([1] * len(op.out_shape)))
    y = problem.y.to(dtype)
    counted = CountingDenoiser(prior)
    sigmas, scales = grid.sigmas.tolist(), grid.scales.tolist()
    n = grid.num_steps
    with cost_meter(problem, counted) as cost, torch.no_grad():
        x = x_init
        for i in range(n):
            sigma, sigma_next, s, s_next = sigmas[i], sigmas[i + 1], scales[i], scales[i + 1]
            u = x / s
            denoised = counted(u, torch.as_tensor(sigma, dtype=dtype, device=device), generator=generator)
            if clip_denoised is not None:
                denoised = denoised.clamp(*clip_denoised)
            proposal = ddim_step(u, denoised, sigma, sigma_next, eta, generator).mul_(s_next)
            v = sigma**2 / (1.0 + inv_var * sigma**2)  # Var of the Gaussian p(x0 | x_i)
            jac = v / (s * sigma**2)  # d m / d x_i = sqrt(abar)/(1 - abar) v on a VP grid
            if variant == "codps":
                at = proposal if guidance_at == "proposal" else x
                mu = v * (at / (s * sigma**2) + inv_var * denoised)
            else:
                mu = denoised
            residual = y - op(mu)
            # A NaN/Inf denoiser, state or operator shows up here (cheaper than checking the state).
            check_finite(residual, f"{name} residual", i, sigma, f"reduce scale (now {scale}) or check the denoiser and operator")
            if schedule == "constant":
                zeta = scale / div_ratio if (n - 1 - i) < t_div else scale
            else:
                sigma_down = float(ddim_noise_levels(torch.tensor(sigma), torch.tensor(sigma_next), eta)[0])
                zeta = scale * s * s_next * sigma * (sigma - sigma_down)
                if (n - 1 - i) < t_div:
                    zeta /= div_ratio
            if skip_last and sigma_next == 0:
                zeta = 0.0  # the released CoDPS+ skips the guidance at t = 0
            if zeta != 0.0:
                if per_row:
                    c = v / sig2
                    if gram_solver == "exact":
                        w = _gram_call(op, residual, 1.0, c) / sig2_b
                    else:
                        z, ok = _gram_cg(op, residual, c, cg_tol, cg_max_iter)
                        w = z / sig2_b
                else:
                    s2 = float(sig_y) ** 2
                    if gram_solver == "exact":
                        w = _gram_call(op, residual, float(sig_y), v)
                    else:
                        z, ok = _gram_cg(op, residual, v / s2, cg_tol, cg_max_iter)
                        w = z / s2
                if gram_solver == "cg" and not ok:
                    raise RuntimeError(
                        f"{name}: conjugate gradients on the Gram system did not reach cg_tol={cg_tol} in "
                        f"{cg_max_iter} iterations at step {i} (sigma={sigma:.4g}); raise solver.cg_max_iter"
                    )
                x = proposal.add_(op.adjoint(w), alpha=zeta * jac)
            else:
                x = proposal
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised, "zeta": zeta,
                          "residual": op.residual_norm(residual)})
        check_finite(x, f"{name} state", n - 1, sigmas[-2], f"reduce scale (now {scale})")
        samples = prior.decode(x)
    return SolverResult(samples, cost)


def codps(
    problem: InverseProblem,
    prior: Prior,
    *,
    grid: SamplingGrid,
    scale: float = 0.01,
    t_div: int = 200,
    div_ratio: float = 10.0,
    inv_var: float = 0.1,
    eta: float = 1.0,
    schedule: str = "constant",
    guidance_at: str = "proposal",
    clip_denoised: tuple[float, float] | None = None,
    gram_solver: str = "exact",
    cg_tol: float = 1e-8,
    cg_max_iter: int = 500,
    sigma_y_floor: float = 1e-5,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """CoDPS (DDPM): guidance with m_t built from the unconditional proposal (module docstring). Defaults: FFHQ DDPM
    Gaussian deblur (scale 0.01, t_div 200, div_ratio 10, inv_var 0.1; the paper runs 1000 DDPM steps)."""
    return _codps(
        "codps", problem, prior, grid=grid, scale=scale, t_div=t_div, div_ratio=div_ratio, inv_var=inv_var, eta=eta,
        schedule=schedule, guidance_at=guidance_at, clip_denoised=clip_denoised, gram_solver=gram_solver,
        cg_tol=cg_tol, cg_max_iter=cg_max_iter, sigma_y_floor=sigma_y_floor, skip_last=False, generator=generator,
        callback=callback, x_init=x_init,
    )


def codps_plus(
    problem: InverseProblem,
    prior: Prior,
    *,
    grid: SamplingGrid,
    scale: float = 0.05,
    t_div: int = 15,
    div_ratio: float = 10.0,
    inv_var: float = 1.0,
    eta: float = 1.0,
    schedule: str = "constant",
    clip_denoised: tuple[float, float] | None = None,
    gram_solver: str = "exact",
    cg_tol: float = 1e-8,
    cg_max_iter: int = 500,
    sigma_y_floor: float = 1e-5,
    skip_last: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """CoDPS+ (DDIM, eta = 1): guidance at x0_hat with the scalar Jacobian (module docstring). Defaults: FFHQ DDIM
    Gaussian deblur (scale 0.05, t_div 15, div_ratio 10, inv_var 1; the paper runs 100 DDIM steps, ddim100)."""
    return _codps(
        "codps_plus", problem, prior, grid=grid, scale=scale, t_div=t_div, div_ratio=div_ratio, inv_var=inv_var,
        eta=eta, schedule=schedule, guidance_at="proposal", clip_denoised=clip_denoised, gram_solver=gram_solver,
        cg_tol=cg_tol, cg_max_iter=cg_max_iter, sigma_y_floor=sigma_y_floor, skip_last=skip_last, generator=generator,
        callback=callback, x_init=x_init,
    )


codps.needs_linear_operator = True  # type: ignore[attr-defined]
codps_plus.needs_linear_operator = True  # type: ignore[attr-defined]
codps.check_hyperparameters = functools.partial(check_codps_hyperparameters, name="CoDPS")  # type: ignore[attr-defined]
codps_plus.check_hyperparameters = functools.partial(check_codps_hyperparameters, name="CoDPS+")  # type: ignore[attr-defined]
