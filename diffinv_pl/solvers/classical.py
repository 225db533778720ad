"""Non-learned reference solvers on the same contract, so every results table has a classical row.

* :func:`pseudo_inverse`: x = A^+ y with the operator's own pinv (exact where cheap, FBP for CT, CG otherwise).
* :func:`bicubic_upsampling`: x = bicubic interpolation of y to the operator's input size (the classical
  super-resolution baseline of ReSample/DPS-style tables), for operators whose output is the input down-sampled by an
  integer factor.
* :func:`tv_least_squares`: total-variation regularised least squares

      min_x  1/2 ||A x - y||^2 + lam * TV(x)      (optionally subject to x in the operator's input range)

  with isotropic TV(x) = sum_pixels ||grad x||_2 (forward differences, per channel), solved by the primal-dual
  hybrid gradient method (Chambolle & Pock 2011) with K = (A, grad), step sizes tau = sigma = 0.99 / ||K||,
  ||K||^2 <= ||A||^2 + 8 (||A|| by the operator's power method), started from zero (or from ``x_init``).

All ignore the prior (pass ``None``) and use no randomness: they are the baselines.
"""

from __future__ import annotations

import torch
from torch import Tensor

import torch.nn.functional as F

from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator, LinearOperator
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


def upsampling_factor(operator: ForwardOperator) -> int:
    """The integer factor s of an operator mapping (C, s h, s w) images to (C, h, w) measurements; UserError otherwise."""
    a, b = tuple(operator.in_shape), tuple(operator.out_shape)
    ok = len(a) == 3 and len(b) == 3 and a[0] == b[0] and b[1] > 0 and b[2] > 0
    ok = ok and a[1] % b[1] == 0 and a[1] // b[1] == a[2] // b[2] and a[2] % b[2] == 0 and a[1] > b[1]
    if not ok:
        raise UserError(
            f"solver=bicubic up-samples a low-resolution measurement, but {type(operator).__name__} maps {a} to {b}: "
            "use it with a super-resolution operator (operator=sr_bicubic or sr_blur_stride), or solver=pinv/tv"
        )
    return a[1] // b[1]


def bicubic_upsampling(
    problem: InverseProblem,
    prior: Prior | None = None,
    *,
    clamp: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """x = bicubic(y) up-sampled by the operator's factor s (``torch.nn.functional.interpolate``, mode ``bicubic``,
    Keys a = -0.75, ``align_corners=False``: pixel centres at (i + 1/2) / s), clamped to the operator's input range
    when ``clamp``. No operator call, no initial state (``x_init`` is refused)."""
    factor = upsampling_factor(problem.operator)
    if x_init is not None:
        raise ValueError("bicubic_upsampling has no initial state; do not pass x_init")
    op = problem.operator
    shape = (*problem.batch_shape, *op.in_shape)
    with cost_meter(problem) as cost:
        y = problem.y.to(problem.state_dtype)
        flat = y.reshape(-1, *op.out_shape)
        x = F.interpolate(flat, scale_factor=factor, mode="bicubic", align_corners=False).reshape(*y.shape[:-3], *op.in_shape)
        if clamp and op.input_range is not None:
            x = x.clamp(*op.input_range)
        x = x.expand(shape).clone()
        check_finite(x, "bicubic up-sampling", 0, 0.0, "check the measurement")
        if callback is not None:
            callback({"step": 0, "x": x})
    return SolverResult(x, cost)


def _check_bicubic(operator: ForwardOperator, **_: object) -> None:
    upsampling_factor(operator)


bicubic_upsampling.check_hyperparameters = _check_bicubic
bicubic_upsampling.needs_prior = False


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
