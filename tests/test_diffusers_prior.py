"""Local diffusers folders (conf/prior/diffusers.yaml): a tiny UNet2DModel + DDPMScheduler written with
``save_pretrained`` in the pipeline layout (or a bare model folder with the schedule as options), loaded through the
real config and compared with the unet called directly and with the scheduler's own x0 (``step().pred_original_sample``)
and ``alphas_cumprod``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from diffinv_pl.errors import UserError, UserFileError, find_user_error
from diffinv_pl.priors import diffusers_folder as df

T = 1000


class WritesMarker:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_unet(out_channels: int = 3, seed: int = 0):
    """2 levels (8, 16 ch), attention at the second; 45 k parameters, every one redrawn from a seeded generator
    (N(0, 1/fan_in); 1-D: 1 + N(0, 0.01)) so the output depends visibly on the time."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.ndim > 1 else 1.0 + 0.1 * noise)
    return unet.eval()


def save_pipeline(root: Path, unet, **scheduler_kwargs):
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(clip_sample=False, **scheduler_kwargs)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(root))
    return scheduler


def load(path: Path, *options: str):
    from hydra.utils import instantiate

    from conftest import compose

    cfg = compose("evaluate", ["prior=diffusers", f"prior.path={path}", f"paths.output_dir={path.parent / 'out'}",
                               *options])
    return instantiate(cfg.prior)


@pytest.fixture(scope="module")
def eps_unet():
    return tiny_unet()


@pytest.fixture()
def pipeline(tmp_path, eps_unet):
    scheduler = save_pipeline(tmp_path / "ddpm", eps_unet)  # DDPM linear 1e-4 -> 0.02, 1000 steps, epsilon
    return tmp_path / "ddpm", scheduler


def test_pipeline_folder_denoises_like_the_unet(pipeline, eps_unet):
    """D(x, sigma_t) = x - sigma_t eps(sqrt(abar_t) x, t) with abar_t the scheduler's alphas_cumprod, at grid points;
    the network time is the training index there."""
    path, scheduler = pipeline
    prior = load(path)
    assert isinstance(prior, df.NetworkPrior) and prior.data_range == (-1.0, 1.0) and prior.image_channels == 3
    abar = scheduler.alphas_cumprod.double()
    sig = ((1 - abar) / abar).sqrt()
    # the scheduler's alphas_cumprod is float32: 1 - abar_0 = 1e-4 carries a 1e-4 relative rounding error
    assert prior.sigma_range[0] == pytest.approx(float(sig[0]), rel=2e-4)  # 0.0100005 (float64)
    assert prior.sigma_range[1] == pytest.approx(float(sig[-1]), rel=1e-5)  # 157.41
    assert prior.sigma_range[1] == pytest.approx(157.407, abs=1e-2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for t in (0, 250, 999):
        sigma = float(sig[t])
        assert float(prior.denoiser.network_time(torch.tensor([sigma]))) == pytest.approx(t, abs=1e-3)
        with torch.no_grad():
            eps = eps_unet(math.sqrt(float(abar[t])) * x, torch.full((2,), float(t))).sample
            off = eps_unet(math.sqrt(float(abar[t])) * x, torch.full((2,), float(t) + 30)).sample
            got = prior.denoise(x, sigma)
        want = x - sigma * eps
        torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, sigma), rtol=1e-5)
        assert (x - sigma * off - want).abs().max() > 1e-2 * sigma  # a wrong time map would be seen


@pytest.mark.parametrize("prediction, schedule, learned, bare", [
    ("v_prediction", "squaredcos_cap_v2", True, True),
    ("sample", "scaled_linear", True, False),
    ("epsilon", "scaled_linear", False, True),
])
def test_prediction_types_match_the_scheduler_x0(tmp_path, prediction, schedule, learned, bare):
    """The denoiser equals DDPMScheduler.step(...).pred_original_sample (x0 from eps / v / sample, the first C
    channels of a learned-variance output) at x_t = sqrt(abar_t) x; bare: a UNet folder with the schedule as options."""
    from diffusers import DDPMScheduler

    unet = tiny_unet(6 if learned else 3, seed=2)
    kwargs = dict(num_train_timesteps=50, beta_schedule=schedule, beta_start=1e-3, beta_end=0.03,
                  prediction_type=prediction, variance_type="learned_range" if learned else "fixed_small")
    if bare:
        unet.save_pretrained(str(tmp_path / "unet_only"))
        scheduler = DDPMScheduler(clip_sample=False, **kwargs)
        prior = load(tmp_path / "unet_only", *[f"prior.{k}={v}" for k, v in kwargs.items()])
    else:
        scheduler = save_pipeline(tmp_path / "pipe", unet, **kwargs)
        prior = load(tmp_path / "pipe")
    abar = scheduler.alphas_cumprod.double()
    sig = ((1 - abar) / abar).sqrt()
    assert prior.sigma_range == pytest.approx((float(sig[0]), float(sig[-1])), rel=2e-4)  # float32 alphas_cumprod
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for t in (0, 17, 49):
        x_t = math.sqrt(float(abar[t])) * x
        with torch.no_grad():
            out = unet(x_t, torch.full((2,), float(t))).sample
            want = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
            got = prior.denoise(x, float(sig[t]))
        torch.testing.assert_close(got, want, atol=2e-4 * max(1.0, float(sig[t])), rtol=1e-4)


def test_data_range_adapter(pipeline, eps_unet):
    """prior.data_range=[0,1]: D_01(y, s) = (D(2y - 1, 2s) + 1) / 2 and the sigma range halves."""
    path, _ = pipeline
    full, adapted = load(path), load(path, "prior.data_range=[0,1]")
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(adapted.denoise(y, 0.3), (full.denoise(2 * y - 1, 0.6) + 1) / 2)
    assert adapted.data_range == (0.0, 1.0) and adapted.sigma_range[1] == pytest.approx(full.sigma_range[1] / 2)


def test_folders_that_are_not_pixel_priors_are_refused(tmp_path, eps_unet):
    with pytest.raises(UserFileError, match=r"no diffusers folder at .*nowhere.*unet/config\.json"):
        df.diffusers_prior(tmp_path / "nowhere")
    with pytest.raises(Exception) as err:  # the config demands a path
        load(tmp_path / "nowhere")
    assert isinstance(find_user_error(err.value), UserFileError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFileError, match="no UNet config"):
        df.diffusers_prior(tmp_path / "empty")
    bare = tmp_path / "bare"
    eps_unet.save_pretrained(str(bare))
    with pytest.raises(UserError, match=r"lacks \['beta_schedule', 'num_train_timesteps', 'beta_start', 'beta_end'\]"):
        df.diffusers_prior(bare)
    for key, value, message in [("beta_schedule", "sigmoid", "'sigmoid' is not supported"),
                                ("prediction_type", "flow", "'flow' is not supported"),
                                ("variance_type", "learned", "needs 6: set prior.variance_type=fixed_small")]:
        options = dict(beta_schedule="linear", num_train_timesteps=10, beta_start=1e-4, beta_end=0.02)
        with pytest.raises(UserError, match=message):
            df.diffusers_prior(bare, **{**options, key: value})
    pipe = tmp_path / "zsnr"
    save_pipeline(pipe, eps_unet, rescale_betas_zero_snr=True)
    with pytest.raises(UserError, match="rescale_betas_zero_snr"):
        df.diffusers_prior(pipe)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "sigma_min": 0.01, "sigma_max": 1348.0}))
    with pytest.raises(UserError, match="ScoreSdeVeScheduler.*not a discrete DDPM-family scheduler"):
        df.diffusers_prior(pipe)
    (pipe / "vae").mkdir()
    with pytest.raises(UserError, match="latent or text-conditioned"):
        df.diffusers_prior(pipe)


def test_weights_are_loaded_strictly_and_safely(tmp_path, eps_unet):
    """No weights, missing / misshaped weights and a pickle with code: errors naming them, never random weights."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "pipe"
    save_pipeline(root, eps_unet)
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    with pytest.raises(UserFileError, match="no weights in .*unet.*diffusion_pytorch_model.safetensors"):
        df.diffusers_prior(root)
    save_file({k: v for k, v in state.items() if k != "conv_out.bias"}, str(weights))
    with pytest.raises(UserError, match=r"missing \['conv_out\.bias'\]"):
        df.diffusers_prior(root)
    save_file(state, str(weights))
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 24]}))
    with pytest.raises(UserError, match="could not load the UNet2DModel.*size mismatch"):
        df.diffusers_prior(root)
    (root / "unet" / "config.json").write_text(json.dumps(config))
    weights.unlink()
    marker = tmp_path / "marker"
    torch.save({**state, "extra": WritesMarker(marker)}, root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="could not load the UNet2DModel.*posix.system"):
        df.diffusers_prior(root)
    assert not marker.exists()
    torch.save(state, root / "unet" / "diffusion_pytorch_model.bin")  # a plain .bin state dict loads
    assert df.diffusers_prior(root).image_channels == 3


def test_evaluate_runs_daps_with_a_diffusers_folder(tmp_path):
    """`evaluate.py experiment=daps_sr4_tiny prior=diffusers prior.path=<dir>` (32 px images) runs end to end."""
    from conftest import compose
    from diffinv_pl.cli import run_evaluation

    save_pipeline(tmp_path / "ddpm", tiny_unet(seed=7))
    cfg = compose("evaluate", ["experiment=daps_sr4_tiny", "prior=diffusers", f"prior.path={tmp_path / 'ddpm'}",
                               f"paths.output_dir={tmp_path / 'out'}"])
    table = run_evaluation(cfg)
    assert table[0]["num_samples"] == 2 and math.isfinite(table[0]["psnr"]) and table[0]["psnr"] > 0


def test_trained_betas_and_options_overriding_the_scheduler_file(tmp_path, eps_unet):
    """trained_betas in the file give their own sigmas; explicit options replace the file's schedule."""
    from diffusers import DDPMScheduler

    betas = torch.linspace(1e-3, 0.2, 20, dtype=torch.float64)
    save_pipeline(tmp_path / "pipe", eps_unet, num_train_timesteps=20, trained_betas=betas.tolist())
    prior = df.diffusers_prior(tmp_path / "pipe")
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(prior.denoiser.sigmas, ((1 - abar) / abar).sqrt())
    prior = df.diffusers_prior(tmp_path / "pipe", beta_schedule="scaled_linear", num_train_timesteps=30,
                               beta_start=1e-3, beta_end=0.05)
    reference = DDPMScheduler(num_train_timesteps=30, beta_schedule="scaled_linear", beta_start=1e-3, beta_end=0.05)
    torch.testing.assert_close(1 / (1 + prior.denoiser.sigmas**2), reference.alphas_cumprod.double(), atol=1e-6,
                               rtol=1e-5)
