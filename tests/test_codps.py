"""CoDPS / CoDPS+ (diffinv_pl/solvers/codps.py): exactness on an isotropic Gaussian prior, the measured bias of CoDPS
(DDPM), the Gram-inverse path on image operators, the CG fallback, and refusals before sampling.

Measured with the set-up of ``_gaussian_problem`` (d = 6, dy = 3, prior N(mu0, 0.8 I), sigma_y = 0.2, posterior standard
deviations 0.45-0.79; inv_var = 1/0.8, schedule "matched", scale 1, no div_ratio), float64:
* CoDPS+ on ddim100 equals the oracle sampler (exact E[x0 | x_t, y]) path by path to ~3e-8 (with ``skip_last=False``;
  the released skip of t = 0 moves samples by ~2e-3): its guidance is the exact likelihood score. The DDIM(eta = 1)
  loop itself carries the discretisation error of any ancestral sampler with a plug-in mean, the oracle's included:
  covariance 8 % low (Frobenius) at 100 steps; at 1000 steps it is below the sampling error.
* 1000 steps, 10,000 samples, seeds 1-4: CoDPS+ mean error 0.006-0.016 (max 0.5-2.3 standard errors), covariance
  1.6-2.3 % (max 1.4-2.2 standard errors per entry): the exact posterior within sampling error.
* CoDPS (DDPM, 1000 steps, same settings) is biased even there: mean error 0.059-0.063 (9.3-11.3 standard errors),
  covariance like CoDPS+ (1.7-2.4 %). Its likelihood mean m mixes x0_hat
  (already E[x0 | x_t]) with the proposal at the next level through the current level's coefficients; evaluating m
  at x_t instead (``guidance_at="current"``) leaves the same bias (0.058 at 40,000 samples), so it comes mostly from
  using m rather than x0_hat as the likelihood mean (an inference from these two runs).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffinv_pl.diffusion import vp_grid
from diffinv_pl.errors import UserError
from diffinv_pl.operators import MatrixOperator, build_operator
from diffinv_pl.operators.base import LinearOperator
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers import InverseProblem, codps, codps_plus, oracle
from diffinv_pl.solvers.codps import dense_gram_inverse
from diffinv_pl.utils.seeding import key_generator

F64 = torch.float64
VAR0, SIGMA_Y = 0.8, 0.2
EXACT = dict(schedule="matched", scale=1.0, t_div=0, div_ratio=1.0, inv_var=1 / VAR0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors in long loops: one intra-op thread avoids thread contention on a loaded machine (10x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian_problem(n: int):
    g = torch.Generator().manual_seed(0)
    d, dy = 6, 3
    mu0 = torch.randn(d, dtype=F64, generator=g)
    prior = GaussianMixture.gaussian(mu0, VAR0 * torch.eye(d, dtype=F64))
    A = torch.randn(dy, d, dtype=F64, generator=g)
    x = mu0 + math.sqrt(VAR0) * torch.randn(d, dtype=F64, generator=g)
    y = (A @ x + SIGMA_Y * torch.randn(dy, dtype=F64, generator=g))[None]
    # closed-form posterior (Kalman form), independent of the prior's own posterior()
    S = VAR0 * torch.eye(d, dtype=F64)
    K = S @ A.T @ torch.linalg.inv(A @ S @ A.T + SIGMA_Y**2 * torch.eye(dy, dtype=F64))
    mean, cov = mu0 + K @ (y[0] - A @ mu0), S - K @ A @ S
    return InverseProblem(y, MatrixOperator(A), SIGMA_Y, batch_shape=(n,)), prior, mean, cov


def _z_scores(xs, mean, cov):
    """Largest |error| / standard error over the mean entries and over the covariance entries."""
    n = xs.shape[0]
    var = cov.diagonal()
    z_mean = ((xs.mean(0) - mean) / (var / n).sqrt()).abs().max()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    z_cov = ((torch.cov(xs.T) - cov) / se_cov).abs().max()
    return float(z_mean), float(z_cov)


def test_codps_plus_guidance_is_the_exact_likelihood_score():
    """With the matched schedule (and guidance on the last step too) CoDPS+ is the oracle sampler, path by path."""
    problem, prior, _, _ = _gaussian_problem(20)
    grid = vp_grid("ddim100")
    a = oracle(problem, prior, grid=grid, generator=torch.Generator().manual_seed(3)).samples
    b = codps_plus(problem, prior, grid=grid, generator=torch.Generator().manual_seed(3), skip_last=False, **EXACT).samples
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # the released default skips t = 0: a small, visible difference only
    c = codps_plus(problem, prior, grid=grid, generator=torch.Generator().manual_seed(3), **EXACT).samples
    assert 1e-5 < float((c - a).abs().max()) < 1e-2


def test_codps_plus_samples_the_exact_posterior_and_codps_ddpm_is_biased():
    """CoDPS+ (matched schedule, inv_var = 1/sigma0^2) on a 1000-step grid: mean and covariance of the samples within
    sampling error of the exact posterior. CoDPS (DDPM) with the same settings: its mean bias is many standard errors
    (measured 0.058, see the module docstring)."""
    n = 10000
    problem, prior, mean, cov = _gaussian_problem(n)
    grid = vp_grid(1000)
    xs = codps_plus(problem, prior, grid=grid, generator=torch.Generator().manual_seed(1), skip_last=False, **EXACT).samples
    z_mean, z_cov = _z_scores(xs, mean, cov)
    assert z_mean < 4.5 and z_cov < 4.5, (z_mean, z_cov)

    xs = codps(problem, prior, grid=grid, generator=torch.Generator().manual_seed(1), **EXACT).samples
    z_mean_ddpm, _ = _z_scores(xs, mean, cov)
    bias = float((xs.mean(0) - mean).norm())
    assert z_mean_ddpm > 6 and 0.04 < bias < 0.08, (z_mean_ddpm, bias)


@pytest.mark.parametrize("problems", [0, 2])
def test_dense_gram_inverse_matches_a_solve(problems):
    g = torch.Generator().manual_seed(0)
    shape = (3, 5) if problems == 0 else (problems, 3, 5)
    A = torch.randn(*shape, dtype=F64, generator=g)
    rows = (4,) if problems == 0 else (problems, 4)
    y = torch.randn(*rows, 3, dtype=F64, generator=g)
    v = torch.rand(*rows, dtype=F64, generator=g)
    out = dense_gram_inverse(MatrixOperator(A), y, 0.3, v)
    mats = A if problems else A.expand(1, 3, 5)
    ys, vs = y.reshape(len(mats), -1, 3), v.reshape(len(mats), -1)
    expected = torch.stack([
        torch.stack([torch.linalg.solve(0.09 * torch.eye(3, dtype=F64) + vs[p, i] * mats[p] @ mats[p].T, ys[p, i])
                     for i in range(ys.shape[1])])
        for p in range(len(mats))
    ]).reshape(y.shape)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


class IsotropicPrior(Prior):
    """N(mu, var I) on any shape: D(x, sigma) = mu + var / (var + sigma^2) (x - mu)."""

    def __init__(self, mu: float, var: float) -> None:
        self.mu, self.var = mu, var

    def denoise(self, x, sigma, *, generator=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return self.mu + self.var / (self.var + sigma**2) * (x - self.mu)


def _dense(op) -> torch.Tensor:
    n = int(torch.tensor(op.in_shape).prod())
    return op(torch.eye(n, dtype=F64).reshape(n, *op.in_shape)).reshape(n, -1).T


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("gaussian_blur_circular", dict(kernel_size=3, std=1.0, channels=1, image_size=8)),
        ("sr_blur_stride", dict(factor=2, kernel_size=3, channels=1, image_size=8)),
        ("inpainting_random", dict(channels=1, image_size=8)),
        ("sr_bicubic", dict(factor=2, channels=1, image_size=8)),
        ("identity", dict(channels=1, image_size=8)),
    ],
)
@pytest.mark.parametrize("solver", [codps, codps_plus])
def test_image_operator_gram_inverse_path_equals_the_dense_computation(name, kwargs, solver):
    """The same run through the operator's structured gram_inverse (FFT, alias average, diagonal) and through the dense
    matrix of that operator, batch of 3 with one sigma_y per row: identical samples (the released code runs batch 1)."""
    op = build_operator(name, **kwargs).to(F64)
    dense = MatrixOperator(_dense(op))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, *op.in_shape, dtype=F64, generator=g)
    sigma_y = torch.tensor([0.05, 0.1, 0.2], dtype=F64)
    y = op(x) + sigma_y.reshape(3, 1, 1, 1) * torch.randn(3, *op.out_shape, dtype=F64, generator=g)
    prior = IsotropicPrior(0.5, 0.3)
    grid = vp_grid(10)
    hyper = dict(grid=grid, scale=0.5, t_div=3, div_ratio=5.0, inv_var=2.0)
    gens = lambda: [key_generator(1, f"row{i}") for i in range(3)]  # noqa: E731
    images = solver(InverseProblem(y, op, sigma_y), prior, generator=gens(), **hyper).samples
    flat = solver(InverseProblem(y.reshape(3, -1), dense, sigma_y), prior, generator=gens(), **hyper).samples
    torch.testing.assert_close(images.reshape(3, -1), flat, rtol=1e-9, atol=1e-9)
    # a row alone gives the same sample (batch independence with per-row sigma_y)
    alone = solver(InverseProblem(y[1:2], op, sigma_y[1:2]), prior, generator=gens()[1:2], **hyper).samples
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-10)


class NoGramOperator(LinearOperator):
    """A linear operator without an exact Gram inverse (the base class's gram_inverse raises TypeError)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.in_shape, self.out_shape = (matrix.shape[1],), (matrix.shape[0],)

    def _forward(self, x):
        return x @ self.matrix.T

    def _adjoint(self, y):
        return y @ self.matrix


def test_cg_fallback_matches_the_exact_gram_inverse():
    """gram_solver=cg (conjugate gradients on the Gram system, stated tolerance) on an operator without an exact Gram
    inverse gives the exact-mode result of the same matrix; it counts its A and A^T calls."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, dtype=F64, generator=g)
    y = torch.randn(2, 3, dtype=F64, generator=g)
    prior = GaussianMixture.gaussian(torch.zeros(5, dtype=F64), torch.eye(5, dtype=F64))
    hyper = dict(grid=vp_grid(8), scale=0.3)
    exact = codps_plus(InverseProblem(y, MatrixOperator(A), 0.1), prior, generator=torch.Generator().manual_seed(2), **hyper)
    op = NoGramOperator(A)
    cg = codps_plus(InverseProblem(y, op, 0.1), prior, generator=torch.Generator().manual_seed(2), gram_solver="cg",
                    cg_tol=1e-12, **hyper)
    torch.testing.assert_close(cg.samples, exact.samples, rtol=1e-8, atol=1e-9)
    assert cg.cost.operator_forward_calls > exact.cost.operator_forward_calls
    # the exact mode applies one Gram inverse per guided step (8 steps, none on the last: 7; the set-up probe is not a
    # step), the CG mode none
    assert exact.cost.operator_gram_calls == 7 and cg.cost.operator_gram_calls == 0
    ddpm = codps(InverseProblem(y, MatrixOperator(A), 0.1), prior, generator=torch.Generator().manual_seed(2), **hyper)
    assert ddpm.cost.operator_gram_calls == 8
    with pytest.raises(RuntimeError, match=r"CoDPS\+: conjugate gradients .* at step \d+"):
        codps_plus(InverseProblem(y, op, 1e-3), prior, generator=torch.Generator().manual_seed(2), gram_solver="cg",
                   cg_tol=1e-14, cg_max_iter=1, **hyper)


def test_bad_input_is_refused_before_sampling():
    calls = []

    class Counting(IsotropicPrior):
        def denoise(self, x, sigma, *, generator=None):
            calls.append(1)
            return super().denoise(x, sigma)

    prior, grid = Counting(0.0, 1.0), vp_grid(5)
    # nonlinear operator
    pr = build_operator("phase_retrieval", channels=1, image_size=8).to(F64)
    y = pr(torch.rand(1, *pr.in_shape, dtype=F64))
    with pytest.raises(UserError, match="CoDPS needs a linear operator"):
        codps(InverseProblem(y, pr, 0.05), prior, grid=grid)
    # no exact Gram inverse: refused, pointing at the CG fallback
    op = NoGramOperator(torch.randn(2, 4, dtype=F64))
    with pytest.raises(UserError, match=r"CoDPS\+: NoGramOperator has no exact .*gram_solver=cg"):
        codps_plus(InverseProblem(torch.zeros(1, 2, dtype=F64), op, 0.05), prior, grid=grid)
    # reflect-padded blur: its gram_inverse is only the circulant model
    blur = build_operator("gaussian_blur", kernel_size=3, std=1.0, channels=1, image_size=8).to(F64)
    with pytest.raises(UserError, match="circulant approximation"):
        codps(InverseProblem(blur(torch.rand(1, 1, 8, 8, dtype=F64)), blur, 0.05), prior, grid=grid)
    # bad hyperparameters
    ok = MatrixOperator(torch.randn(2, 4, dtype=F64))
    problem = InverseProblem(torch.zeros(1, 2, dtype=F64), ok, 0.05)
    for bad in (dict(scale=-1.0), dict(div_ratio=0.0), dict(inv_var=float("nan")), dict(schedule="linear"),
                dict(gram_solver="lu")):
        with pytest.raises(ValueError):
            codps_plus(problem, prior, grid=grid, **bad)
    with pytest.raises(ValueError, match="guidance_at"):
        codps(problem, prior, grid=grid, guidance_at="x0")
    assert not calls
    assert codps.needs_linear_operator and codps_plus.needs_linear_operator


def test_nan_names_the_solver_step_and_sigma():
    class NaNLate(IsotropicPrior):
        def denoise(self, x, sigma, *, generator=None):
            out = super().denoise(x, sigma)
            return out * float("nan") if float(sigma) < 1.0 else out

    op = MatrixOperator(torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
    problem = InverseProblem(torch.zeros(1, 2, dtype=F64), op, 0.05)
    grid = vp_grid(10)
    step = next(i for i, s in enumerate(grid.sigmas.tolist()) if s < 1.0)
    for solver, name in ((codps, "CoDPS"), (codps_plus, r"CoDPS\+")):
        with pytest.raises(FloatingPointError, match=rf"{name} residual became NaN/Inf at step {step} \(sigma="):
            solver(problem, NaNLate(0.0, 1.0), grid=grid, generator=torch.Generator().manual_seed(0))


def test_per_problem_sigma_y_with_event_dimensions_runs_as_in_the_gmm_benchmark():
    """The GMM benchmark passes sigma_y of shape (P, 1, 1) with y (P, 1, dy) and states (P, n, d): CoDPS reads it as
    one value per state row (InverseProblem.sigma_y_per_state), the same as an explicit (P, n) tensor."""
    from diffinv_pl.data.gmm_problems import make_gmm_problems

    problems = make_gmm_problems(8, 2, num_problems=3, seed=0)
    op = MatrixOperator(problems.operator.matrix)
    gens = [key_generator(0, f"p{p}") for p in range(3)]
    sigma = problems.sigma_y[:, None, None]
    problem = InverseProblem(problems.y, op, sigma, batch_shape=(3, 5))
    assert problem.sigma_y_per_state().shape == (3, 5)
    torch.testing.assert_close(problem.sigma_y_per_state()[:, 0], problems.sigma_y)
    out = codps_plus(problem, problems.prior, grid=vp_grid(5), generator=gens).samples
    explicit = InverseProblem(problems.y, op, problems.sigma_y[:, None].expand(3, 5), batch_shape=(3, 5))
    again = codps_plus(explicit, problems.prior, grid=vp_grid(5), generator=[key_generator(0, f"p{p}") for p in range(3)])
    assert out.shape == (3, 5, 8) and torch.equal(out, again.samples)
