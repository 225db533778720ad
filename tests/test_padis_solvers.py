"""The PaDIS solvers (diffinv_pl/solvers/padis.py) on analytic priors: with zeta = 0 the annealed samplers sample the
prior (checks the grid, the score and, for the predictor-corrector, that every level runs down to sigma = 0), DDNM
ends in the measurement's range space, PaDIS-DPS improves on its pseudo-inverse start, and bad input is refused
before any call (the solver contract itself is in test_solver_contract.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import CountingPrior
from diffinv_pl.errors import UserError
from diffinv_pl.operators import MatrixOperator, build_operator
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.solvers import InverseProblem, padis_dps, padis_langevin, padis_pc

F64 = torch.float64


def _gaussian_prior(d: int = 4, variance: float = 2.0) -> GaussianMixture:
    return GaussianMixture.isotropic(torch.ones(1, dtype=F64), torch.zeros(1, d, dtype=F64), variance)


def _problem(n: int, seed: int = 0, sigma_y: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 4, generator=g, dtype=F64) / 2
    prior = GaussianMixture.isotropic(torch.tensor([0.5, 0.5], dtype=F64), 2 * torch.randn(2, 4, generator=g, dtype=F64), 0.3)
    x = prior.sample(n, g)[0]
    y = x @ A.T + sigma_y * torch.randn(n, 2, generator=g, dtype=F64)
    return InverseProblem(y, MatrixOperator(A), sigma_y), prior, x


@pytest.mark.parametrize("solver, kwargs, expected", [
    (padis_pc, dict(num_levels=200, snr=1e-9), 2.0),  # the predictor alone: the VE reverse SDE
    # with the released corrector (eps = 2 snr ||z|| / ||s||, not squared) the last level's stationary variance is
    # v = V / (1 - snr / sqrt(v)) = 2.24 at V = 2, snr = 0.16 (the fixed point; one corrector step per level)
    (padis_pc, dict(num_levels=200, snr=0.16), 2.24),
    # annealed Langevin (alpha = sigma^2, 10 steps per level): below sigma ~ 0.3 the steps barely mix (alpha / V < 5 %),
    # so the end keeps some of the wider intermediate levels (measured 2.12 with this seed)
    (padis_langevin, dict(num_levels=30, inner_steps=10), 2.12),
])
def test_without_data_steps_the_annealed_samplers_sample_the_prior(solver, kwargs, expected):
    """zeta = 0 leaves the prior score alone: 400 samples of N(0, 2 I) in 256-D from sigma_max = 10 reach the prior's
    variance (the released PC stopped one level early and divided D(sigma_i) by sigma_{i+1}^2: this one does not)."""
    n, d = 400, 256
    problem = InverseProblem(torch.zeros(1, 2, dtype=F64), MatrixOperator(torch.eye(2, d, dtype=F64)), 0.1, batch_shape=(n,))
    out = solver(problem, _gaussian_prior(d), zeta=0.0, clamp=False, generator=torch.Generator().manual_seed(0),
                 sigma_max=10.0, sigma_min=0.01, **kwargs).samples
    assert out.mean(0).abs().mean() < 3 * (2.0 / n) ** 0.5
    assert float(out.var(0).mean()) == pytest.approx(expected, rel=0.04)


def test_ddnm_ends_in_the_range_space_of_the_measurement():
    """With ddnm the last denoised estimate is A^+ y + (I - A^+ A) D, so A x -> A A^+ y (= y for a full-row-rank A)
    up to the last level's noise; the normalised data step of the plain Langevin variant does not enforce it."""
    problem, prior, _ = _problem(64)
    common = dict(num_levels=20, sigma_min=0.003, clamp=False, generator=torch.Generator().manual_seed(1))
    ddnm = padis_langevin(problem, prior, ddnm=True, **common).samples
    gap = (ddnm @ problem.operator.matrix.T - problem.y).norm(dim=-1)
    assert gap.max() < 0.02, gap.max()
    plain = padis_langevin(problem, prior, ddnm=False, zeta=1.0, **common).samples
    assert (plain @ problem.operator.matrix.T - problem.y).norm(dim=-1).mean() > 5 * gap.mean()


def test_padis_dps_improves_on_its_pseudo_inverse_start():
    """PaDIS-DPS from the (clamped) pseudo-inverse with a two-mode prior: mean error to the truth less than half the
    pseudo-inverse's, and the NFE is levels x inner steps."""
    problem, prior, x = _problem(32, seed=2)
    counted = CountingPrior(prior)
    out = padis_dps(problem, counted, num_levels=20, inner_steps=5, zeta=0.3, sigma_max=10.0, clamp=False,
                    generator=torch.Generator().manual_seed(0))
    start = problem.operator.pinv(problem.y)
    err, err0 = (out.samples - x).norm(dim=-1).mean(), (start - x).norm(dim=-1).mean()
    assert err < 0.5 * err0, (err, err0)
    assert out.cost.denoiser_calls == counted.calls == 100


@pytest.mark.parametrize("solver, bad, match", [
    (padis_dps, dict(num_levels=1), "num_levels"),
    (padis_dps, dict(sigma_min=20.0), "sigma_min < sigma_max"),
    (padis_dps, dict(zeta=-1.0), "zeta"),
    (padis_dps, dict(inner_steps=0), "inner_steps"),
    (padis_dps, dict(langevin_scale=0.0), "langevin_scale"),
    (padis_dps, dict(init="fbp"), "unknown init"),
    (padis_pc, dict(snr=0.0), "snr"),
    (padis_langevin, dict(ddnm=True), "linear operator"),
])
def test_bad_input_is_refused_before_any_call(solver, bad, match):
    problem, prior, _ = _problem(4)
    if bad.get("ddnm"):
        op = build_operator(name="hdr", scale=2.0, channels=1, image_size=2)
        problem = InverseProblem(op(torch.zeros(4, 1, 2, 2, dtype=F64)), op, 0.05)
        op.reset_counters()
    counted = CountingPrior(prior)
    with pytest.raises(UserError, match=match):
        solver(problem, counted, generator=torch.Generator().manual_seed(0), **bad)
    assert counted.calls == 0 and problem.operator.forward_calls == 0
