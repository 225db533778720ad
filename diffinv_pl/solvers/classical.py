"""Non-learned reference solvers on the same contract, so every results table has a classical row.

* :func:`pseudo_inverse`: x = A^+ y with the operator's own pinv (exact where cheap, FBP for CT, CG otherwise).
* :func:`tv_least_squares`: total-variation regularised least squares

      min_x  1/2 ||A x - y||^2 + lam * TV(x)      (optionally subject to x in the operator's input range)

  with isotropic TV(x) = sum_pixels ||grad x||_2 (forward differences, per channel), solved by the primal-dual
  hybrid gradient method (Chambolle & Pock 2011) with K = (A, grad), step sizes tau = sigma = 0.99 / ||K||,
  ||K||^2 <= ||A||^2 + 8 (||A|| by the operator's power method), started from zero (or from ``x_init``).

Both ignore the prior (pass ``None``) and use no randomness: they are the baselines.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.operators.base import LinearOperator
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers.base import Callback, InverseProblem, SolverResult, check_finite, cost_meter
from diffinv_pl.utils.random import GeneratorLike


def _linear(problem: InverseProblem, solver: str) -> LinearOperator:
    if not isinstance(problem.operator, LinearOperator):
        raise TypeError(f"{solver} needs a linear operator with an adjoint, got {type(problem.operator).__name__}")
    return problem.operator


def pseudo_inverse(
    problem: InverseProblem,
    prior: Prior | None = None,
    *,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """x = A^+ y, one row per entry of ``problem.batch_shape`` (no initial state: ``x_init`` is refused)."""
    op = _linear(problem, "pseudo_inverse")
    if x_init is not None:
        raise ValueError("pseudo_inverse has no initial state; do not pass x_init")
    shape = (*problem.batch_shape, *op.in_shape)
    with cost_meter(problem) as cost:
        x = op.pinv(problem.y).to(problem.state_dtype).expand(shape).clone()
        check_finite(x, "pseudo-inverse", 0, 0.0, "check the operator and the measurement")
        if callback is not None:
            callback({"step": 0, "x": x})
    return SolverResult(x, cost)


def _grad(x: Tensor) -> Tensor:
    """Forward differences with a zero last row/column: (..., C, H, W) -> (..., C, 2, H, W)."""
    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    gy[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([gx, gy], dim=-3)


def _div(q: Tensor) -> Tensor:
    """Negative adjoint of :func:`_grad`: <grad x, q> = -<x, div q>."""
    qx, qy = q.unbind(dim=-3)
    dx = torch.zeros_like(qx)
    dy = torch.zeros_like(qy)
    dx[..., 0, :] = qx[..., 0, :]
    dx[..., 1:-1, :] = qx[..., 1:-1, :] - qx[..., :-2, :]
    dx[..., -1, :] = -qx[..., -2, :]
    dy[..., :, 0] = qy[..., :, 0]
    dy[..., :, 1:-1] = qy[..., :, 1:-1] - qy[..., :, :-2]
    dy[..., :, -1] = -qy[..., :, -2]
    return dx + dy


def tv_least_squares(
    problem: InverseProblem,
    prior: Prior | None = None,
    *,
    lam: float = 0.01,
    num_iterations: int = 300,
    box: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """TV-regularised least squares by PDHG (module docstring) for (..., C, H, W) images, started from zero (one
    image per entry of ``problem.batch_shape``) or from ``x_init``."""
    op = _linear(problem, "tv_least_squares")
    if not lam >= 0 or num_iterations < 1:
        raise ValueError(f"need lam >= 0 and num_iterations >= 1, got lam={lam}, num_iterations={num_iterations}")
    if len(op.in_shape) != 3:
        raise ValueError(f"TV needs image inputs (C, H, W), the operator takes {op.in_shape}")
    if x_init is None:
        x_init = torch.zeros((*problem.batch_shape, *op.in_shape), dtype=problem.state_dtype, device=problem.y.device)
    problem.check_state(x_init)
    lo, hi = op.input_range if (box and op.input_range is not None) else (None, None)
    with cost_meter(problem) as cost, torch.no_grad():
        step = 0.99 / (op.norm() ** 2 + 8.0) ** 0.5
        y = problem.y.to(x_init.dtype)
        x = x_init.clone()
        x_bar = x.clone()
        p = torch.zeros_like(op(x))
        q = torch.zeros_like(_grad(x))  # (..., C, 2, H, W)
        for i in range(num_iterations):
            p = (p + step * (op(x_bar) - y)) / (1.0 + step)
            q = q + step * _grad(x_bar)
            q = q / (q.norm(dim=-3, keepdim=True) / max(lam, 1e-30)).clamp(min=1.0)  # project on ||q_pixel|| <= lam
            x_new = x - step * (op.adjoint(p) - _div(q))
            check_finite(x_new, "TV iterate", i, 0.0, "check the operator norm and the measurement")
            if lo is not None:
                x_new = x_new.clamp(lo, hi)
            x_bar = 2 * x_new - x
            x = x_new
            if callback is not None:
                callback({"step": i, "x": x})
    return SolverResult(x, cost)


for _solver in (pseudo_inverse, tv_least_squares):
    _solver.needs_prior = False
    _solver.needs_linear_operator = True
