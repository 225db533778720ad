"""Latent diffusion training (DiffusionTask latent mode): ldm_tiny through run_training, reload through the real
conf/prior/latent.yaml, the stored latent scale, and the mismatch errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import compose
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.autoencoders import build_autoencoder, load_autoencoder
from diffinv_pl.priors.checkpoints import PriorCheckpointDescription
from diffinv_pl.priors.latent import LatentPrior
from diffinv_pl.training import run_training


def save_tiny_autoencoder(path, image_channels: int = 1, latent_channels: int = 3, seed: int = 0):
    ae = build_autoencoder(
        "vq", image_channels=image_channels, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, num_vq_embeddings=16, norm_num_groups=4, mid_block_add_attention=False,
        seed=seed,
    )
    ae.model.save_pretrained(path)
    return path


def build(cfg, **overrides):
    """instantiate(cfg, **overrides), re-raising the error of the target itself (Hydra wraps it)."""
    try:
        return instantiate(cfg, **overrides)
    except InstantiationException as err:
        raise err.__cause__ from None


def ldm_overrides(tmp_path, ae_dir, *extra):
    return [
        "experiment=ldm_tiny", f"paths.output_dir={tmp_path / 'run'}", f"model.autoencoder={ae_dir}",
        "data.batch_size=4", "data.train.num_images=8", "data.train.size=16", "data.val.num_images=4",
        "data.val.size=16", "model.net.sample_size=8", "model.net.block_out_channels=[8,16]",
        "model.net.attention_head_dim=4", "model.net.norm_num_groups=4", "++trainer.max_steps=3",
        "trainer.max_epochs=2", *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ldm")
    ae_dir = save_tiny_autoencoder(tmp_path / "ae")
    cfg = compose("train", ldm_overrides(tmp_path, ae_dir))
    metrics = run_training(cfg)
    return SimpleNamespace(tmp=tmp_path, ae_dir=ae_dir, cfg=cfg, metrics=metrics,
                           ckpt=tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_ldm_tiny_trains_and_stores_the_first_batch_latent_scale(trained):
    assert math.isfinite(trained.metrics["train/loss"])
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    assert not any("autoencoder" in k for k in ckpt["state_dict"])  # the frozen autoencoder is not saved
    desc = PriorCheckpointDescription.from_dict(ckpt["diffinv_pl"])
    assert desc.objective == "ldm" and desc.image_channels == 3
    assert desc.latent["autoencoder"] == str(trained.ae_dir)
    assert desc.latent["autoencoder_description"] == load_autoencoder(trained.ae_dir).describe()
    # LDM's recipe: 1 / std of the encoded latents of the first training batch (rank 0)
    dm = instantiate(trained.cfg.data)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))["image"]
    expected = float(1.0 / load_autoencoder(trained.ae_dir).encode(first).double().flatten().std())
    assert desc.latent["latent_scale"] == pytest.approx(expected, rel=1e-6)
    assert float(ckpt["state_dict"]["latent_scale_value"]) == pytest.approx(expected, rel=1e-6)


def test_checkpoint_loads_back_as_a_latent_prior_through_the_real_config(trained):
    cfg = compose("evaluate", [f"paths.output_dir={trained.tmp / 'eval'}", "prior=latent",
                               f"prior.path={trained.ckpt}"])
    prior = instantiate(cfg.prior)
    assert isinstance(prior, LatentPrior)
    desc = torch.load(trained.ckpt, map_location="cpu", weights_only=True)["diffinv_pl"]
    assert prior.latent_scale == pytest.approx(desc["latent"]["latent_scale"])
    assert prior.state_shape((1, 16, 16)) == (3, 8, 8)
    assert prior.sigma_range == pytest.approx((0.038759, 83.8225), rel=1e-4)
    z = prior.encode(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert prior.denoise(z, torch.tensor([0.5, 5.0])).shape == z.shape
    assert prior.decode(z).shape == (2, 1, 16, 16)
    copy_dir = save_tiny_autoencoder(trained.tmp / "ae_copy")  # same architecture: accepted as an override
    assert instantiate(cfg.prior, autoencoder=str(copy_dir)).autoencoder.latent_channels == 3


def test_mismatches_are_refused_with_what_differs(trained):
    cfg = compose("evaluate", [f"paths.output_dir={trained.tmp / 'eval'}", "prior=latent",
                               f"prior.path={trained.ckpt}"])
    other = save_tiny_autoencoder(trained.tmp / "ae4", latent_channels=4)
    with pytest.raises(UserError, match="latent_channels: autoencoder 4 vs latent model 3"):
        build(cfg.prior, autoencoder=str(other))
    with pytest.raises(UserError, match="latent_scale=0.123 differs"):
        build(cfg.prior, latent_scale=0.123)
    with pytest.raises(UserError, match="latent diffusion model: load it with prior=latent"):
        build(compose("evaluate", [f"paths.output_dir={trained.tmp / 'e'}", "prior=trained",
                                         f"prior.path={trained.ckpt}"]).prior)
    # a grayscale latent model on RGB data: refused at fit start
    task = instantiate(compose("train", ldm_overrides(trained.tmp, trained.ae_dir)).model)
    with pytest.raises(UserError, match="data has 3 channel.*autoencoder takes 1"):
        task._fit_start_latent(SimpleNamespace(channels=3))
    # network channels vs the autoencoder's latent channels
    with pytest.raises(UserError, match="latent has 4"):
        build(compose("train", ldm_overrides(trained.tmp, other)).model)


def test_missing_autoencoder_says_to_train_it_first(tmp_path):
    with pytest.raises(UserFileError, match="experiment=autoencoder_tiny"):
        build(compose("train", ldm_overrides(tmp_path, tmp_path / "nowhere")).model)


def test_ldm_custom_trains_both_stages_and_skips_a_finished_autoencoder(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"{i}.png")
    out = tmp_path / "run"
    overrides = [
        "experiment=ldm_custom", "trainer=cpu", f"paths.output_dir={out}", f"data.train.root={images}",
        "data.train.image_size=16", "data.batch_size=4", "data.num_workers=0", "+trainer.max_steps=2",
        "trainer.max_epochs=1", "+stages.autoencoder.trainer.max_steps=2",
        "stages.autoencoder.model.block_out_channels=[8,8]", "stages.autoencoder.model.layers_per_block=1",
        "stages.autoencoder.model.num_vq_embeddings=16", "stages.autoencoder.model.norm_num_groups=4",
        "stages.autoencoder.model.mid_block_add_attention=false", "stages.autoencoder.model.perceptual_weight=0",
        "stages.autoencoder.model.disc_weight=0", "model.net.sample_size=8", "model.net.block_out_channels=[8,16]",
        "model.net.attention_head_dim=4", "model.net.norm_num_groups=4", "model.sample_every_n_epochs=0",
        "model.net.down_block_types=[DownBlock2D,AttnDownBlock2D]",
        "model.net.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    ]
    metrics = run_training(compose("train", overrides))
    ae_ckpt = out / "autoencoder" / "checkpoints" / "last.ckpt"
    ldm_ckpt = out / "ldm" / "checkpoints" / "last.ckpt"
    assert ae_ckpt.is_file() and ldm_ckpt.is_file()
    assert any(k.startswith("autoencoder/") for k in metrics) and math.isfinite(metrics["ldm/train/loss"])
    latent = torch.load(ldm_ckpt, map_location="cpu", weights_only=True)["diffinv_pl"]["latent"]
    assert latent["autoencoder"] == str(ae_ckpt) and latent["autoencoder_description"]["downsample_factor"] == 2
    stamp = ae_ckpt.stat().st_mtime_ns
    again = run_training(compose("train", [*overrides, "overwrite=true"]))
    assert ae_ckpt.stat().st_mtime_ns == stamp and not any(k.startswith("autoencoder/") for k in again)


def test_pre_encoded_latents_train_with_the_first_batch_scale_and_refuse_another_autoencoder(tmp_path):
    from PIL import Image

    from data_prep.encode_latents import encode_folder

    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        arr = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(images / f"{i}.png")
    ae_dir = save_tiny_autoencoder(tmp_path / "ae")
    index = encode_folder(ae_dir, images, tmp_path / "latents", mode="L", batch_size=3, per_file=5)
    assert index["count"] == 8 and index["latent_shape"] == [3, 8, 8] and len(index["files"]) == 2
    overrides = [
        "experiment=ldm_latents_tiny", f"paths.output_dir={tmp_path / 'run'}", f"model.autoencoder={ae_dir}",
        f"data.root={tmp_path / 'latents'}", "data.batch_size=4", "model.net.sample_size=8",
        "model.net.block_out_channels=[8,16]", "model.net.attention_head_dim=4", "model.net.norm_num_groups=4",
        "+trainer.max_steps=2", "trainer.max_epochs=1",
    ]
    cfg = compose("train", overrides)
    assert math.isfinite(run_training(cfg)["train/loss"])
    latent = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["diffinv_pl"]["latent"]
    dm = instantiate(cfg.data)
    first = next(iter(dm.train_dataloader()))["latent"]
    assert latent["latent_scale"] == pytest.approx(float(1 / first.double().flatten().std()), rel=1e-6)
    other = save_tiny_autoencoder(tmp_path / "ae4", latent_channels=4)
    bad = compose("train", [*overrides, f"model.autoencoder={other}", "model.net.in_channels=4",
                            "model.net.out_channels=4", f"paths.output_dir={tmp_path / 'run2'}"])
    with pytest.raises(UserError, match="latent_channels: autoencoder 4 vs latent model 3"):
        run_training(bad)


def test_descriptions_without_a_latent_block_still_read_and_bad_blocks_are_refused(trained):
    info = torch.load(trained.ckpt, map_location="cpu", weights_only=True)["diffinv_pl"]
    pixel = {k: v for k, v in info.items() if k != "latent"}
    assert PriorCheckpointDescription.from_dict(pixel).latent is None
    with pytest.raises(ValueError, match="latent_scale must be a finite number > 0"):
        PriorCheckpointDescription.from_dict({**info, "latent": {**info["latent"], "latent_scale": -1.0}})
    with pytest.raises(ValueError, match="latent must be a mapping with keys"):
        PriorCheckpointDescription.from_dict({**info, "latent": {"latent_scale": 1.0}})


def test_resume_keeps_the_stored_latent_scale(tmp_path):
    ae_dir = save_tiny_autoencoder(tmp_path / "ae")
    run_training(compose("train", ldm_overrides(tmp_path, ae_dir, "trainer.max_steps=-1", "trainer.max_epochs=1")))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    # a resumed run on other images would estimate another scale: it must keep the checkpoint's
    resumed = ldm_overrides(tmp_path, ae_dir, "trainer.max_steps=-1", "trainer.max_epochs=2", "data.train.seed=7",
                            f"ckpt_path={last}")
    run_training(compose("train", resumed))
    second = torch.load(last, weights_only=True)
    assert second["global_step"] == 4
    assert second["diffinv_pl"]["latent"]["latent_scale"] == first["diffinv_pl"]["latent"]["latent_scale"]
    other = save_tiny_autoencoder(tmp_path / "ae_other", latent_channels=4)
    with pytest.raises(UserError, match="latent_channels: autoencoder 4 vs latent model 3"):
        bad = [*resumed, f"model.autoencoder={other}", "model.net.in_channels=4", "model.net.out_channels=4"]
        run_training(compose("train", bad))
