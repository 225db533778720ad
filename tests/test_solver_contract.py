"""The solver contract (diffinv_pl/solvers/base.py) checked for every entry of ``SOLVERS``, and DPS against an
independent closed-form computation.

Each solver runs from its real config (``conf/solver/<name>.yaml``, a 5-step grid) on a tiny float64 problem: a
Gaussian-mixture prior with a dense operator by default; ``CASES`` gives a solver another problem only where the
default cannot work (the oracle needs one measurement per problem, TV needs images). A new solver inherits every test
here by being registered and given a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from conftest import CONF, CountingPrior, compose
from hydra.utils import get_object, instantiate

from diffinv_pl.diffusion import vp_grid
from diffinv_pl.operators import MatrixOperator, build_operator
from diffinv_pl.operators.base import ForwardOperator
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.linear_latent import LinearDecoderPrior
from diffinv_pl.errors import UserError
from diffinv_pl.solvers import SOLVERS, InverseProblem, check_solver_setup, dps, needs_prior
from diffinv_pl.utils.seeding import key_generator

F64 = torch.float64
ROWS = 3


class CountingMatrix(MatrixOperator):
    """A dense operator that counts its own forward and adjoint evaluations (independently of the base counters)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.forwards = self.adjoints = 0

    def _forward(self, x):
        self.forwards += 1
        return super()._forward(x)

    def _adjoint(self, y):
        self.adjoints += 1
        return super()._adjoint(y)


@dataclass
class Case:
    """A tiny problem: ``problem(rows)`` is the inverse problem restricted to those state rows."""

    problem: Callable[[list[int]], InverseProblem]
    prior: Prior | None
    countable_prior: bool  # a solver that needs a prior calls this one's denoise (not, like the oracle, a substitute)


def _mixture_and_matrix() -> tuple[GaussianMixture, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(3, 4, generator=g, dtype=F64)
    prior = GaussianMixture.isotropic(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, 0.5)
    A = torch.randn(2, 4, generator=g, dtype=F64)
    x = prior.sample(ROWS, g)[0]
    y = x @ A.T + 0.1 * torch.randn(ROWS, 2, generator=g, dtype=F64)
    return prior, A, y


def gmm_case() -> Case:
    """One measurement per state row: y (3, 2), states (3, 4)."""
    prior, A, y = _mixture_and_matrix()
    op = CountingMatrix(A)
    return Case(lambda rows: InverseProblem(y[rows], op, 0.1), prior, True)


def shared_measurement_case() -> Case:
    """Several posterior samples of one measurement: y (1, 2), states (3, 4)."""
    prior, A, y = _mixture_and_matrix()
    op = CountingMatrix(A)
    return Case(lambda rows: InverseProblem(y[:1], op, 0.1, batch_shape=(len(rows),)), prior, False)


def image_case() -> Case:
    """Images (1, 8, 8) through a circular blur, no prior."""
    op = build_operator("gaussian_blur_circular", kernel_size=3, std=1.0, channels=1, image_size=8, input_range=(0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(ROWS, 1, 8, 8, generator=g, dtype=F64)
    y = op(x) + 0.01 * torch.randn(ROWS, 1, 8, 8, generator=g, dtype=F64)
    op.reset_counters()
    return Case(lambda rows: InverseProblem(y[rows], op, 0.01), None, False)


def sr_image_case() -> Case:
    """Images (1, 8, 8) down-sampled x2 by bicubic SR, no prior (the bicubic up-sampling baseline needs an SR operator)."""
    op = build_operator("sr_bicubic", factor=2, channels=1, image_size=8, input_range=(0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(ROWS, 1, 8, 8, generator=g, dtype=F64)
    y = op(x) + 0.01 * torch.randn(ROWS, 1, 4, 4, generator=g, dtype=F64)
    op.reset_counters()
    return Case(lambda rows: InverseProblem(y[rows], op, 0.01), None, False)


def small_operator_case() -> Case:
    """The default problem with A and y scaled by 1/100 (sigma_y 0.001): DAPS's image constants (tau = 0.01,
    lr = 1e-4) make Langevin stable only for an operator of norm about 1 or less."""
    prior, A, y = _mixture_and_matrix()
    op = CountingMatrix(A / 100)
    return Case(lambda rows: InverseProblem(y[rows] / 100, op, 0.001), prior, True)


def linear_decoder_case() -> Case:
    """The default problem through a latent prior with the identity decoder (ReSample's released look-ahead needs a
    prior whose denoise takes network_sigma)."""
    prior, A, y = _mixture_and_matrix()
    op = CountingMatrix(A)
    latent = LinearDecoderPrior(prior, torch.eye(4, dtype=F64))
    return Case(lambda rows: InverseProblem(y[rows], op, 0.1), latent, True)


CASES: dict[str, Callable[[], Case]] = {
    "resample": linear_decoder_case,
    "bicubic": sr_image_case, "daps": small_operator_case, "oracle": shared_measurement_case, "tv": image_case}


def solver_from_config(name: str):
    """The solver as its config binds it, on a 5-step grid (5 levels for solvers with their own level count)."""
    cfg = compose("evaluate", [f"solver={name}", "sampling_grid=vp", "sampling_grid.num_steps=5", "paths.output_dir=/tmp"])
    if "num_levels" in cfg.solver:
        cfg.solver.num_levels = 5
    if name == "resample":  # 20 steps: events at indices 2, 4 (latent), 6 .. 14 (pixel)
        cfg.solver.num_steps, cfg.solver.dc_period = 20, 2
    return instantiate(cfg.solver)


def _generators(rows: list[int], seed: int = 1) -> list[torch.Generator]:
    return [key_generator(seed, f"row{r}") for r in rows]


def _run(name: str, case: Case, rows: list[int], seed: int = 1, **kwargs):
    return solver_from_config(name)(case.problem(rows), case.prior, generator=_generators(rows, seed), **kwargs)


@pytest.fixture(params=sorted(SOLVERS))
def name(request) -> str:
    return request.param


def _case(name: str) -> Case:
    case = CASES.get(name, gmm_case)()
    case.countable_prior = case.countable_prior and needs_prior(SOLVERS[name])
    return case


def test_every_registered_solver_has_a_config_and_every_config_a_registered_solver():
    configs = {p.stem: get_object(instantiate_target(p)) for p in (CONF / "solver").glob("*.yaml")}
    registered = set(SOLVERS.values())
    assert set(SOLVERS) <= set(configs), f"solvers without conf/solver/<name>.yaml: {set(SOLVERS) - set(configs)}"
    for stem, target in configs.items():
        assert target in registered, f"conf/solver/{stem}.yaml targets {target}, which is not in SOLVERS"
    for key, fn in SOLVERS.items():
        assert configs[key] is fn, f"conf/solver/{key}.yaml does not target SOLVERS[{key!r}]"


def instantiate_target(path) -> str:
    """The solver a conf/solver option targets, its defaults list resolved by Hydra (an option may extend another)."""
    return compose("evaluate", [f"solver={path.stem}", "paths.output_dir=unused"]).solver._target_


def test_output_shape_finiteness_and_determinism(name):
    case = _case(name)
    rows = list(range(ROWS))
    problem = case.problem(rows)
    torch.manual_seed(123)  # the global RNG must play no part
    first = _run(name, case, rows).samples
    torch.manual_seed(456)
    again = _run(name, case, rows).samples
    assert tuple(first.shape) == (*problem.batch_shape, *problem.operator.in_shape)
    assert bool(torch.isfinite(first).all())
    assert torch.equal(first, again)


def test_results_do_not_depend_on_the_batch(name):
    case = _case(name)
    batch = _run(name, case, list(range(ROWS))).samples
    for r in range(ROWS):
        alone = _run(name, case, [r]).samples
        torch.testing.assert_close(alone[0], batch[r], rtol=0, atol=1e-10)


def test_cost_counters_match_independent_counts(name):
    case = _case(name)
    prior = CountingPrior(case.prior) if case.countable_prior else case.prior
    problem = case.problem(list(range(ROWS)))
    op = problem.operator
    before = (getattr(op, "forwards", None), getattr(op, "adjoints", None))
    steps: list[dict] = []
    result = solver_from_config(name)(problem, prior, generator=_generators(range(ROWS)), callback=steps.append)
    cost = result.cost
    if case.countable_prior:
        assert cost.denoiser_calls == prior.calls >= len(steps) > 0
    if isinstance(op, CountingMatrix):
        assert cost.operator_forward_calls == op.forwards - before[0]
        assert cost.operator_adjoint_calls == op.adjoints - before[1]
    assert cost.wall_time_s > 0 and min(cost.as_dict().values()) >= 0


def test_callback_keys_as_documented(name):
    case = _case(name)
    problem = case.problem(list(range(ROWS)))
    steps: list[dict] = []
    solver_from_config(name)(problem, case.prior, generator=_generators(range(ROWS)), callback=steps.append)
    assert steps, "the callback must be called at least once"
    assert [s["step"] for s in steps] == list(range(len(steps)))
    for info in steps:
        assert {"step", "x"} <= set(info)
        assert info["x"].shape[: len(problem.batch_shape)] == problem.batch_shape
        if "sigma" in info:  # diffusion solvers: the level the step started from and the prior's estimate
            assert "denoised" in info and math.isfinite(info["sigma"])
    sigmas = [s["sigma"] for s in steps if "sigma" in s]
    assert sigmas == sorted(sigmas, reverse=True)


def _poison_operator(op: ForwardOperator) -> None:
    """Make every forward and adjoint evaluation NaN (a dense matrix gets a NaN entry)."""
    if isinstance(op, MatrixOperator):
        op.matrix[0, 0] = float("nan")
        return
    forward, adjoint = op._forward, op._adjoint
    op._forward = lambda x: forward(x) * float("nan")
    op._adjoint = lambda y: adjoint(y) * float("nan")


def test_nan_is_detected_with_the_step_named(name):
    case = _case(name)
    problem = case.problem(list(range(ROWS)))
    if name == "bicubic":  # calls no operator: a NaN in the measurement it up-samples is what it must catch
        problem.y = problem.y.clone()
        problem.y[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="at step 0"):
            solver_from_config(name)(problem, None)
        return
    _poison_operator(problem.operator)
    # NaN during sampling names the step; a NaN operator the solver can see before sampling is refused as bad input
    with pytest.raises((FloatingPointError, ValueError), match=r"at step \d+|NaN"):
        solver_from_config(name)(problem, case.prior, generator=_generators(range(ROWS)))
    if case.countable_prior:
        clean = _case(name)
        with pytest.raises(FloatingPointError, match="at step 0"):
            solver_from_config(name)(clean.problem([0]), CountingPrior(clean.prior, poison=True), generator=_generators([0]))


def test_bad_initial_state_is_refused_before_any_work(name):
    case = _case(name)
    prior = CountingPrior(case.prior) if case.countable_prior else case.prior
    problem = case.problem(list(range(ROWS)))
    op = problem.operator
    calls = (op.forward_calls, op.adjoint_calls)
    wrong = torch.zeros(ROWS, *[d + 1 for d in problem.operator.in_shape], dtype=F64)
    with pytest.raises(ValueError):
        solver_from_config(name)(problem, prior, generator=_generators(range(ROWS)), x_init=wrong)
    assert (op.forward_calls, op.adjoint_calls) == calls
    assert not case.countable_prior or prior.calls == 0


def test_setup_check_passes_the_config_and_refuses_unknown_hyperparameters(name):
    case = _case(name)
    solver = solver_from_config(name)
    operator = case.problem([0]).operator
    check_solver_setup(solver, case.prior, operator)
    misspelt = partial(solver.func, **solver.keywords, not_a_hyperparameter=1)
    with pytest.raises(UserError, match="not_a_hyperparameter"):
        check_solver_setup(misspelt, case.prior, operator)
    if needs_prior(solver):
        with pytest.raises(UserError, match="needs a prior"):
            check_solver_setup(solver, None, operator)


# --------------------------------------------------------------------------------------------------------------------
# DPS against an independent computation


def test_dps_equals_an_independent_closed_form_ddpm_computation():
    """DPS on a VP grid, recomputed in the DDPM variables with the exact Gaussian-mixture Tweedie mean and its exact
    Jacobian (Cov[x0 | x] / sigma^2), not through the solver's own step or autograd:

        x0 = E[x0 | x_t / s],  eps = (x_t - s x0) / sqrt(1 - s^2),  r = A x0 - y
        x' = s' x0 + sqrt(1 - s'^2 - c^2) eps + c z,  c = eta sqrt((1 - s'^2) / (1 - s^2)) sqrt(1 - s^2 / s'^2)
        x_{t'} = x' - zeta J^T A^T r / (s ||r||)
    with the initial noise and z drawn from the same generator in the same order as the contract prescribes."""
    prior, A, y = _mixture_and_matrix()
    problem = InverseProblem(y, MatrixOperator(A), 0.1)
    grid, zeta, eta = vp_grid(10), 0.5, 1.0
    result = dps(problem, prior, grid=grid, zeta=zeta, eta=eta, generator=torch.Generator().manual_seed(4))

    g = torch.Generator().manual_seed(4)
    x = torch.randn(ROWS, 4, generator=g, dtype=F64)  # init_std = 1 on a VP grid
    abar = (grid.scales**2).tolist()
    sig = grid.sigmas.tolist()
    for i in range(grid.num_steps):
        s, s_next = math.sqrt(abar[i]), math.sqrt(abar[i + 1])
        x0 = prior.denoise(x / s, sig[i])
        eps = (x - s * x0) / math.sqrt(1 - abar[i])
        r = x0 @ A.T - y
        v = (r @ A) / r.norm(dim=-1, keepdim=True)
        grad = prior.denoiser_jvp(x / s, sig[i], v) / s  # the Jacobian is symmetric
        c = eta * math.sqrt((1 - abar[i + 1]) / (1 - abar[i])) * math.sqrt(1 - abar[i] / abar[i + 1])
        x_next = s_next * x0 + math.sqrt(max(1 - abar[i + 1] - c**2, 0.0)) * eps
        if c > 0:
            x_next = x_next + c * torch.randn(ROWS, 4, generator=g, dtype=F64)
        x = x_next - zeta * grad
    torch.testing.assert_close(result.samples, x, rtol=1e-9, atol=1e-9)
    assert result.cost.denoiser_calls == 10 and result.cost.operator_forward_calls == 10
