"""ReSample (diffinv_pl/solvers/resample.py) against the released schedule, closed forms and independent computations,
on a Gaussian-mixture latent with a linear decoder (diffinv_pl/priors/linear_latent.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffinv_pl.errors import UserError
from diffinv_pl.operators import MatrixOperator
from diffinv_pl.priors import GaussianMixture
from diffinv_pl.priors.linear_latent import LinearDecoderPrior
from diffinv_pl.solvers import SOLVERS, InverseProblem
from diffinv_pl.solvers.resample import (
    batched_adamw,
    dc_events,
    resample,
    resample_alpha_bars,
    resampling_variance,
    stochastic_resample,
)

F64 = torch.float64


def _setup(dx: int = 5, dz: int = 3, dy: int = 4, rows: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = GaussianMixture.isotropic(torch.tensor([0.6, 0.4], dtype=F64), 1.5 * torch.randn(2, dz, generator=g, dtype=F64), 0.5)
    W = torch.randn(dx, dz, generator=g, dtype=F64)
    prior = LinearDecoderPrior(latent, W, offset=0.1 * torch.randn(dx, generator=g, dtype=F64))
    A = torch.randn(dy, dx, generator=g, dtype=F64) / math.sqrt(dx)
    y = prior.sample(rows, g) @ A.T + 0.05 * torch.randn(rows, dy, generator=g, dtype=F64)
    return prior, A, y


def _problem(A, y):
    return InverseProblem(y, MatrixOperator(A), 0.05)


# ------------------------------------------------------------------------------------------ released constants
def test_event_schedule_is_the_released_one():
    events = dc_events(500, 10, 3)
    pixel = sorted(i for i, s in events.items() if s == "pixel")
    latent = sorted(i for i, s in events.items() if s == "latent")
    assert len(events) == 33
    assert pixel == list(range(170, 331, 10)) and latent == list(range(10, 161, 10))


def test_ddim_grid_and_resampling_variances_are_the_released_ones():
    abar, abar_prev, timesteps = resample_alpha_bars(500, 1000, "sqrt_linear")
    assert timesteps[:3] == [1, 3, 5] and timesteps[-1] == 999 and len(timesteps) == 500
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=F64) ** 2
    cum = torch.cumprod(1 - betas, 0)
    assert float(abar[0]) == pytest.approx(float(cum[1]), rel=1e-12)
    assert float(abar_prev[0]) == pytest.approx(float(cum[0]), rel=1e-12)
    assert float(abar_prev[330]) == pytest.approx(float(cum[659]), rel=1e-12)
    for index, expected in ((330, 0.884), (170, 0.424), (160, 0.401), (10, 0.121)):
        assert float(resampling_variance(abar[index], abar_prev[index], 40.0)) == pytest.approx(expected, abs=6e-4)


# ---------------------------------------------------------------------------------------------- inner optimiser
def _released_loop(loss_fn, init, lr, max_iters, tol, window):
    """The released pixel/latent optimisation loop for one sample, with torch.optim.AdamW."""
    v = init.clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=lr)
    losses = []
    for itr in range(max_iters):
        opt.zero_grad()
        loss = loss_fn(v)
        loss.backward()
        opt.step()
        cur = float(loss.detach())
        if window is not None:
            losses.append(cur)
            if itr >= window:
                if losses[0] < cur:
                    break
                losses.pop(0)
        if cur < tol**2:
            break
    return v.detach(), itr + 1


@pytest.mark.parametrize("window", [None, 20])
def test_batched_adamw_equals_torch_adamw_one_sample_at_a_time(window):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 6, generator=g, dtype=F64)
    y = torch.randn(3, 4, generator=g, dtype=F64)
    y[1] *= 0.01  # this one reaches the tolerance early
    init = torch.randn(3, 6, generator=g, dtype=F64)

    def losses(v):
        return (y - torch.tanh(v) @ A.T).pow(2).mean(-1)

    out, iters = batched_adamw(losses, init, 1, lr=2e-2, max_iters=300, tolerance=3e-2, divergence_window=window)
    for b in range(3):
        ref, n = _released_loop(lambda v: (y[b] - torch.tanh(v) @ A.T).pow(2).mean(), init[b], 2e-2, 300, 3e-2, window)
        assert int(iters[b]) == n
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-12)
    assert len(set(iters.tolist())) > 1, "the test needs samples that stop at different iterations"


def test_pixel_stage_solution_is_the_inverse_of_a_square_operator():
    g = torch.Generator().manual_seed(5)
    A = torch.eye(6, dtype=F64) + 0.2 * torch.randn(6, 6, generator=g, dtype=F64)
    y = torch.randn(2, 6, generator=g, dtype=F64)
    exact = torch.linalg.solve(A, y.T).T
    start = exact + 0.3 * torch.randn(2, 6, generator=g, dtype=F64)  # released start: the decoded look-ahead estimate
    x, iters = batched_adamw(lambda v: (y - v @ A.T).pow(2).mean(-1), start, 1, lr=1e-2, max_iters=2000, tolerance=1e-3)
    assert bool((iters < 2000).all())  # stopped on the tolerance: mean ||A (x - x*)||^2 < 1e-6
    bound = math.sqrt(6) * 1e-3 / float(torch.linalg.svdvals(A).min())
    assert float((x - exact).norm(dim=-1).max()) < bound


def test_latent_stage_solution_is_the_least_squares_latent():
    """argmin_z ||y - A W z||^2 = (A W)^+ y for a well-conditioned A W of full column rank (y off its range: the
    tolerance is never met, AdamW runs to its iteration limit). Without weight decay AdamW reaches it to rounding;
    the released decay 0.01 leaves a bias of a few 1e-3."""
    g = torch.Generator().manual_seed(7)
    W, _ = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=F64))
    prior = LinearDecoderPrior(GaussianMixture.isotropic(torch.ones(1, dtype=F64), torch.zeros(1, 3, dtype=F64)), W)
    A = torch.eye(4, 5, dtype=F64) + 0.1 * torch.randn(4, 5, generator=g, dtype=F64)
    y = torch.randn(2, 4, generator=g, dtype=F64)
    target = torch.linalg.lstsq(A @ W, y.T).solution.T
    start = target + torch.randn(target.shape, generator=g, dtype=F64)

    def solve(weight_decay: float) -> Tensor:
        z, iters = batched_adamw(lambda v: (y - prior.decode(v) @ A.T).pow(2).mean(-1), start, 1, lr=5e-3,
                                 max_iters=3000, tolerance=1e-3, weight_decay=weight_decay, divergence_window=None)
        assert bool((iters == 3000).all())
        return z

    assert float((solve(0.01) - target).norm(dim=-1).max()) < 1e-2
    assert float((solve(0.0) - target).norm(dim=-1).max()) < 1e-10


def test_stochastic_resampling_draws_have_the_closed_form_moments():
    n = 40000
    z_hat, z_keep = torch.full((n, 2), 0.7, dtype=F64), torch.full((n, 2), -1.2, dtype=F64)
    abar_prev, s2 = 0.6, 0.42
    draws = stochastic_resample(z_hat, z_keep, abar_prev, s2, torch.Generator().manual_seed(0))
    mean = (s2 * math.sqrt(abar_prev) * 0.7 + (1 - abar_prev) * -1.2) / (s2 + 1 - abar_prev)
    var = 1 / (1 / s2 + 1 / (1 - abar_prev))
    assert abs(float(draws.mean()) - mean) < 5 * math.sqrt(var / (2 * n))
    assert abs(float(draws.var()) / var - 1) < 5 * math.sqrt(2 / (2 * n))


# --------------------------------------------------------------------------------------------------- the solver
SMALL = dict(num_steps=40, num_train_steps=1000, dc_period=3, lookahead_steps=2, pixel_max_iters=150,
             latent_max_iters=100, divergence_window=30)


def test_batched_equals_one_at_a_time_and_events_are_reported():
    prior, A, y = _setup()
    gens = lambda rows: [torch.Generator().manual_seed(10 + r) for r in rows]  # noqa: E731
    steps: list[dict] = []
    batch = resample(_problem(A, y), prior, generator=gens(range(3)), callback=steps.append, **SMALL)
    for r in range(3):
        alone = resample(_problem(A, y[r : r + 1]), prior, generator=gens([r]), **SMALL).samples
        torch.testing.assert_close(alone[0], batch.samples[r], rtol=0, atol=1e-5)
    events = {s["step"]: s["event"] for s in steps if "event" in s}
    expected = {40 - 1 - i: s for i, s in dc_events(40, 3, 3).items()}
    assert {k: v for k, v in events.items() if v != "final"} == expected and events[40] == "final"
    assert {"pixel", "latent"} <= set(expected.values())
    iters = [s["inner_iterations"] for s in steps if "inner_iterations" in s]
    assert all(t.shape == (3,) and bool((t >= 1).all()) for t in iters)
    assert batch.cost.denoiser_calls == 40 + 2 * sum(1 for v in expected.values())
    assert bool(torch.isfinite(batch.samples).all())


def _independent_guided_ddim(prior, A, y, z, abar, abar_prev, tweedie, rule, scale):
    """The main loop without events, recomputed from the VP formulas with eps = (z / sqrt(a) - D) / sigma."""
    for index in reversed(range(len(abar))):
        a, ap = float(abar[index]), float(abar_prev[index])
        z = z.detach().requires_grad_(True)
        sigma = math.sqrt((1 - a) / a)
        d = prior.latent.denoise(z / math.sqrt(a), sigma)
        eps = (z / math.sqrt(a) - d) / sigma
        x0 = d if tweedie == "exact" else (z - (1 - a) * eps) / math.sqrt(a)
        loss = (y - prior.decode(x0) @ A.T).norm(dim=-1).sum()
        (grad,) = torch.autograd.grad(loss, z)
        h = scale * a if rule == "alphabar" else scale
        z = (math.sqrt(ap) * d + math.sqrt(1 - ap) * eps).detach() - h * grad
    return prior.decode(z)


@pytest.mark.parametrize("tweedie,rule,scale", [("original", "alphabar", 0.5), ("exact", "alphabar", 0.5),
                                                ("original", "constant", 0.05)])
def test_guided_ddim_equals_an_independent_computation(tweedie, rule, scale):
    prior, A, y = _setup()
    z0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = resample(_problem(A, y), prior, num_steps=20, dc_period=1000, final_latent_optimization=False,
                   tweedie=tweedie, guidance_scale_rule=rule, guidance_scale=scale, x_init=z0).samples
    abar, abar_prev, _ = resample_alpha_bars(20, 1000, "sqrt_linear")
    ref = _independent_guided_ddim(prior, A, y, z0, abar, abar_prev, tweedie, rule, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_tweedie_options_give_different_samples():
    prior, A, y = _setup()
    z0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    kw = dict(num_steps=20, dc_period=1000, final_latent_optimization=False, x_init=z0)
    a = resample(_problem(A, y), prior, tweedie="original", **kw).samples
    b = resample(_problem(A, y), prior, tweedie="exact", **kw).samples
    assert float((a - b).abs().max()) > 1e-4


class _RecordingPrior(LinearDecoderPrior):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[tuple[float, float | None]] = []

    def denoise(self, x, sigma, *, generator=None, network_sigma=None):
        self.calls.append((float(sigma), None if network_sigma is None else float(network_sigma)))
        return super().denoise(x, sigma, generator=generator)


@pytest.mark.parametrize("mode", ["released", "corrected"])
def test_lookahead_network_time(mode):
    """One event at index 3 of 8 steps with 2 look-ahead steps: released = coefficients of index 3, 2 and network
    times of 2, 1; corrected = both of 2, 1."""
    prior, A, y = _setup()
    rec = _RecordingPrior(prior.latent, prior.W, prior.offset)
    resample(_problem(A, y), rec, num_steps=8, dc_period=3, dc_splits=2, lookahead_steps=2,
             lookahead_network_time=mode, final_latent_optimization=False, latent_max_iters=5,
             generator=torch.Generator().manual_seed(0))
    abar, _, _ = resample_alpha_bars(8, 1000, "sqrt_linear")
    sig = [math.sqrt((1 - float(a)) / float(a)) for a in abar]
    assert dc_events(8, 3, 2) == {3: "latent"}
    lookahead = rec.calls[5:7]  # main steps at indices 7 .. 3, then the look-ahead
    if mode == "released":
        expected = [(sig[3], sig[2]), (sig[2], sig[1])]
    else:
        expected = [(sig[2], None), (sig[1], None)]
    assert [(pytest.approx(s), None if n is None else pytest.approx(n)) for s, n in expected] == lookahead
    assert len(rec.calls) == 8 + 2


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=600), dict(num_steps=300), dict(tweedie="approx"), dict(gamma=0.0),
                                 dict(guidance_scale_rule="half"), dict(lookahead_network_time="x"),
                                 dict(pixel_lr=-1.0), dict(adam_betas=[0.9, 1.0]), dict(divergence_window=0),
                                 dict(beta_schedule="cosine"), dict(lookahead_steps=1.5)])
def test_bad_hyperparameters_are_refused_before_any_work(bad):
    prior, A, y = _setup()
    rec = _RecordingPrior(prior.latent, prior.W, prior.offset)
    problem = _problem(A, y)
    with pytest.raises(UserError, match="ReSample"):
        resample(problem, rec, **bad)
    with pytest.raises(UserError, match="ReSample"):
        SOLVERS["resample"].check_hyperparameters(problem.operator, **bad)
    assert rec.calls == [] and problem.operator.forward_calls == 0


def test_released_lookahead_needs_network_sigma_and_corrected_runs_on_a_pixel_prior():
    prior, A, y = _setup()
    problem = InverseProblem(prior.sample(2, torch.Generator().manual_seed(0)) @ A.T, MatrixOperator(A), 0.05)
    pixel_prior = GaussianMixture.isotropic(torch.tensor([1.0], dtype=F64), torch.zeros(1, 5, dtype=F64), 1.0)
    with pytest.raises(UserError, match="network_sigma.*corrected"):
        resample(problem, pixel_prior, num_steps=20, dc_period=2)
    out = resample(problem, pixel_prior, num_steps=20, dc_period=2, lookahead_network_time="corrected",
                   generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (2, 5) and bool(torch.isfinite(out.samples).all())


def test_nan_names_the_step():
    prior, A, y = _setup()
    problem = _problem(A.clone(), y)
    problem.operator.matrix[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0"):
        resample(problem, prior, num_steps=10, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- GMM benchmark rows
def test_linear_decoder_cell_has_the_cells_exact_posterior():
    """The benchmark's linear-decoder problem: W a rotation, A W = A', and the latent posterior through A W is the
    cell's exact posterior."""
    from diffinv_pl.data.gmm_problems import make_gmm_problems
    from diffinv_pl.tasks.gmm_benchmark import linear_decoder_problem

    probs = make_gmm_problems(8, 2, num_problems=3, seed=0)
    problem = InverseProblem(probs.y, MatrixOperator(probs.operator.matrix), probs.sigma_y[:, None, None], batch_shape=(3, 5))
    latent_problem, prior = linear_decoder_problem(problem, probs.prior, seed=11)
    torch.testing.assert_close(prior.W.T @ prior.W, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(latent_problem.operator.matrix @ prior.W, probs.operator.matrix, rtol=0, atol=1e-12)
    post = prior.latent_posterior(latent_problem.operator.matrix, probs.y.reshape(3, 2), probs.sigma_y)
    torch.testing.assert_close(post.means, probs.posterior.means, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(post.log_weights, probs.posterior.log_weights, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("experiment,target,label", [("gmm_resample", "diffinv_pl.solvers.resample", None),
                                                     ("gmm_latent_daps", "diffinv_pl.solvers.daps", "daps_latent")])
def test_gmm_latent_experiments_run_through_the_linear_decoder(tmp_path, experiment, target, label):
    from conftest import compose

    cfg = compose("evaluate", [f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    spec = cfg.task.samplers.solver
    assert spec.solver._target_ == target and spec.linear_decoder is True and spec.name == label
    assert list(cfg.task.dims) == [8]


# ------------------------------------------------------------------------------------- with the real LatentPrior
def test_released_lookahead_gives_the_eps_network_the_previous_timestep():
    """ReSample on a LatentPrior (tiny VQ autoencoder, a recording eps network, discrete LDM times): the main steps
    give the network t_i = 1 + 125 i for i = 7 .. 3; the look-ahead before the event at index 3 gives it t_2, t_1
    (the released off-by-one: the coefficients are those of index 3, 2). Samples are decoded images."""
    from test_latent_prior import RecordingEpsNet, tiny_autoencoder

    from diffinv_pl.diffusion.preconditioning import DiscreteVPEpsPrecond
    from diffinv_pl.operators.image import Inpainting
    from diffinv_pl.priors.latent import LatentPrior

    torch.manual_seed(0)  # the network's initialisation only
    net = RecordingEpsNet()
    prior = LatentPrior(DiscreteVPEpsPrecond(net), tiny_autoencoder(), 0.5)
    x_true = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    op = Inpainting(mask_type="random", drop_range=(0.5, 0.5), channels=1, image_size=8, input_range=(0.0, 1.0))
    out = resample(InverseProblem(op(x_true), op, 0.05), prior, num_steps=8, dc_period=3, dc_splits=2,
                   lookahead_steps=2, latent_max_iters=3, final_latent_optimization=False,
                   generator=torch.Generator().manual_seed(1))
    times = [sorted(set(t.round().long().tolist())) for t in net.times]
    main_then_lookahead = (7, 6, 5, 4, 3) + (2, 1) + (2, 1, 0)  # then the main steps at indices 2, 1, 0
    assert times == [[1 + 125 * i] for i in main_then_lookahead]
    assert out.samples.shape == (2, 1, 8, 8) and bool(torch.isfinite(out.samples).all())
