"""The solver contract: one call signature for every posterior sampler.

    result = solver(problem, denoiser, x_init, *, generator=..., callback=None, **hyperparameters)

* ``problem``: :class:`InverseProblem` (measurement ``y``, forward operator, noise level ``sigma_y``), validated once.
* ``denoiser``: any ``D(x, sigma) -> E[x0 | x]`` (learned network behind a preconditioning wrapper, or an analytic
  prior).
* ``x_init``: the initial state at the first grid point (see :meth:`SamplingGrid.initial_state`); its leading
  dimensions are the batch, and they must broadcast with ``y`` through the operator.
* ``generator``: the only source of randomness (no global seeds).
* ``callback``: called after every step with a dict ``{"step", "sigma", "x", "denoised"}`` (k-diffusion style).
* hyperparameters (the sampling grid included) are keyword arguments, bound from config with ``functools.partial``.

It returns :class:`SolverResult`: the samples plus :class:`SolverCost` counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from diffinv_pl.diffusion.preconditioning import Denoiser
from diffinv_pl.operators.base import ForwardOperator
from diffinv_pl.utils.random import GeneratorLike

Callback = Callable[[dict[str, Any]], None]


@dataclass
class InverseProblem:
    """y = A(x) + sigma_y n. ``sigma_y`` is a float or a tensor broadcastable to y's batch dimensions."""

    y: Tensor
    operator: ForwardOperator
    sigma_y: float | Tensor

    def __post_init__(self) -> None:
        self.operator.check_measurement(self.y)
        sigma_y = torch.as_tensor(self.sigma_y)
        if not bool(torch.isfinite(sigma_y).all()) or bool((sigma_y < 0).any()):
            raise ValueError(f"sigma_y must be finite and >= 0, got {self.sigma_y}")

    def check_state(self, x: Tensor) -> None:
        """Raise if a solver state of this shape does not fit the operator or broadcast with y."""
        self.operator.check_input(x)
        n_in, n_out = len(self.operator.in_shape), len(self.operator.out_shape)
        batch_x, batch_y = x.shape[: x.ndim - n_in], self.y.shape[: self.y.ndim - n_out]
        try:
            torch.broadcast_shapes(batch_x, batch_y)
        except RuntimeError as err:
            raise ValueError(
                f"solver state batch {tuple(batch_x)} does not broadcast with measurement batch {tuple(batch_y)}"
            ) from err
        if not bool(torch.isfinite(x).all()):
            raise ValueError("initial state contains NaN or Inf values")


@dataclass
class SolverCost:
    """Cost of one solver call: network (denoiser) evaluations, operator calls, wall time in seconds."""

    denoiser_calls: int = 0
    operator_forward_calls: int = 0
    operator_adjoint_calls: int = 0
    wall_time_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class SolverResult:
    samples: Tensor
    cost: SolverCost = field(default_factory=SolverCost)


class Solver(Protocol):
    def __call__(
        self,
        problem: InverseProblem,
        denoiser: Denoiser,
        x_init: Tensor,
        *,
        generator: GeneratorLike = None,
        callback: Callback | None = None,
    ) -> SolverResult: ...


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (one call = one batched network evaluation)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma)


@contextmanager
def cost_meter(problem: InverseProblem, denoiser: CountingDenoiser | None = None) -> Iterator[SolverCost]:
    """Fill a :class:`SolverCost` with the calls and wall time spent inside the ``with`` block."""
    op = problem.operator
    fwd0, adj0, start = op.forward_calls, getattr(op, "adjoint_calls", 0), time.perf_counter()
    cost = SolverCost()
    try:
        yield cost
    finally:
        cost.denoiser_calls = denoiser.calls if denoiser is not None else 0
        cost.operator_forward_calls = op.forward_calls - fwd0
        cost.operator_adjoint_calls = getattr(op, "adjoint_calls", 0) - adj0
        cost.wall_time_s = time.perf_counter() - start


def check_finite(value: Tensor, what: str, step: int, sigma: float, hint: str) -> None:
    """Raise FloatingPointError naming the step when a solver quantity becomes NaN/Inf."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{what} became NaN/Inf at step {step} (sigma={sigma:.4g}); {hint}")
