"""guided-diffusion (ADM) checkpoints: a tiny original-layout network (tests/adm_reference.py) saved with
``torch.save(state_dict)`` exactly like the released ``ffhq_10m.pt``, loaded through the user-facing prior config
(conf/prior/adm_ffhq.yaml) and compared output for output with the original network."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from diffinv_pl.diffusion.preconditioning import discrete_vp_sigmas
from diffinv_pl.diffusion.schedules import vp_continuous_t
from diffinv_pl.errors import UserError, UserFileError, find_user_error
from diffinv_pl.priors import adm
from diffinv_pl.priors.adm import ADMConfig, convert_adm_unet, load_adm_state_dict
import adm_reference as ref  # tests/ is on sys.path (rootdir-less test modules)

# 2 levels (32, 64 ch), attention at 8 px = ds 2 with 16 ch/head: 4 heads, so the qkv layout matters
TINY = ADMConfig(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                 num_head_channels=16)


class WritesMarker:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def reference(config: ADMConfig) -> ref.UNetModel:
    return ref.UNetModel(config.in_channels, config.model_channels, config.out_channels, config.num_res_blocks,
                         config.attention_ds, config.channel_mult, config.num_head_channels)


def randomize(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Every parameter drawn N(0, 1/fan_in) (1-D ones: 1 + N(0, 0.1^2) for norms' scale, N(0, 0.1^2) otherwise),
    including the convs guided-diffusion initialises to zero (proj_out, out_layers.3, out.2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.eval()


@pytest.fixture(scope="module")
def original() -> ref.UNetModel:
    return randomize(reference(TINY), torch.Generator().manual_seed(0))


@pytest.fixture()
def checkpoint(tmp_path, original) -> Path:
    """The released file format: torch.save of the plain state_dict, under data/weights/ffhq_10m.pt."""
    path = tmp_path / "data" / "weights" / "ffhq_10m.pt"
    path.parent.mkdir(parents=True)
    torch.save(original.state_dict(), path)
    (tmp_path / "tiny.json").write_text(json.dumps(dataclasses.asdict(TINY)))
    return path


def test_converted_unet_matches_original_all_channels(checkpoint, original):
    unet = convert_adm_unet(load_adm_state_dict(checkpoint), TINY)
    assert unet.down_blocks[1].attentions[0].heads == 4 and unet.mid_block.attentions[0].heads == 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 417.25, 999.0])  # fractional times too (VP time map)
    with torch.no_grad():
        want, got = original(x, t), unet(x, t).sample
    assert got.shape == (3, 6, 16, 16)
    for part in (slice(0, 3), slice(3, 6)):  # eps and the variance logits
        assert want[:, part].abs().mean() > 0.05
        torch.testing.assert_close(got[:, part], want[:, part], atol=1e-5, rtol=1e-5)


def test_chunk3_split_of_the_fused_qkv_would_fail(original):
    """The legacy layout is per head [q_h, k_h, v_h]: splitting the fused weight with chunk(3) (the new-order
    layout) gives another network, so the comparison above really checks the per-head split."""
    state = original.state_dict()
    good = convert_adm_unet(state, TINY)
    converted = adm.adm_state_to_diffusers(state, TINY)
    for src, dst in (("input_blocks.3.1", "down_blocks.1.attentions.0"), ("middle_block.1", "mid_block.attentions.0"),
                     *((f"output_blocks.{i}.1", f"up_blocks.0.attentions.{i}") for i in range(2))):
        w, b = state[f"{src}.qkv.weight"][..., 0], state[f"{src}.qkv.bias"]
        for name, wi, bi in zip(("to_q", "to_k", "to_v"), w.chunk(3), b.chunk(3)):
            assert not torch.equal(converted[f"{dst}.{name}.weight"], wi)
            converted[f"{dst}.{name}.weight"], converted[f"{dst}.{name}.bias"] = wi, bi
    from diffusers import UNet2DModel

    wrong = UNet2DModel(**adm.unet_diffusers_config(TINY)).eval()
    wrong.load_state_dict(converted, strict=True)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([10.0, 600.0])
    with torch.no_grad():
        want = original(x, t)
        torch.testing.assert_close(good(x, t).sample, want, atol=1e-5, rtol=1e-5)
        err = (wrong(x, t).sample - want).abs().max()
    assert err > 1e-2


@pytest.mark.parametrize("time_map", ["vp", "ddpm"])
def test_prior_config_loads_the_file_and_denoises_like_the_original(tmp_path, checkpoint, original, time_map):
    """prior=adm_ffhq prior.path=<file> (here the default path under paths.data_dir) with a tiny config file:
    D(x, sigma) = x - sigma eps_ref(x / sqrt(1 + sigma^2), t(sigma)) with the ORIGINAL network's first 3 channels;
    vp: t = 999 t_VP(sigma) (DAPS VPPrecond), ddpm: t = the linear-schedule index (exact at the grid points)."""
    from hydra.utils import instantiate

    from conftest import compose

    cfg = compose("evaluate", ["prior=adm_ffhq", f"paths.data_dir={tmp_path / 'data'}",
                               f"paths.output_dir={tmp_path / 'out'}", f"prior.config={tmp_path / 'tiny.json'}",
                               f"prior.time_map={time_map}"])
    assert cfg.prior.path == str(checkpoint)
    prior = instantiate(cfg.prior)
    assert prior.data_range == (-1.0, 1.0) and prior.image_channels == 3
    lo, hi = prior.sigma_range
    # sqrt((1 - abar_t) / abar_t) at t = 0 and t = 999 of the linear schedule (numpy cumprod: 0.0100005, 157.40728)
    assert lo == pytest.approx(0.0100005, abs=1e-7) and hi == pytest.approx(157.407, abs=1e-3)
    sigmas = discrete_vp_sigmas("linear", 1000, 1e-4, 0.02)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    gaps = []
    for step in (0, 250, 999):
        sigma = float(sigmas[step])
        if time_map == "vp":
            t = 999 * vp_continuous_t(torch.tensor([sigma], dtype=torch.float64), 0.1, 19.9).float()
        else:
            t = torch.tensor([float(step)])
        with torch.no_grad():
            eps = original(x / math.sqrt(1 + sigma ** 2), t.expand(2))[:, :3]
            got = prior.denoise(x, sigma)
        torch.testing.assert_close(got, x - sigma * eps, atol=2e-5 * max(1.0, sigma), rtol=1e-5)
        gaps.append(abs(float(t) - step))
    if time_map == "vp":  # the continuous VP map stays within 3.4 steps of the DDPM index (1002.4 at t = 999)
        assert 3.0 < max(gaps) < 3.5


def test_data_range_adapter_and_imagenet_option(tmp_path, checkpoint, original):
    """prior.data_range=[0,1]: D_01(y, s) = (D(2y - 1, 2s) + 1) / 2 (the config given inline); prior=adm_imagenet
    names the openai file."""
    from hydra.utils import instantiate

    from conftest import compose

    base = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}"]
    inline = ("{image_size:16,model_channels:32,num_res_blocks:1,channel_mult:[1,2],attention_resolutions:[8],"
              "num_head_channels:16}")  # the tiny config written inline (a mapping instead of a JSON file)
    cfg = compose("evaluate", ["prior=adm_ffhq", *base, f"prior.config={inline}", "prior.data_range=[0,1]"])
    assert adm.resolve_config(cfg.prior.config) == TINY
    prior = instantiate(cfg.prior)
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    sigma = 0.3
    t = 999 * vp_continuous_t(torch.tensor([2 * sigma], dtype=torch.float64), 0.1, 19.9).float()
    with torch.no_grad():
        x = 2 * y - 1
        want = (x - 2 * sigma * original(x / math.sqrt(1 + (2 * sigma) ** 2), t)[:, :3] + 1) / 2
        torch.testing.assert_close(prior.denoise(y, sigma), want, atol=2e-5, rtol=1e-5)
    assert prior.sigma_range[1] == pytest.approx(157.407 / 2, abs=1e-3)

    cfg = compose("evaluate", ["prior=adm_imagenet", *base])
    assert cfg.prior.path.endswith("weights/256x256_diffusion_uncond.pt") and cfg.prior.config == "imagenet"
    with pytest.raises(Exception) as err:  # Hydra wraps the UserFileError; the entry points print it alone
        instantiate(cfg.prior)
    found = find_user_error(err.value)
    assert isinstance(found, UserFileError)
    assert "openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt" in str(found)


def test_missing_unexpected_and_misshaped_keys_are_listed(original):
    state = original.state_dict()
    del state["input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(UserError, match=r"missing \['down_blocks\.0\.resnets\.0\.conv1\.weight'\]"):
        convert_adm_unet(state, TINY)
    state = {**original.state_dict(), "label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(UserError, match=r"unexpected \['<unconverted> label_emb\.weight'\]"):
        convert_adm_unet(state, TINY)
    with pytest.raises(UserError, match=r"shape mismatches \['conv_out\.bias: checkpoint \(6,\) vs model \(3,\)"):
        convert_adm_unet(original.state_dict(), dataclasses.replace(TINY, learn_sigma=False))
    with pytest.raises(UserError, match=r"unexpected \[.*input_blocks\.3\.1\.norm\.bias"):  # no attention at 4 px
        convert_adm_unet(original.state_dict(), dataclasses.replace(TINY, attention_resolutions=(4,)))


def test_refuses_code_in_pickle_wrappers_and_missing_files(tmp_path, original):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({**original.state_dict(), "extra": WritesMarker(marker)}, evil)
    with pytest.raises(UserError, match=r"refused to load.*global posix\.system"):
        load_adm_state_dict(evil)
    assert not marker.exists()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": original.state_dict(), "step": 3}, wrapped)
    with pytest.raises(UserError, match=r"not a plain state_dict: entries \['state_dict', 'step'\]"):
        load_adm_state_dict(wrapped)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_adm_state_dict(tmp_path / "junk.pt")
    with pytest.raises(UserFileError) as err:
        adm.adm_prior(tmp_path / "weights" / "ffhq_10m.pt")
    msg = str(err.value)
    assert "ffhq_10m.pt" in msg and "DPS2022/diffusion-posterior-sampling" in msg
    assert "${paths.data_dir}/weights/ffhq_10m.pt" in msg
    with pytest.raises(UserError, match="prior.config='cifar'.*ffhq, imagenet"):
        adm.adm_prior(evil, config="cifar")
    with pytest.raises(UserError, match="valid fields"):
        adm.resolve_config({"channels": 3})
    with pytest.raises(UserError, match="time_map='edm'"):
        adm.adm_prior(evil, time_map="edm")


@pytest.mark.parametrize("name, params", [("ffhq", 93_563_910), ("imagenet", 552_814_086)])
def test_public_architectures_keys_and_shapes_match(name, params):
    """The FFHQ (93.56 M) and ImageNet-uncond (552.8 M) networks, built on the meta device (no memory, no weights):
    every original key maps onto UNet2DModel's with equal shapes, and the parameter counts agree."""
    from diffusers import UNet2DModel

    config = adm.resolve_config(name)
    with torch.device("meta"):
        original = reference(config)
        unet = UNet2DModel(**adm.unet_diffusers_config(config))
    assert sum(p.numel() for p in original.parameters()) == params
    assert sum(p.numel() for p in unet.parameters()) == params
    converted, own = adm.adm_state_to_diffusers(original.state_dict(), config), unet.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    assert unet.mid_block.attentions[0].heads == config.model_channels * 4 // 64
    assert unet.mid_block.attentions[0].group_norm is not None


def test_evaluate_runs_daps_with_the_adm_prior(tmp_path):
    """The documented command shape `evaluate.py experiment=daps_sr4 prior=adm_ffhq prior.path=<file>`, here on the
    tiny DAPS variant (32 px images) with a tiny ADM checkpoint (attention at 16 px = ds 2): it runs end to end."""
    from conftest import compose
    from diffinv_pl.cli import run_evaluation

    config = dataclasses.replace(TINY, image_size=32, attention_resolutions=(16,))
    path = tmp_path / "tiny_adm.pt"
    torch.save(randomize(reference(config), torch.Generator().manual_seed(7)).state_dict(), path)
    (tmp_path / "tiny32.json").write_text(json.dumps(dataclasses.asdict(config)))
    cfg = compose("evaluate", ["experiment=daps_sr4_tiny", "prior=adm_ffhq", f"prior.path={path}",
                               f"prior.config={tmp_path / 'tiny32.json'}", f"paths.output_dir={tmp_path / 'out'}"])
    table = run_evaluation(cfg)
    assert table[0]["num_samples"] == 2 and math.isfinite(table[0]["psnr"]) and table[0]["psnr"] > 0


def test_ffhq_scale_network_converts_exactly():
    """The full ffhq_10m.pt architecture (93.56 M parameters, random weights) converts output for output; a 64 px
    input keeps it to ~4 s on one core (the network is fully convolutional apart from the attention)."""
    config = ADMConfig.ffhq()
    original = randomize(reference(config), torch.Generator().manual_seed(11))
    unet = convert_adm_unet(original.state_dict(), config)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([500.0])
    with torch.no_grad():
        want, got = original(x, t), unet(x, t).sample
    assert want.abs().mean() > 0.05
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
