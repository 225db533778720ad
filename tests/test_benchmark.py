"""GMM problem generation, metrics and the benchmark table."""

from __future__ import annotations

import csv
from functools import partial

import pytest
import torch

from diffinv_pl.data.gmm_problems import grid_means, make_gmm_problems
from diffinv_pl.diffusion import vp_grid
from diffinv_pl.metrics import mode_weight_tv, random_directions, sliced_wasserstein_1
from diffinv_pl.solvers import dps, oracle
from diffinv_pl.tasks.gmm_benchmark import GMMPosteriorBenchmark, SamplerSpec
from diffinv_pl.utils.stats import mean_ci95

F64 = torch.float64


def test_mcgdiff_problem_construction():
    means = grid_means(6)
    assert means.shape == (25, 6) and set(means.unique().tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    assert torch.equal(means[:, :2], means[:, 2:4])
    probs = make_gmm_problems(8, 2, num_problems=4, seed=1)
    s = torch.linalg.svdvals(probs.operator.matrix)
    assert bool((s <= 1).all()) and bool((s[:, 0] >= s[:, 1]).all())
    assert bool((probs.sigma_y <= s[:, 0]).all())  # sigma_y = u * max singular value
    resid = probs.y[:, 0] - torch.einsum("pij,pj->pi", probs.operator.matrix, probs.x_true)
    assert resid.norm(dim=-1).max() < 6 * probs.sigma_y.max()
    again = make_gmm_problems(8, 2, num_problems=4, seed=1)
    assert torch.equal(again.y, probs.y)
    assert torch.equal(make_gmm_problems(8, 1, 2, seed=1).prior.weights, probs.prior.weights)  # drawn once per dx
    tmpd = make_gmm_problems(8, 1, 3, protocol="tmpd", sigma_y=0.1)
    assert torch.allclose(tmpd.prior.weights, torch.full((1, 25), 0.04, dtype=F64))
    assert torch.allclose(tmpd.sigma_y, torch.full((3,), 0.1, dtype=F64))
    with pytest.raises(ValueError, match="tmpd protocol needs a fixed sigma_y"):
        make_gmm_problems(8, 1, 3, protocol="tmpd")
    with pytest.raises(ValueError, match="even dimension"):
        make_gmm_problems(7, 1, 3)


def test_sliced_wasserstein_of_shifted_gaussians():
    """SW1 between N(0, I) and N(m, I) samples -> E_theta |<theta, m>|, = ||m|| sqrt(2/pi) * E|theta_1| sqrt(d)..."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 20_000
    m = torch.tensor([3.0, 0, 0, 0], dtype=F64)
    dirs = random_directions(2000, d, g)
    sw = sliced_wasserstein_1(torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64) + m, dirs)
    expected = float((dirs.T @ m).abs().mean())  # a shift moves every 1-D quantile by <theta, m>
    assert sw == pytest.approx(expected, abs=0.03)
    same = torch.randn(n, d, generator=g, dtype=F64)
    assert sliced_wasserstein_1(same, same, dirs) == 0.0


def test_mode_weight_tv_counts_component_shares():
    probs = make_gmm_problems(8, 4, num_problems=2, seed=0)
    exact = probs.posterior.sample(4000, torch.Generator().manual_seed(0))
    assert bool((mode_weight_tv(exact, probs.posterior) < 0.05).all())
    wrong = probs.prior.sample(8000, torch.Generator().manual_seed(1)).reshape(2, 4000, 8)
    assert bool((mode_weight_tv(wrong, probs.posterior) > 0.3).all())


def test_mean_ci95():
    assert mean_ci95([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.96 / 3**0.5))


def test_benchmark_writes_per_problem_rows_and_the_table(tmp_path):
    grid = vp_grid(20)
    bench = GMMPosteriorBenchmark(
        {
            "dps": SamplerSpec(partial(dps, grid=grid, zeta=0.1)),
            "oracle": SamplerSpec(partial(oracle, grid=grid), ("gaussian", "posterior")),
        },
        dims=[8], dims_y=[2], num_problems=3, num_samples=300, num_directions=200, dtype="float64",
        output_dir=tmp_path,
    )
    table = bench.run()
    assert [(r["sampler"], r["init"]) for r in table] == [("dps", "gaussian"), ("oracle", "gaussian"), ("oracle", "posterior")]
    rows = list(csv.DictReader((tmp_path / "per_problem.csv").open()))
    assert len(rows) == 3 * 4  # floor + three sampler runs, per problem
    oracle_row = table[2]
    assert oracle_row["sw1"] < 3 * oracle_row["floor_sw1"] + 0.05
    assert table[0]["sw1"] > oracle_row["sw1"]  # DPS is biased; the oracle is not
    assert "| 8 | 2 | drawn | oracle | posterior |" in (tmp_path / "table.md").read_text()


def test_benchmark_rejects_bad_settings_before_sampling(tmp_path):
    spec = SamplerSpec(partial(dps, grid=vp_grid(5)))
    with pytest.raises(ValueError, match="valid: gaussian, prior, posterior"):
        SamplerSpec(partial(dps, grid=vp_grid(5)), ("uniform",))
    with pytest.raises(ValueError, match="SamplingGrid bound to `grid`"):
        SamplerSpec(dps)
    with pytest.raises(ValueError, match="dx must be even"):
        GMMPosteriorBenchmark({"dps": spec}, dims=[9], dims_y=[1], output_dir=tmp_path)
    with pytest.raises(ValueError, match="needs benchmark.sigmas_y"):
        GMMPosteriorBenchmark({"dps": spec}, dims=[8], dims_y=[1], protocol="tmpd", output_dir=tmp_path)
