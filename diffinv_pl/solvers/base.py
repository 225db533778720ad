"""The solver contract: one call signature for every posterior sampler.

    result = solver(problem, prior, *, generator=None, callback=None, x_init=None, **hyperparameters)

* ``problem``: :class:`InverseProblem` (measurement ``y``, forward operator, noise level ``sigma_y`` and the batch
  shape of the solver state), validated once.
* ``prior``: a :class:`~diffinv_pl.priors.base.Prior` (analytic, whole-image network, patch-assembled, range-adapted,
  later latent); solvers call ``prior.denoise(x, sigma, generator=generator)`` and nothing else of a network.
  Classical solvers accept ``None``. Its state space may differ from the operator's input space (a latent): the
  operator always works on ``prior.decode(state)``.
* ``generator``: the only source of randomness (no global seeds): one ``torch.Generator`` or one per row of the
  leading batch dimension (see :mod:`diffinv_pl.utils.random`); the solver passes it on to the prior.
* ``x_init``: optional initial state. Without it the solver draws its own start from ``generator`` (diffusion
  solvers: ``prior.initial_state`` with the grid's ``init_std``, see :func:`initial_state`); classical solvers
  document what they start from.
* ``callback``: called after every step with a dict (k-diffusion style). Every solver gives ``"step"`` (int,
  0, 1, 2, ...) and ``"x"`` (the state after the step); diffusion solvers add ``"sigma"`` (the noise level the step
  started from) and ``"denoised"`` (the prior's estimate of x0 at that step); solvers may add more (DPS:
  ``"residual"``).
* hyperparameters (the sampling grid included) are keyword arguments, bound from config with ``functools.partial``;
  bad values raise ``ValueError`` before any denoiser or operator call.

It returns :class:`SolverResult`: the samples, in data (pixel) space with shape ``problem.batch_shape +
operator.in_shape``, plus :class:`SolverCost` counters. A NaN/Inf state raises ``FloatingPointError`` naming the step.
Every entry of :data:`diffinv_pl.solvers.SOLVERS` is checked against this contract by ``tests/test_solver_contract.py``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator, LinearOperator
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike

Callback = Callable[[dict[str, Any]], None]


@dataclass
class InverseProblem:
    """y = A(x) + sigma_y n. ``sigma_y`` is a float or a tensor broadcastable to y's batch dimensions.

    ``batch_shape`` is the batch shape of the solver state (default: y's batch shape, one state per measurement); it
    must broadcast with y's batch shape, e.g. ``(P, n)`` states for measurements of batch shape ``(P, 1)`` (n posterior
    samples per measurement).
    """

    y: Tensor
    operator: ForwardOperator
    sigma_y: float | Tensor
    batch_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.operator.check_measurement(self.y)
        sigma_y = torch.as_tensor(self.sigma_y)
        if not bool(torch.isfinite(sigma_y).all()) or bool((sigma_y < 0).any()):
            raise ValueError(f"sigma_y must be finite and >= 0, got {self.sigma_y}")
        y_batch = tuple(self.y.shape[: self.y.ndim - len(self.operator.out_shape)])
        self.batch_shape = y_batch if self.batch_shape is None else tuple(int(b) for b in self.batch_shape)
        self._check_batch(self.batch_shape, "state batch_shape")

    def sigma_y_per_state(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """sigma_y as a tensor of shape ``batch_shape`` (one value per state row). A tensor sigma_y may carry trailing
        singleton event dimensions (e.g. (P, 1, 1) against y of shape (P, 1, dy)); they are dropped."""
        sigma = torch.as_tensor(self.sigma_y, dtype=dtype, device=device)
        batch = self.batch_shape
        while sigma.ndim > len(batch) and sigma.shape[-1] == 1:
            sigma = sigma.squeeze(-1)
        try:
            return torch.broadcast_to(sigma, batch)
        except RuntimeError as err:
            raise UserError(f"sigma_y of shape {tuple(sigma.shape)} does not broadcast to the state batch {batch}") from err

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype solvers compute in: y's (float32 for an integer y)."""
        return self.y.dtype if self.y.is_floating_point() else torch.float32

    @property
    def y_batch_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape[: self.y.ndim - len(self.operator.out_shape)])

    def _check_batch(self, batch: tuple[int, ...], what: str) -> None:
        try:
            torch.broadcast_shapes(batch, self.y_batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"{what} {tuple(batch)} does not broadcast with the measurement batch {self.y_batch_shape}"
            ) from err

    def check_state(self, x: Tensor, state_shape: tuple[int, ...] | None = None) -> None:
        """Raise if a solver state does not have the event shape ``state_shape`` (default: the operator's input
        shape; a latent prior's state shape otherwise), does not broadcast with y, or is not finite."""
        data_shape = tuple(self.operator.in_shape)
        shape = data_shape if state_shape is None else tuple(state_shape)
        if shape == data_shape:
            self.operator.check_input(x)
        elif x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
            raise ValueError(f"the solver state must have shape (..., {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        self._check_batch(tuple(x.shape[: x.ndim - len(shape)]), "solver state batch")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("initial state contains NaN or Inf values")


def needs_prior(solver: Callable[..., Any]) -> bool:
    """Whether a solver (or a ``functools.partial`` of one) uses the prior: True unless the solver function sets
    ``needs_prior = False`` (the classical baselines)."""
    return bool(getattr(getattr(solver, "func", solver), "needs_prior", True))


def needs_linear_operator(solver: Callable[..., Any]) -> bool:
    """Whether a solver needs a linear operator with an adjoint (the function sets ``needs_linear_operator = True``)."""
    return bool(getattr(getattr(solver, "func", solver), "needs_linear_operator", False))


CONTRACT_ARGUMENTS = ("problem", "prior", "generator", "callback", "x_init")


def check_solver_arguments(solver: Callable[..., Any]) -> None:
    """Refuse hyperparameters a solver (a ``functools.partial``) does not take, e.g. a misspelt ``+solver.zetaa=1``
    or ``zeta`` left over from another solver's config, and missing required ones. Raises
    :class:`~diffinv_pl.errors.UserError` naming the valid ones."""
    func = getattr(solver, "func", solver)
    name = getattr(func, "__name__", type(func).__name__)
    bound = dict(getattr(solver, "keywords", None) or {})
    params = inspect.signature(func).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = sorted(k for k in params if k not in CONTRACT_ARGUMENTS)
        unknown = sorted(set(bound) - set(valid))
        if unknown:
            raise UserError(
                f"solver {name} has no hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'} "
                "(check the spelling of the solver.* overrides, or remove another solver's settings with ~solver.<name>)"
            )
    missing = [
        k for k, p in params.items()
        if k not in CONTRACT_ARGUMENTS and p.default is inspect.Parameter.empty
        and p.kind is inspect.Parameter.KEYWORD_ONLY and k not in bound
    ]
    if missing:
        raise UserError(f"solver {name} needs the hyperparameter(s) {', '.join(missing)} (set solver.<name>=... in the config)")


def check_solver_setup(solver: Callable[..., Any], prior: Prior | None, operator: ForwardOperator) -> None:
    """Refuse, before any data is read or file written, a solver set-up that cannot run: unknown or missing
    hyperparameters (:func:`check_solver_arguments`), bad hyperparameter values (the solver's own
    ``check_hyperparameters(operator, **hyperparameters)``, where it has one), a diffusion solver without a prior, or
    a nonlinear operator for a solver that needs its adjoint. Raises :class:`~diffinv_pl.errors.UserError`."""
    check_solver_arguments(solver)
    func = getattr(solver, "func", solver)
    name = getattr(func, "__name__", type(func).__name__)
    check = getattr(func, "check_hyperparameters", None)
    if check is not None:
        bound = inspect.signature(func).bind_partial(**getattr(solver, "keywords", {}))
        bound.apply_defaults()
        runtime = ("problem", "prior", "generator", "callback", "x_init")
        check(operator, **{k: v for k, v in bound.arguments.items() if k not in runtime})
    if needs_prior(solver) and prior is None:
        raise UserError(
            f"solver {name} needs a prior: add prior=trained prior.path=<run>/checkpoints/last.ckpt (or pass prior= "
            "from Python); the classical solvers pinv and tv need none"
        )
    if needs_linear_operator(solver) and not isinstance(operator, LinearOperator):
        raise UserError(
            f"solver {name} needs a linear operator with an adjoint, but {type(operator).__name__} is nonlinear: "
            "use a diffusion solver (e.g. solver=dps) for this operator"
        )


def initial_state(
    problem: InverseProblem,
    prior: Prior,
    std: float,
    generator: GeneratorLike,
    x_init: Tensor | None = None,
) -> Tensor:
    """The start of a diffusion solver: ``x_init`` if given (checked), otherwise ``std * N(0, I)`` in the prior's state
    space with ``problem.batch_shape`` rows, drawn from ``generator``, in y's dtype (float32 for integer y) and
    device. Also checks that the prior can work on the operator's input shape."""
    data_shape = tuple(problem.operator.in_shape)
    prior.check_data_shape(data_shape)
    state_shape = prior.state_shape(data_shape)
    if x_init is None:
        x_init = prior.initial_state(problem.batch_shape, data_shape, std, generator, problem.state_dtype, problem.y.device)
    problem.check_state(x_init, state_shape)
    return x_init


@dataclass
class SolverCost:
    """Cost of one solver call: network (denoiser) evaluations, operator calls, wall time in seconds."""

    denoiser_calls: int = 0
    operator_forward_calls: int = 0
    operator_adjoint_calls: int = 0
    operator_gram_calls: int = 0  # (sigma_y^2 I + v A A^T)^-1 applications (CoDPS)
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
        prior: Prior | None,
        *,
        generator: GeneratorLike = None,
        callback: Callback | None = None,
        x_init: Tensor | None = None,
    ) -> SolverResult: ...


class CountingDenoiser:
    """``D(x, sigma, generator=...)`` of a prior, counting its calls (one call = one batched network evaluation)."""

    def __init__(self, prior: Prior) -> None:
        self.prior = prior
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor | float, generator: GeneratorLike = None) -> Tensor:
        self.calls += 1
        return self.prior.denoise(x, sigma, generator=generator)


@contextmanager
def cost_meter(problem: InverseProblem, denoiser: CountingDenoiser | None = None) -> Iterator[SolverCost]:
    """Fill a :class:`SolverCost` with the calls and wall time spent inside the ``with`` block."""
    op = problem.operator
    fwd0, adj0, gram0 = op.forward_calls, getattr(op, "adjoint_calls", 0), getattr(op, "gram_calls", 0)
    start = time.perf_counter()
    cost = SolverCost()
    try:
        yield cost
    finally:
        cost.denoiser_calls = denoiser.calls if denoiser is not None else 0
        cost.operator_forward_calls = op.forward_calls - fwd0
        cost.operator_adjoint_calls = getattr(op, "adjoint_calls", 0) - adj0
        cost.operator_gram_calls = getattr(op, "gram_calls", 0) - gram0
        cost.wall_time_s = time.perf_counter() - start


def check_finite(value: Tensor, what: str, step: int, sigma: float, hint: str) -> None:
    """Raise FloatingPointError naming the step when a solver quantity becomes NaN/Inf (one float64 sum: a NaN or Inf
    anywhere makes it non-finite)."""
    if not bool(torch.isfinite(value.sum(dtype=torch.float64))):
        raise FloatingPointError(f"{what} became NaN/Inf at step {step} (sigma={sigma:.4g}); {hint}")
