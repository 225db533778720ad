"""Diffusion core: schedules, respacing, sigma <-> alpha-bar, DDIM steps, preconditioning wrappers."""

from __future__ import annotations

import math

import pytest
import torch

from diffinv_pl.diffusion import EDMPrecond, VEPrecond, VPEpsPrecond, edm_grid, edm_sigmas, vp_grid
from diffinv_pl.diffusion.schedules import (
    alpha_bar_from_betas,
    alpha_bar_from_sigma,
    linear_betas,
    make_betas,
    respace_timesteps,
    sigma_from_alpha_bar,
    sqrt_linear_betas,
    vp_continuous_sigma,
    vp_continuous_t,
)
from diffinv_pl.diffusion.steps import ddim_step
from diffinv_pl.priors import GaussianMixture


def test_edm_sigmas_endpoints_and_rho_formula():
    s = edm_sigmas(18, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[-1].item() == pytest.approx(0.002, rel=1e-12)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all())


def test_beta_schedules_match_their_definitions():
    b = linear_betas(1000)
    assert (b[0].item(), b[-1].item()) == pytest.approx((1e-4, 0.02))
    assert linear_betas(250)[-1].item() == pytest.approx(0.08)  # scaled by 1000 / T
    ldm = sqrt_linear_betas(1000)
    assert (ldm[0].item(), ldm[-1].item()) == pytest.approx((0.0015, 0.0195))
    assert torch.allclose(ldm.sqrt().diff(), ldm.sqrt().diff()[0].expand(999), atol=1e-12)
    abar = alpha_bar_from_betas(b)
    assert abar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # exact_posterior.md §0.7: abar_T ~ 4e-5
    with pytest.raises(ValueError, match="valid: linear, sqrt_linear"):
        make_betas("cosine")


def test_sigma_alpha_bar_round_trip_and_continuous_vp_inverse():
    abar = torch.linspace(1e-4, 0.999, 50, dtype=torch.float64)
    assert torch.allclose(alpha_bar_from_sigma(sigma_from_alpha_bar(abar)), abar, rtol=1e-12)
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    assert torch.allclose(vp_continuous_t(vp_continuous_sigma(t)), t, rtol=1e-10)


def test_respacing_follows_guided_diffusion_rules():
    assert respace_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert respace_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(respace_timesteps(1000, 100)) == 100
    assert respace_timesteps(100, "2,3") == [0, 49, 50, 74, 99]
    with pytest.raises(ValueError):
        respace_timesteps(100, "200")


def test_vp_grid_is_the_ddpm_chain():
    grid = vp_grid(1000)
    abar = alpha_bar_from_betas(linear_betas(1000)).flip(0)
    assert torch.allclose(grid.scales[:-1] ** 2, abar)
    assert grid.sigmas[-1] == 0 and grid.scales[-1] == 1 and grid.init_std == 1.0
    assert edm_grid(10, sigma_max=80.0).init_std == 80.0


def test_ddim_eta1_is_the_ddpm_posterior_step():
    """DDIM(eta=1) from t to t-1, in VP coordinates, is the DDPM posterior q(x_{t-1} | x_t, x0_hat)."""
    betas = linear_betas(1000)
    abar = alpha_bar_from_betas(betas)
    t = 500
    ab, ab_prev, beta = abar[t], abar[t - 1], betas[t]
    x_t = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s, sigma = ab.sqrt(), sigma_from_alpha_bar(ab)
    s_prev, sigma_prev = ab_prev.sqrt(), sigma_from_alpha_bar(ab_prev)
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    var = beta * (1 - ab_prev) / (1 - ab)
    z = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = s_prev * ddim_step(x_t / s, x0, sigma, sigma_prev, 1.0, torch.Generator().manual_seed(2))
    assert torch.allclose(out, mean + var.sqrt() * z, rtol=1e-10, atol=1e-12)
    det = ddim_step(x_t / s, x0, sigma, sigma_prev, 0.0)  # eta = 0: x0 + sigma' * eps_hat
    assert torch.allclose(det, x0 + sigma_prev * (x_t / s - x0) / sigma, rtol=1e-12)


class _ExactEps(torch.nn.Module):
    """Exact epsilon predictor of N(0, tau^2 I) data at network time t = 999 * t(sigma)."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x_t, t):
        ab = alpha_bar_from_sigma(vp_continuous_sigma(t / 999.0)).reshape(-1, 1)
        return (1 - ab).sqrt() * x_t / (ab * self.tau**2 + 1 - ab)


class _ExactVE(torch.nn.Module):
    """Raw output F = (D - x) / sigma of N(0, tau^2 I) data with sigma = 2 exp(c_noise)."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x, c_noise):
        sigma = (2 * c_noise.exp()).reshape(-1, 1)
        return -sigma * x / (self.tau**2 + sigma**2)


class _ExactEDM(torch.nn.Module):
    """Raw output F of N(0, tau^2 I) data under EDM preconditioning (sigma_data = 0.5)."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x_in, c_noise):
        sigma = (4 * c_noise).exp().reshape(-1, 1)
        sd = 0.5
        x = x_in * (sigma**2 + sd**2).sqrt()
        d = self.tau**2 / (self.tau**2 + sigma**2) * x
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (d - c_skip * x) / c_out


@pytest.mark.parametrize(
    "wrapper",
    [lambda: VPEpsPrecond(_ExactEps(0.7)), lambda: VEPrecond(_ExactVE(0.7)), lambda: EDMPrecond(_ExactEDM(0.7))],
    ids=["vp_eps", "ve", "edm"],
)
def test_preconditioning_wrappers_give_the_exact_denoiser(wrapper):
    """Wrapping the exact raw network of each parameterisation recovers the analytic Gaussian denoiser."""
    prior = GaussianMixture.gaussian(torch.zeros(3, dtype=torch.float64), 0.49 * torch.eye(3, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 10.0, 80.0], dtype=torch.float64)
    assert torch.allclose(wrapper()(x, sigma), prior.denoise(x, sigma), rtol=1e-9, atol=1e-12)


def test_denoiser_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        EDMPrecond(_ExactEDM(1.0))(torch.zeros(2, 3), torch.tensor(0.0))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        GaussianMixture.gaussian(torch.zeros(2), torch.eye(2)).denoise(torch.zeros(1, 2, dtype=torch.float64), -1.0)
    assert math.isfinite(float(edm_sigmas(2)[0]))


def test_mcgdiff_decreasing_schedule_ends_at_abar_one():
    """MCGdiff's decreasing betas (with abar_0 = 1): the t = 0 point is the final clean point, not a sigma = 0 step."""
    betas = make_betas("mcgdiff_decreasing")
    assert betas[0] == 0 and betas[1].item() == pytest.approx(0.02) and betas[-1].item() == pytest.approx(1e-4)
    grid = vp_grid(100, "mcgdiff_decreasing")
    assert grid.num_steps == 99 and bool((grid.sigmas[:-1] > 0).all())
    abar = alpha_bar_from_betas(betas)
    assert abar[0] == 1 and abar[1].item() == pytest.approx(0.98)
    # the last noisy point of the 100-step respacing is t = 10: sigma ~ 0.47, a large final jump to sigma = 0
    assert grid.sigmas[-2].item() == pytest.approx(sigma_from_alpha_bar(abar[10]).item(), rel=1e-12)
    assert grid.sigmas[-2].item() > 0.4
