"""GMM problem generation, metrics, the benchmark table and its random streams."""

from __future__ import annotations

import csv
from functools import partial

import pytest
import torch

from diffinv_pl.data.gmm_problems import PROTOCOLS, grid_means, make_gmm_problems, problem_seed
from diffinv_pl.diffusion import vp_grid
from diffinv_pl.metrics import mode_weight_tv, random_directions, sliced_wasserstein_1
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.solvers import dps, oracle
from diffinv_pl.priors.analytic import SpectralCovariance
from diffinv_pl.tasks.gmm_benchmark import INITS, GMMPosteriorBenchmark, SamplerSpec
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
    # the TMPD variant keeps A, x* and the noise direction across sigma_y; only the noise scale changes
    loud = make_gmm_problems(8, 1, 3, protocol="tmpd", sigma_y=1.0)
    assert torch.equal(loud.operator.matrix, tmpd.operator.matrix) and torch.equal(loud.x_true, tmpd.x_true)
    clean = torch.einsum("pij,pj->pi", tmpd.operator.matrix, tmpd.x_true)
    assert torch.allclose(loud.y[:, 0] - clean, 10 * (tmpd.y[:, 0] - clean), rtol=1e-10, atol=1e-12)
    # problem i is its own stream: the same with 3 or 5 problems per cell
    more = make_gmm_problems(8, 2, num_problems=6, seed=1)
    assert torch.equal(more.y[:4], probs.y) and torch.equal(more.operator.matrix[:4], probs.operator.matrix)
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


def _benchmark(samplers, tmp_path, **kwargs) -> GMMPosteriorBenchmark:
    settings = dict(dims=[8], dims_y=[1], num_problems=3, num_samples=300, num_directions=200, dtype="float64")
    return GMMPosteriorBenchmark(samplers, output_dir=tmp_path, **{**settings, **kwargs})


def test_benchmark_writes_per_problem_rows_and_the_table(tmp_path):
    grid = vp_grid(20)
    bench = _benchmark(
        {
            "dps": SamplerSpec(partial(dps, grid=grid, zeta=0.1)),
            "oracle": SamplerSpec(partial(oracle, grid=grid), ("gaussian", "posterior"), grid=grid),
        },
        tmp_path, dims_y=[2],
    )
    table = bench.run()
    assert [(r["sampler"], r["init"]) for r in table] == [("dps", "gaussian"), ("oracle", "gaussian"), ("oracle", "posterior")]
    rows = list(csv.DictReader((tmp_path / "per_problem.csv").open()))
    assert len(rows) == 3 * 4  # floor + three sampler runs, per problem
    oracle_row = table[2]
    assert oracle_row["sw1"] < 3 * oracle_row["floor_sw1"] + 0.05
    assert table[0]["sw1"] > oracle_row["sw1"]  # DPS is biased; the oracle is not
    assert "| 8 | 2 | drawn | oracle | posterior |" in (tmp_path / "table.md").read_text()

    # the floor is SW1 between the documented reference and floor streams on the documented directions: recompute it
    problems = make_gmm_problems(8, 2, num_problems=3, seed=0)
    ref = problems.posterior.sample(300, bench.generators(8, 2, None, "reference"))
    other = problems.posterior.sample(300, bench.generators(8, 2, None, "floor"))
    dirs = random_directions(200, 8, torch.Generator().manual_seed(bench.stream_seed(8, 2, None, "sw_directions")))
    floor = [float(r["sw1"]) for r in rows if r["sampler"] == "exact"]
    expected = [sliced_wasserstein_1(other[p], ref[p], dirs) for p in range(3)]
    assert floor == pytest.approx(expected, rel=1e-5)
    tv = [float(r["mode_tv"]) for r in rows if r["sampler"] == "exact"]
    assert tv == pytest.approx(mode_weight_tv(other, problems.posterior).tolist(), abs=1e-12)


def test_adding_a_sampler_changes_no_other_number(tmp_path):
    """Each (problem, sampler, init) has its own stream, so a new sampler (here first in the dict, with an exact init)
    leaves the floor and every other sampler's SW1 and mode TV bitwise unchanged."""
    grid = vp_grid(10)
    base = {
        "dps": SamplerSpec(partial(dps, grid=grid, zeta=0.1)),
        "oracle": SamplerSpec(partial(oracle, grid=grid), ("gaussian", "posterior"), grid=grid),
    }
    added = {"dps_strong": SamplerSpec(partial(dps, grid=grid, zeta=1.0), ("gaussian", "prior"), grid=grid), **base}

    def numbers(samplers, out):
        rows = _benchmark(samplers, tmp_path / out, sigmas_y=[0.1], protocol="tmpd", num_samples=200).run_cell(8, 1, 0.1)
        return {(r["sampler"], r["init"], r["problem"]): (r["sw1"], r["mode_tv"], r["n_eff"]) for r in rows}

    before, after = numbers(base, "base"), numbers(added, "added")
    assert len(before) == 4 * 3 and len(after) == 6 * 3
    assert {k: after[k] for k in before} == before  # floor, dps and both oracle inits: exactly equal
    new = [after[("dps_strong", "gaussian", p)][0] for p in range(3)]
    assert new != [before[("dps", "gaussian", p)][0] for p in range(3)]  # the new sampler did run


def test_no_two_problems_or_streams_share_a_seed():
    """sha256 seeds: distinct for every problem of every protocol and cell, for up to 1000 problems per cell (the old
    arithmetic seed * 10**6 + dx * 1000 + dy * 100 + i repeated from 100 problems on), and for every stream."""
    seeds = [
        problem_seed(0, protocol, dx, dy, i)
        for protocol in PROTOCOLS for dx in (8, 80, 800) for dy in (1, 2, 4) for i in range(1000)
    ]
    assert len(set(seeds)) == len(seeds) == 2 * 9 * 1000
    old = lambda dx, dy, i: dx * 1000 + dy * 100 + i  # noqa: E731
    assert old(8, 1, 100) == old(8, 2, 0)  # the collision the hash seeds remove
    assert problem_seed(0, "mcgdiff", 8, 1, 100) != problem_seed(0, "mcgdiff", 8, 2, 0)
    assert problem_seed(1, "mcgdiff", 8, 1, 0) != problem_seed(0, "mcgdiff", 8, 1, 0)

    grid = vp_grid(5)
    bench = GMMPosteriorBenchmark(
        {"dps": SamplerSpec(partial(dps, grid=grid)), "oracle": SamplerSpec(partial(oracle, grid=grid), INITS, grid=grid)},
        dims=[8, 80, 800], dims_y=[1, 2, 4], protocol="tmpd", sigmas_y=[0.01, 0.1, 1.0], num_problems=1000,
    )
    streams = []
    for dx, dy, sigma_y in bench.cells:
        streams.append(bench.stream_seed(dx, dy, sigma_y, "sw_directions"))
        for purpose in [("reference",), ("floor",)] + [("sampler", n, i) for n, s in bench.samplers.items() for i in s.inits]:
            streams += [bench.stream_seed(dx, dy, sigma_y, p, *purpose) for p in range(bench.num_problems)]
    assert len(set(streams)) == len(streams) == 27 * (1 + 1000 * 6)


def test_mixture_sample_with_one_generator_per_problem_row():
    probs = make_gmm_problems(8, 2, num_problems=3, seed=0)
    gens = lambda: [torch.Generator().manual_seed(10 + p) for p in range(3)]  # noqa: E731
    rows = probs.posterior.sample(50, gens())
    for p, g in enumerate(gens()):
        single = GaussianMixture(probs.posterior.log_weights[p : p + 1], probs.posterior.means[p : p + 1], _cov_row(probs.posterior, p))
        assert torch.equal(rows[p], single.sample(50, g)[0])  # row p depends on generator p only
    prior_rows = probs.prior.sample(50, gens())  # one mixture, three generators: three independent rows
    assert prior_rows.shape == (3, 50, 8)
    assert torch.equal(prior_rows[1], probs.prior.sample(50, torch.Generator().manual_seed(11))[0])
    with pytest.raises(ValueError, match="one per problem"):
        probs.posterior.sample(5, gens()[:2])


def _cov_row(mixture: GaussianMixture, p: int) -> SpectralCovariance:
    c = mixture.cov
    return SpectralCovariance(c.lam_perp[p : p + 1], c.W[p : p + 1], c.lam[p : p + 1])


def test_benchmark_rejects_bad_settings_before_sampling(tmp_path):
    spec = SamplerSpec(partial(dps, grid=vp_grid(5)))
    with pytest.raises(ValueError, match="valid: gaussian, prior, posterior"):
        SamplerSpec(partial(dps, grid=vp_grid(5)), ("uniform",))
    with pytest.raises(ValueError, match="must be callable"):
        SamplerSpec("dps")
    with pytest.raises(ValueError, match=r"posterior are drawn at the first grid point.*grid: \$\{sampling_grid\}"):
        SamplerSpec(partial(oracle, grid=vp_grid(5)), ("gaussian", "posterior"))
    with pytest.raises(ValueError, match="runs the solver 'oracle': name it after its solver"):
        GMMPosteriorBenchmark({"dps": SamplerSpec(partial(oracle, grid=vp_grid(5)))}, dims=[8], dims_y=[1], output_dir=tmp_path)
    with pytest.raises(ValueError, match="names must be unique"):
        GMMPosteriorBenchmark({"a": SamplerSpec(partial(dps, grid=vp_grid(5)), name="dps"), "dps": spec}, dims=[8], dims_y=[1], output_dir=tmp_path)
    with pytest.raises(ValueError, match="dps has no hyperparameter\\(s\\) beta"):  # another solver's setting left over
        SamplerSpec(partial(dps, grid=vp_grid(5), beta=1.0))
    with pytest.raises(ValueError, match="dx must be even"):
        GMMPosteriorBenchmark({"dps": spec}, dims=[9], dims_y=[1], output_dir=tmp_path)
    with pytest.raises(ValueError, match="needs benchmark.sigmas_y"):
        GMMPosteriorBenchmark({"dps": spec}, dims=[8], dims_y=[1], protocol="tmpd", output_dir=tmp_path)


def test_gmm_dps_configs_say_which_dps_runs(tmp_path):
    """gmm_dps is the released DPS (zeta 0.1 on the un-squared norm, eta 1, linear betas); gmm_dps_mcgdiff is the MCGdiff
    script's DPS: 0.1 grad ||r||^2 / ||r|| = 0.2 grad ||r||, eta 0.85, decreasing betas, labelled dps_mcgdiff."""
    from hydra.utils import instantiate

    from conftest import compose

    released = compose("evaluate", ["experiment=gmm_dps", f"paths.output_dir={tmp_path}"])
    assert (released.solver.zeta, released.solver.norm, released.solver.eta) == (0.1, "l2", 1.0)
    assert released.sampling_grid.beta_schedule == "linear" and released.task.samplers.solver.name is None
    variant = compose("evaluate", ["experiment=gmm_dps_mcgdiff", f"paths.output_dir={tmp_path}"])
    assert variant.solver._target_ == "diffinv_pl.solvers.dps"
    assert (variant.solver.zeta, variant.solver.norm, variant.solver.eta) == (0.2, "l2", 0.85)
    assert variant.sampling_grid.beta_schedule == "mcgdiff_decreasing"
    bench = instantiate(variant.task, _convert_="all")
    assert list(bench.samplers) == ["dps_mcgdiff", "oracle"]
    assert bench.samplers["dps_mcgdiff"].solver.keywords["eta"] == 0.85
