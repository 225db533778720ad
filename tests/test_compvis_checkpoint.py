"""CompVis LDM checkpoint conversion: tiny original-layout networks (tests/compvis_reference.py) saved as a
Lightning-1.4-style ``model.ckpt``, converted through the CLI, compared output-for-output with the originals."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors import compvis
from diffinv_pl.priors.compvis import (LDMConfig, LDMUNetConfig, VQConfig, convert_ldm_unet, convert_vq_f4,
                                       load_compvis_checkpoint, load_converted_ldm)
import compvis_reference as ref  # tests/ is on sys.path (rootdir-less test modules)

UNET = LDMUNetConfig(image_size=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)
VQ = VQConfig(resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3,
              embed_dim=3, n_embed=16)
CONFIG = LDMConfig(unet=UNET, vq=VQ)
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


class ModelCheckpoint:
    """Stands for Lightning's callback class, pickled (as a dict key) under LIGHTNING_MODULE."""


ModelCheckpoint.__module__ = LIGHTNING_MODULE


class WritesMarker:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def randomize(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Every parameter drawn N(0, 1/fan_in) (1-D ones: 1 + N(0, 0.1^2) for norms' scale, N(0, 0.1^2) otherwise)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.eval()


def reference_models(seed: int = 0) -> tuple[ref.UNetModel, ref.VQModel]:
    g = torch.Generator().manual_seed(seed)
    unet = ref.UNetModel(UNET.in_channels, UNET.out_channels, UNET.model_channels, UNET.channel_mult,
                         UNET.num_res_blocks, UNET.attention_resolutions, UNET.num_head_channels)
    vq = ref.VQModel(VQ.ch, VQ.ch_mult, VQ.num_res_blocks, VQ.z_channels, VQ.embed_dim, VQ.n_embed)
    return randomize(unet, g), randomize(vq, g)


def ldm_state(unet: torch.nn.Module, vq: torch.nn.Module, ema_unet: torch.nn.Module | None) -> dict:
    """The LatentDiffusion state_dict layout, with the first-stage loss / schedule buffers a real file has."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vq.state_dict().items()})
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    state["betas"] = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2
    state["scale_factor"] = torch.tensor(0.75)
    if ema_unet is not None:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int)
        for k, v in ema_unet.state_dict().items():
            state["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v
    return state


def save_lightning_ckpt(path: Path, state: dict, monkeypatch: pytest.MonkeyPatch, extra: dict | None = None) -> Path:
    """torch.save a Lightning-1.4-style checkpoint whose callbacks key is a class from a pytorch_lightning module."""
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[LIGHTNING_MODULE].ModelCheckpoint = ModelCheckpoint
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-6, "params": [0]}]}], "lr_schedulers": []}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def models():
    return reference_models(0)


def test_cli_conversion_matches_original_networks(tmp_path, models, monkeypatch, capsys):
    unet, vq = models
    path = save_lightning_ckpt(tmp_path / "model.ckpt", ldm_state(unet, vq, None), monkeypatch)
    (tmp_path / "tiny.json").write_text(json.dumps({"unet": vars(UNET), "vq": vars(VQ)}))
    compvis.main(["convert", str(path), str(tmp_path / "out"), "--config", str(tmp_path / "tiny.json")])
    assert "wrote" in capsys.readouterr().out
    d_unet, d_vq, record = load_converted_ldm(tmp_path / "out")
    assert record["scale_factor"] == pytest.approx(0.75)
    assert record["beta_schedule"] == "sqrt_linear" and record["num_timesteps"] == 1000
    assert (record["downsample_factor"], record["latent_channels"], record["image_size"]) == (2, 3, 16)
    assert len(record["source"]["sha256"]) == 64 and record["source"]["file"] == "model.ckpt"

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([0, 731])
    with torch.no_grad():
        want = unet(z, t)
        got = d_unet(z, t).sample
    assert want.abs().mean() > 0.02  # a non-trivial output (the tolerance below is ~1e-3 of it)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        h_ref, h = vq.encode(x), d_vq.encode(x).latents
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        q_ref, idx_ref = vq.quantize(h_ref)
        q, _, (_, _, idx) = d_vq.quantize(h)
        assert torch.equal(idx.flatten(), idx_ref)
        assert len(set(idx_ref.tolist())) > 1  # several codes in use
        torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(d_vq.decode(h).sample, vq.decode(h_ref), atol=1e-5, rtol=1e-5)


def test_ema_option_uses_model_ema_weights(tmp_path, models, monkeypatch):
    unet, vq = models
    ema_unet, _ = reference_models(5)
    path = save_lightning_ckpt(tmp_path / "model.ckpt", ldm_state(unet, vq, ema_unet), monkeypatch)
    state = load_compvis_checkpoint(path)
    z, t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500])
    with torch.no_grad():
        plain = convert_ldm_unet(state, UNET)(z, t).sample
        ema = convert_ldm_unet(compvis.ema_unet_state(state), UNET)(z, t).sample
        torch.testing.assert_close(plain, unet(z, t), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ema, ema_unet(z, t), atol=2e-5, rtol=1e-5)
    assert (ema - plain).abs().max() > 1e-2
    compvis.convert_ldm_checkpoint(path, tmp_path / "out", CONFIG, ema=True)
    d_unet, _, record = load_converted_ldm(tmp_path / "out")
    assert record["ema"] is True
    with torch.no_grad():
        torch.testing.assert_close(d_unet(z, t).sample, ema, atol=1e-6, rtol=0)
    no_ema = save_lightning_ckpt(tmp_path / "plain.ckpt", ldm_state(unet, vq, None), monkeypatch)
    with pytest.raises(UserError, match="without --ema"):
        compvis.convert_ldm_checkpoint(no_ema, tmp_path / "out2", CONFIG, ema=True)


def test_missing_and_unexpected_keys_are_listed(models):
    unet, vq = models
    state = ldm_state(unet, vq, None)
    del state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(UserError, match=r"missing \['down_blocks\.0\.resnets\.0\.conv1\.weight'\]"):
        convert_ldm_unet(state, UNET)
    state = ldm_state(unet, vq, None)
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="unexpected.*extra.weight"):
        convert_ldm_unet(state, UNET)
    vq_state = ldm_state(unet, vq, None)
    del vq_state["first_stage_model.quantize.embedding.weight"]
    with pytest.raises(UserError, match=r"missing \['quantize\.embedding\.weight'\]"):
        convert_vq_f4(vq_state, VQ)
    with pytest.raises(UserError, match="shape mismatches.*quantize.embedding.weight"):
        convert_vq_f4(ldm_state(unet, vq, None), VQConfig(**{**vars(VQ), "n_embed": 32}))
    with pytest.raises(UserError, match=r"unexpected \[.*input_blocks\.3\.1\.norm\.bias"):  # 64 ch, 24 per head
        convert_ldm_unet(ldm_state(unet, vq, None), LDMUNetConfig(**{**vars(UNET), "num_head_channels": 24}))


def test_schedule_buffer_must_match(tmp_path, models, monkeypatch):
    unet, vq = models
    state = ldm_state(unet, vq, None)
    compvis.check_schedule(state, CONFIG)  # the float32 buffer of the default schedule passes
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)  # a DDPM linear schedule
    path = save_lightning_ckpt(tmp_path / "model.ckpt", state, monkeypatch)
    with pytest.raises(UserError, match="not the sqrt-linear schedule"):
        compvis.convert_ldm_checkpoint(path, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_refuses_code_in_pickle_and_missing_files(tmp_path, models, monkeypatch):
    unet, vq = models
    marker = tmp_path / "marker"
    path = save_lightning_ckpt(tmp_path / "evil.ckpt", ldm_state(unet, vq, None), monkeypatch,
                               {"hyper_parameters": WritesMarker(marker)})
    with pytest.raises(UserError, match=r"global posix\.system"):
        load_compvis_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(UserFileError, match="no CompVis checkpoint"):
        load_compvis_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(UserFileError, match="no converted LDM folder"):
        load_converted_ldm(tmp_path / "absent")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserFileError, match="ldm.json"):
        load_converted_ldm(tmp_path / "half")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_compvis_checkpoint(tmp_path / "junk.ckpt")


def test_ffhq_architecture_keys_and_shapes_match():
    """The default (LDM FFHQ + VQ-f4) configs: every original key maps onto the diffusers modules with equal shapes
    (built on the meta device: no memory, no weights); the U-Net has the published 274M parameters."""
    from diffusers import UNet2DModel, VQModel

    c, v = LDMUNetConfig(), VQConfig()
    with torch.device("meta"):
        unet = ref.UNetModel(c.in_channels, c.out_channels, c.model_channels, c.channel_mult, c.num_res_blocks,
                             c.attention_resolutions, c.num_head_channels)
        vq = ref.VQModel(v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.embed_dim, v.n_embed)
        d_unet = UNet2DModel(**compvis.unet_diffusers_config(c))
        d_vq = VQModel(**compvis.vq_diffusers_config(v))
    assert sum(p.numel() for p in unet.parameters()) == 274_056_163
    pairs = [(compvis.unet_state_to_diffusers(unet.state_dict(), c), d_unet.state_dict())]
    pairs.append((compvis.vq_state_to_diffusers(vq.state_dict(), v), d_vq.state_dict()))
    for converted, own in pairs:
        assert set(converted) == set(own)
        assert all(converted[k].shape == own[k].shape for k in own)
    assert d_unet.down_blocks[3].attentions[0].heads == 896 // 32 and d_vq.quantize.n_e == 8192


def test_converted_folder_is_the_prior_of_prior_ldm_official(tmp_path, models, monkeypatch):
    """The converted folder through the user-facing prior config (conf/prior/ldm_official.yaml): its denoiser at the
    sigma of a training step t is D(z, sigma_t) = z - sigma_t eps_ref(sqrt(abar_t) z, t) with the ORIGINAL network
    eps_ref, and decode is the original VQ decoder (quantised) of z / scale_factor."""
    from hydra.utils import instantiate

    from conftest import compose
    from diffinv_pl.diffusion.schedules import alpha_bar_from_betas, sqrt_linear_betas

    unet, vq = models
    path = save_lightning_ckpt(tmp_path / "model.ckpt", ldm_state(unet, vq, None), monkeypatch)
    (tmp_path / "tiny.json").write_text(json.dumps({"unet": vars(UNET), "vq": vars(VQ)}))
    compvis.main(["convert", str(path), str(tmp_path / "data" / "weights" / "ldm_ffhq"), "--config",
                  str(tmp_path / "tiny.json")])
    cfg = compose("evaluate", ["prior=ldm_official", f"paths.data_dir={tmp_path / 'data'}", "paths.output_dir=/tmp",
                               "prior.data_range=[-1,1]"])
    prior = instantiate(cfg.prior)
    abar = alpha_bar_from_betas(sqrt_linear_betas(1000, 0.0015, 0.0195).double())
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 8, 8, generator=g)
    for t in (0, 500, 999):
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        with torch.no_grad():
            want = z - sigma * unet((abar[t].sqrt() * z).float(), torch.full((2,), t))
            got = prior.denoise(z, sigma)
        torch.testing.assert_close(got, want, atol=5e-5 * max(1.0, sigma), rtol=1e-4)
    with torch.no_grad():
        q_ref, _ = vq.quantize(z / 0.75)
        torch.testing.assert_close(prior.decode(z), vq.decode(q_ref), atol=1e-5, rtol=1e-5)
