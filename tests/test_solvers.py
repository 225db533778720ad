"""DPS semantics and the exact-posterior oracle (the contract every solver keeps, and DPS against an independent
computation, are in test_solver_contract.py)."""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.data.gmm_problems import make_gmm_problems
from diffinv_pl.diffusion import edm_grid, vp_grid
from diffinv_pl.metrics import mode_weight_tv, random_directions, sliced_wasserstein_1
from diffinv_pl.operators import MatrixOperator
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers import InverseProblem, dps, get_solver, oracle
from diffinv_pl.solvers.diffusion_posterior_sampling import dps_guidance
from diffinv_pl.tasks.gmm_benchmark import initial_state

F64 = torch.float64


def _small_problem(seed: int = 0, dx: int = 4, dy: int = 2):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(3, dx, generator=g, dtype=F64)
    prior = GaussianMixture.isotropic(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, 0.5)
    A = torch.randn(dy, dx, generator=g, dtype=F64)
    x_true = prior.sample(1, g)[0, 0]
    y = A @ x_true + 0.1 * torch.randn(dy, generator=g, dtype=F64)
    return prior, InverseProblem(y, MatrixOperator(A), 0.1)


@pytest.mark.parametrize("scale,sigma", [(1.0, 0.5), (0.3, 2.0)])
def test_dps_gradient_equals_the_closed_form(scale, sigma):
    """grad_x ||y - A D(x/s)|| = J_D^T A^T (A D - y) / (s ||A D - y||) with J_D = Cov[x0 | x] / sigma^2."""
    prior, problem = _small_problem()
    A, y = problem.operator.matrix, problem.y
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    grad, denoised, residual, x_norm = dps_guidance(problem, prior, x, scale, sigma)
    assert torch.allclose(x_norm, x / scale)
    r = denoised @ A.T - y
    v = r @ A / r.norm(dim=-1, keepdim=True)
    expected = prior.denoiser_jvp(x / scale, sigma, v) / scale  # the Jacobian is symmetric
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(residual, r.norm(dim=-1), rtol=1e-12)
    grad_sq, _, _, _ = dps_guidance(problem, prior, x, scale, sigma, norm="l2_squared")
    assert torch.allclose(grad_sq, 2 * residual[:, None] * grad, rtol=1e-10)


def test_dps_with_zero_step_is_unconditional_ancestral_sampling():
    prior, problem = _small_problem()
    grid = vp_grid(50)
    x_init = grid.init_std * torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    free = dps(problem, prior, x_init=x_init, grid=grid, zeta=0.0, generator=torch.Generator().manual_seed(1)).samples
    unconditional = InverseProblem(problem.y, MatrixOperator(torch.zeros(2, 4, dtype=F64)), 0.1)
    ref = dps(unconditional, prior, x_init=x_init, grid=grid, zeta=1.0, generator=torch.Generator().manual_seed(1)).samples
    assert torch.allclose(free, ref, atol=1e-12)


def test_dps_runs_on_an_edm_grid_and_pulls_towards_the_measurement():
    prior, problem = _small_problem()
    grid = edm_grid(30, sigma_min=0.01, sigma_max=20.0)
    x_init = grid.init_std * torch.randn(200, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = problem.operator
    guided = dps(problem, prior, x_init=x_init, grid=grid, zeta=0.3, generator=torch.Generator().manual_seed(1)).samples
    free = dps(problem, prior, x_init=x_init, grid=grid, zeta=0.0, generator=torch.Generator().manual_seed(1)).samples
    err = lambda s: (s @ op.matrix.T - problem.y).norm(dim=-1).mean()  # noqa: E731
    assert err(guided) < 0.5 * err(free)


def test_dps_reports_divergence_with_the_step():
    class NaNDenoiser(Prior):
        def denoise(self, x, sigma, *, generator=None):
            return x * float("nan")

    _, problem = _small_problem()
    with pytest.raises(FloatingPointError, match="step 0"):
        dps(problem, NaNDenoiser(), x_init=torch.zeros(1, 4, dtype=F64), grid=vp_grid(5), zeta=1.0)
    with pytest.raises(ValueError, match="valid: l2, l2_squared"):
        dps(problem, NaNDenoiser(), x_init=torch.zeros(1, 4, dtype=F64), grid=vp_grid(5), norm="l1")


def test_oracle_from_the_exact_posterior_reaches_the_noise_floor_at_dx8():
    """Acceptance: 1000 DDPM steps, exact p_T(x | y) start: mean SW1 <= 1.5 x the mean exact-vs-exact floor."""
    problems = make_gmm_problems(8, 1, num_problems=8, seed=3)
    grid = vp_grid(1000)
    gen = torch.Generator().manual_seed(0)
    n = 2000
    x_init = initial_state("posterior", grid, problems, n, gen)
    problem = InverseProblem(problems.y, problems.operator, problems.sigma_y[:, None, None])
    samples = oracle(problem, problems.prior, x_init=x_init, grid=grid, generator=gen).samples
    ref, other = problems.posterior.sample(n, gen), problems.posterior.sample(n, gen)
    dirs = random_directions(10_000, 8, gen)
    sw = torch.tensor([sliced_wasserstein_1(samples[p], ref[p], dirs) for p in range(8)])
    floor = torch.tensor([sliced_wasserstein_1(other[p], ref[p], dirs) for p in range(8)])
    assert sw.mean() <= 1.5 * floor.mean(), (sw, floor)
    assert mode_weight_tv(samples, problems.posterior).mean() <= 2 * mode_weight_tv(other, problems.posterior).mean() + 0.01
    # and a sampler that ignores y is far from the posterior: the metric can tell them apart
    prior_samples = problems.prior.sample(n * 8, gen).reshape(8, n, 8)
    far = torch.tensor([sliced_wasserstein_1(prior_samples[p], ref[p], dirs) for p in range(8)])
    assert far.mean() > 5 * floor.mean()


def test_solver_registry_lists_valid_names():
    assert get_solver("dps") is dps
    with pytest.raises(ValueError, match="valid solvers: .*dps, oracle"):
        get_solver("daps2")


def test_bad_problem_inputs_fail_before_sampling():
    prior, problem = _small_problem()
    with pytest.raises(ValueError, match="measurement has shape"):
        InverseProblem(torch.zeros(3, dtype=F64), problem.operator, 0.1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        InverseProblem(torch.tensor([0.0, float("nan")], dtype=F64), problem.operator, 0.1)
    with pytest.raises(ValueError, match="sigma_y must be finite"):
        InverseProblem(problem.y, problem.operator, -1.0)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        dps(problem, prior, x_init=torch.zeros(2, 5, dtype=F64), grid=vp_grid(5))
    with pytest.raises(TypeError, match="GaussianMixture prior"):
        oracle(problem, lambda x, s: x, x_init=torch.zeros(2, 4, dtype=F64), grid=vp_grid(5))


def test_dps_gradient_is_zero_not_nan_at_a_zero_residual():
    """Regression: sqrt(sum r^2) has a NaN gradient at r = 0 (seen in float32 on the TMPD grid, sigma_y = 0.01)."""
    prior, _ = _small_problem()
    problem = InverseProblem(torch.zeros(2, dtype=F64), MatrixOperator(torch.zeros(2, 4, dtype=F64)), 0.1)
    grad, _, residual, _ = dps_guidance(problem, prior, torch.randn(3, 4, dtype=F64), 1.0, 0.5)
    assert bool((residual == 0).all()) and torch.equal(grad, torch.zeros_like(grad))
