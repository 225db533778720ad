"""Latent diffusion prior: the discrete-VP eps preconditioner, the ``ldm`` objective, time maps, LatentPrior and
latent DPS / LatentDAPS on a tiny autoencoder."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffinv_pl.diffusion.losses import LDMObjective, build_objective, denoising_loss
from diffinv_pl.diffusion.preconditioning import DiscreteVPEpsPrecond, VPEpsPrecond, discrete_vp_sigmas
from diffinv_pl.diffusion.schedules import alpha_bar_from_betas, sqrt_linear_betas, vp_grid
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.operators.image import Identity, Inpainting
from diffinv_pl.priors.autoencoders import build_autoencoder
from diffinv_pl.priors.checkpoints import objective_sigma_range
from diffinv_pl.priors.latent import DiffusersEpsNet, LatentPrior, ldm_official_prior, with_time_map
from diffinv_pl.solvers import InverseProblem, daps, dps

F64 = torch.float64


class RecordingEpsNet(nn.Module):
    """eps(x, t) = tanh(conv(x)) * (1 + t / 1000), recording the times it receives."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.times: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t):
        self.times.append(t.detach().clone())
        self.inputs.append(x.detach().clone())
        return torch.tanh(self.conv(x)) * (1 + t.reshape(-1, 1, 1, 1) / 1000)


def tiny_autoencoder(image_channels: int = 1, latent_channels: int = 3):
    return build_autoencoder(
        "vq", image_channels=image_channels, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, num_vq_embeddings=16, norm_num_groups=4, mid_block_add_attention=False,
    ).eval().requires_grad_(False)


def tiny_eps_unet(channels: int = 3) -> DiffusersEpsNet:
    torch.manual_seed(0)
    return DiffusersEpsNet(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
    )


# --------------------------------------------------------------------------------------------------- preconditioner
def test_discrete_vp_precond_is_the_ddim_x0_prediction_at_grid_points():
    torch.manual_seed(0)
    net = RecordingEpsNet().double()
    precond = DiscreteVPEpsPrecond(net)
    abar = alpha_bar_from_betas(sqrt_linear_betas(1000, 0.0015, 0.0195))
    sigmas = discrete_vp_sigmas("sqrt_linear", 1000, 0.0015, 0.0195)
    torch.testing.assert_close(sigmas, ((1 - abar) / abar).sqrt())
    for t in (0, 1, 250, 737, 999):
        x_vp = torch.randn(2, 3, 4, 4, dtype=F64)  # DDPM state x_t
        x = x_vp / abar[t].sqrt()  # its VE form
        denoised = precond(x, sigmas[t])
        eps = net(x_vp, torch.full((2,), float(t), dtype=F64))
        ddim_x0 = (x_vp - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        torch.testing.assert_close(denoised, ddim_x0, rtol=1e-10, atol=1e-10)
        assert net.times[-2].tolist() == [float(t), float(t)]  # the exact training index


def test_network_sigma_changes_only_the_network_time():
    torch.manual_seed(1)
    net = RecordingEpsNet().double()
    precond = DiscreteVPEpsPrecond(net)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    sigma = torch.tensor([2.0, 0.5], dtype=F64)
    d_same = precond(x, sigma)
    d_other = precond(x, sigma, network_sigma=torch.tensor([3.0, 0.7], dtype=F64))
    torch.testing.assert_close(net.inputs[0], net.inputs[1])  # c_in from sigma in both calls
    t_same, t_other = net.times
    assert bool((t_other > t_same).all())
    torch.testing.assert_close(t_other, precond.network_time(torch.tensor([3.0, 0.7], dtype=F64)))
    eps_other = net(net.inputs[1], t_other)
    torch.testing.assert_close(d_other, x - sigma.reshape(-1, 1, 1, 1) * eps_other)
    assert not torch.allclose(d_same, d_other)


def test_time_maps_give_the_methods_md_numbers():
    precond = DiscreteVPEpsPrecond(RecordingEpsNet())
    sig = torch.tensor([10.0, 0.1], dtype=F64)
    ldm = with_time_map(precond, "ldm").network_time(sig)
    pixel = with_time_map(precond, "pixel_vp").network_time(sig)
    assert isinstance(with_time_map(precond, "pixel_vp"), VPEpsPrecond)
    assert ldm.tolist() == pytest.approx([736.80, 5.552], abs=2e-3)
    assert pixel.tolist() == pytest.approx([675.37, 26.968], abs=2e-3)
    assert [round(v) for v in ldm.tolist()] == [737, 6] and [round(v) for v in pixel.tolist()] == [675, 27]
    with pytest.raises(UserError, match="time_map"):
        with_time_map(precond, "karras")


def test_ldm_objective_draws_table_sigmas_and_its_loss_is_the_eps_mse():
    obj = build_objective("ldm")
    assert isinstance(obj, LDMObjective)
    sigma = obj.sample_sigma(64, torch.Generator().manual_seed(0))
    table = obj.sigmas()
    assert bool(torch.isin(sigma, table).all()) and len(set(sigma.tolist())) > 40
    lo, hi = objective_sigma_range(obj)
    assert lo == pytest.approx(0.038759, rel=1e-4) and hi == pytest.approx(83.8225, rel=1e-4)
    torch.manual_seed(2)
    net = RecordingEpsNet().double()
    den = obj.precondition(net)
    x0, noise = torch.randn(4, 3, 4, 4, dtype=F64), torch.randn(4, 3, 4, 4, dtype=F64)
    s = table[[0, 10, 500, 999]]
    loss = denoising_loss(den, obj, x0, s, noise)
    x_vp = (x0 + s.reshape(-1, 1, 1, 1) * noise) / (1 + s.reshape(-1, 1, 1, 1) ** 2).sqrt()
    eps = net(x_vp, torch.tensor([0.0, 10, 500, 999], dtype=F64))
    torch.testing.assert_close(loss, (eps - noise).square().flatten(1).mean(1))


# --------------------------------------------------------------------------------------------------- LatentPrior
def test_latent_prior_shapes_ranges_and_gradient_through_decode():
    ae = tiny_autoencoder()
    prior = LatentPrior(DiscreteVPEpsPrecond(tiny_eps_unet()), ae, 0.5, (0.04, 80.0))
    assert prior.state_shape((1, 16, 16)) == (3, 8, 8) and prior.data_range == (0.0, 1.0)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    z = prior.encode(x)
    torch.testing.assert_close(z, 0.5 * ae.encode(x))
    torch.testing.assert_close(prior.decode(z), ae.decode(z / 0.5))
    assert prior.encode(x[None]).shape == (1, 2, 3, 8, 8)  # leading batch dims kept
    assert prior.denoise(z, torch.tensor([1.0, 3.0])).shape == z.shape
    z_req = z.detach().requires_grad_(True)
    prior.decode(z_req).square().sum().backward()
    assert z_req.grad is not None and float(z_req.grad.abs().sum()) > 0
    d1 = prior.denoise(z, 1.0, network_sigma=2.0)
    assert not torch.allclose(d1, prior.denoise(z, 1.0))
    single = LatentPrior(prior.denoiser, ae, 0.5, per_sample_calls=True)  # one call per latent: the same values
    torch.testing.assert_close(single.denoise(z, 1.0, network_sigma=2.0), d1, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="divisible"):
        prior.check_data_shape((1, 15, 16))
    with pytest.raises(UserError, match="channel"):
        prior.check_data_shape((3, 16, 16))


def test_latent_dps_and_latent_daps_return_pixel_samples():
    ae = tiny_autoencoder()
    prior = LatentPrior(DiscreteVPEpsPrecond(tiny_eps_unet()).eval(), ae, 0.5, (0.04, 80.0))
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(2, 1, 16, 16, generator=g)
    op = Inpainting(mask_type="random", drop_range=(0.5, 0.5), channels=1, image_size=16, input_range=(0.0, 1.0))
    problem = InverseProblem(op(x_true), op, 0.05)
    out = dps(problem, prior, grid=vp_grid(4, "sqrt_linear"), zeta=0.5, generator=torch.Generator().manual_seed(1))
    assert out.samples.shape == (2, 1, 16, 16) and bool(torch.isfinite(out.samples).all())
    ident = Identity(channels=1, image_size=16, input_range=(0.0, 1.0))
    out = daps(InverseProblem(ident(x_true), ident, 0.05), prior, num_levels=3, sigma_max=10.0, ode_steps=2,
               mcmc_steps=3, lr=1e-4, generator=torch.Generator().manual_seed(2))
    assert out.samples.shape == (2, 1, 16, 16) and bool(torch.isfinite(out.samples).all())
    assert float(out.samples.min()) >= -0.5 and float(out.samples.max()) <= 1.5  # decoded images, not latents


def test_ldm_official_prior_reads_a_converted_folder_and_names_the_download(tmp_path):
    with pytest.raises(UserFileError) as err:
        ldm_official_prior(tmp_path / "ldm_ffhq")
    msg = str(err.value)
    assert "ffhq.zip" in msg and "diffinv_pl.priors.compvis convert" in msg and "weights/ldm_ffhq" in msg
    assert "ldm_tiny" in msg and "experiment=resample_sr_tiny" in msg
    ae = tiny_autoencoder(image_channels=3)
    ae.model.save_pretrained(tmp_path / "conv" / "vqvae")
    tiny_eps_unet().unet.save_pretrained(tmp_path / "conv" / "unet")
    info = {"beta_schedule": "sqrt_linear", "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps": 1000,
            "scale_factor": 0.8, "latent_channels": 3, "downsample_factor": 2}
    (tmp_path / "conv" / "ldm.json").write_text(json.dumps(info))
    prior = ldm_official_prior(tmp_path / "conv")
    assert prior.latent_scale == 0.8 and prior.state_shape((3, 16, 16)) == (3, 8, 8)
    assert prior.sigma_range == pytest.approx((0.038759, 83.8225), rel=1e-4)  # sqrt-linear (CompVis "linear")
    z = prior.encode(torch.rand(1, 3, 16, 16))
    assert prior.denoise(z, 1.0).shape == z.shape
    pixel = ldm_official_prior(tmp_path / "conv", time_map="pixel_vp")
    assert isinstance(pixel.denoiser, VPEpsPrecond)
    (tmp_path / "conv" / "ldm.json").write_text(json.dumps({**info, "latent_channels": 4}))
    with pytest.raises(UserError, match="latent_channels"):
        ldm_official_prior(tmp_path / "conv")


def test_missing_latent_checkpoint_names_the_training_commands(tmp_path):
    from diffinv_pl.priors.latent import latent_prior

    with pytest.raises(UserFileError) as err:
        latent_prior(tmp_path / "ldm_tiny" / "last.ckpt")
    msg = str(err.value)
    assert str(tmp_path / "ldm_tiny" / "last.ckpt") in msg and "experiment=ldm_tiny" in msg
    assert "experiment=autoencoder_tiny" in msg and "prior.path=" in msg
