"""Autoencoder (diffusers VQ / KL behind diffinv_pl.priors.autoencoders) and AutoencoderTask: shapes, straight-through
gradient, diffusers and checkpoint round trips, gray_to_rgb, exact resume, grayscale fine-tuning, user errors, the
Hydra experiment."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from diffinv_pl.data.phantoms import CTPhantomDataset
from diffinv_pl.data.training import ImageTrainingDataModule, InMemoryImageDataset
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.autoencoders import SIDECAR_NAME, Autoencoder, build_autoencoder, load_autoencoder
from diffinv_pl.tasks.autoencoder_training import AutoencoderTask, main
from diffinv_pl.training import run_training

QUIET = ["+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
TINY = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32)
TASK = dict(TINY, perceptual_weight=0.0, disc_weight=0.0, lr=2e-3, ema_decay=0.9, image_every_n_epochs=0)


def _trainer(root: Path, **kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=root, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kwargs})


def _phantoms(num: int = 16, size: int = 16, batch_size: int = 4, **kw) -> ImageTrainingDataModule:
    return ImageTrainingDataModule(
        train=CTPhantomDataset(num, seed=11, size=size, **kw), val=CTPhantomDataset(8, seed=12, size=size, **kw),
        batch_size=batch_size,
    )


def _color_blobs(num: int, size: int, seed: int) -> InMemoryImageDataset:
    """RGB images of smooth coloured blobs (another image kind than the phantoms)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = torch.zeros(num, 3, size, size)
    for _ in range(4):
        c = torch.rand(num, 2, 1, 1, generator=g) * 1.6 - 0.8
        r = torch.rand(num, 1, 1, generator=g) * 0.4 + 0.2
        blob = torch.exp(-((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) / r**2)
        images += blob[:, None] * torch.rand(num, 3, 1, 1, generator=g)
    return InMemoryImageDataset(images.clamp(0, 1))


# ----------------------------------------------------------------------------------------------------------------------
# the Autoencoder interface


def test_vq_shapes_and_straight_through_gradient():
    ae = build_autoencoder("vq", 1, "native", **TINY)
    x = torch.rand(2, 1, 16, 16)
    z = ae.encode(x)
    assert z.shape == (2, 3, 8, 8) and ae.latent_shape((1, 16, 16)) == (3, 8, 8) and ae.downsample_factor == 2
    assert ae.describe() == {"kind": "vq", "image_channels": 1, "model_channels": 1, "channel_mode": "native",
                             "latent_channels": 3, "downsample_factor": 2, "data_range": [0.0, 1.0]}
    z = z.detach().requires_grad_(True)
    w = torch.randn(2, 1, 16, 16)
    (ae.decode(z) * w).sum().backward()
    # straight-through: d decode / dz = d (decoder after the codebook) / dq at q = quantise(z)
    q = ae.model.quantize(z.detach())[0].detach().requires_grad_(True)
    out = ae.model.decode(q, force_not_quantize=True).sample
    (ae.from_model(out) * w).sum().backward()
    torch.testing.assert_close(z.grad, q.grad, rtol=0, atol=1e-6)
    assert z.grad.abs().sum() > 0
    # the decoded image is that of the quantised latent: a nudge smaller than the code spacing changes nothing
    torch.testing.assert_close(ae.decode(z.detach()), ae.decode(q.detach()), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="divisible"):
        ae.latent_shape((1, 15, 16))
    with pytest.raises(UserError, match="channel"):
        ae.encode(torch.rand(1, 3, 16, 16))


def test_kl_encode_is_the_posterior_mean_and_decode_is_differentiable():
    ae = build_autoencoder("kl", 3, "native", **TINY)
    x = torch.rand(2, 3, 16, 16)
    mean = ae.model.encode(ae.to_model(x)).latent_dist.mean
    torch.testing.assert_close(ae.encode(x), mean)
    z = ae.encode(x).detach().requires_grad_(True)
    ae.decode(z).square().sum().backward()
    assert z.grad.shape == (2, 3, 8, 8) and z.grad.abs().sum() > 0
    _, kl = ae.reconstruct_model(ae.to_model(x), torch.Generator().manual_seed(0))
    assert kl > 0


def test_gray_to_rgb_mapping_is_exact():
    ae = build_autoencoder("vq", 1, "gray_to_rgb", **TINY)
    assert (ae.image_channels, ae.model_channels, ae.channel_mode) == (1, 3, "gray_to_rgb")
    g = torch.rand(2, 1, 16, 16)
    m = ae.to_model(g)
    assert m.shape == (2, 3, 16, 16)
    for c in range(3):
        torch.testing.assert_close(m[:, c : c + 1], 2 * g - 1, rtol=0, atol=0)
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.from_model(y.expand(-1, 3, -1, -1)), (y + 1) / 2, rtol=0, atol=1e-7)
    # the same weights as a native RGB model: the gray output is the channel mean of the RGB output of (g, g, g)
    rgb = Autoencoder(ae.model, image_channels=3, channel_mode="native")
    torch.testing.assert_close(ae(g), rgb(g.expand(-1, 3, -1, -1)).mean(1, keepdim=True), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="gray_to_rgb"):
        Autoencoder(ae.model, image_channels=1, channel_mode="native")


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_diffusers_folder_round_trip(kind, tmp_path):
    ae = build_autoencoder(kind, 3, "native", **TINY, seed=3).eval()
    ae.model.save_pretrained(str(tmp_path / "ae"))
    loaded = load_autoencoder(tmp_path / "ae")
    x = torch.rand(2, 3, 16, 16)
    assert loaded.describe() == ae.describe()
    torch.testing.assert_close(loaded.encode(x), ae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), ae(x), rtol=0, atol=0)
    gray = load_autoencoder(tmp_path / "ae", image_channels=1)  # grayscale data on an RGB model: explicit mode
    assert gray.channel_mode == "gray_to_rgb" and gray(x[:, :1]).shape == (2, 1, 16, 16)


def test_loader_refuses_missing_and_foreign_paths(tmp_path):
    with pytest.raises(UserFileError, match="does not exist"):
        load_autoencoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFileError, match="config.json"):
        load_autoencoder(tmp_path / "empty")
    build_autoencoder("vq", 1, **TINY).model.save_config(str(tmp_path / "noweights"))
    with pytest.raises(UserFileError, match="no weights"):
        load_autoencoder(tmp_path / "noweights")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="UNet2DModel"):
        load_autoencoder(tmp_path / "unet")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="readable"):
        load_autoencoder(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}, "diffinv_pl": {"format": "diffinv_pl.diffusion_prior/3"}}, tmp_path / "prior.ckpt")
    with pytest.raises(UserError, match="not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "prior.ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# AutoencoderTask


class _RecordLosses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(root, ckpt_path=None, every=None, max_epochs=2, **task_kw):
    task = AutoencoderTask(**{"kind": "kl", "image_channels": 1, **TASK, **task_kw})
    record = _RecordLosses()
    ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, save_last=True, every_n_train_steps=every)
    trainer = _trainer(root, max_epochs=max_epochs, callbacks=[record, ckpt], limit_val_batches=0)
    trainer.fit(task, datamodule=_phantoms(), ckpt_path=ckpt_path)
    return record.losses, task


def test_resume_mid_epoch_repeats_the_uninterrupted_losses(tmp_path):
    # KL posterior samples, LPIPS (random backbone) and the adaptive-weight GAN from step 2: 2 epochs x 4 steps,
    # checkpoint at step 3 (mid epoch 0) and step 6 (mid epoch 1)
    extra = dict(perceptual_weight=0.5, lpips_backbone="random", disc_weight=0.5, disc_start=2, disc_channels=8,
                 disc_layers=1)
    full, task_full = _fit(tmp_path / "full", **extra)
    first, _ = _fit(tmp_path / "part", every=3, **extra)
    assert len(full) == 8 and all(torch.isfinite(torch.tensor(full)))
    for step, path in ((3, "epoch=0-step=3.ckpt"), (6, "epoch=1-step=6.ckpt")):
        rest, task_resumed = _fit(tmp_path / f"resumed{step}", ckpt_path=tmp_path / "part" / path, **extra)
        torch.testing.assert_close(torch.tensor(first[:step] + rest), torch.tensor(full), rtol=0, atol=1e-6)
    for (name, a), b in zip(task_full.state_dict().items(), task_resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert any(k.startswith("discriminator.") for k in task_full.state_dict())
    assert not any("lpips" in k or "net.slice" in k for k in task_full.state_dict())  # LPIPS is not saved


def test_checkpoint_round_trip_and_export(tmp_path, capsys):
    _, task = _fit(tmp_path / "run", max_epochs=1, kind="vq")
    ckpt = tmp_path / "run" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["diffinv_pl"]
    assert stored["kind"] == "vq" and stored["ema"] is True and stored["architecture"]["block_out_channels"] == [8, 16]
    ae = load_autoencoder(ckpt)
    x = torch.rand(2, 1, 16, 16)
    ema = task.ema_autoencoder.eval()
    torch.testing.assert_close(ae(x), ema(x), rtol=0, atol=0)
    assert not torch.allclose(ae(x), task.autoencoder.eval()(x))  # the EMA weights, not the raw ones
    main(["export", str(ckpt), str(tmp_path / "exported")])
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "exported"
    assert json.loads((tmp_path / "exported" / SIDECAR_NAME).read_text())["channel_mode"] == "native"
    exported = load_autoencoder(tmp_path / "exported")
    assert exported.describe() == ae.describe()
    torch.testing.assert_close(exported(x), ae(x), rtol=0, atol=0)


def test_finetuning_on_grayscale_lowers_the_validation_reconstruction_error(tmp_path):
    # pretrain an RGB VQ autoencoder on coloured blobs, then fine-tune it through gray_to_rgb on textured phantoms
    rgb = ImageTrainingDataModule(train=_color_blobs(32, 16, 0), val=_color_blobs(8, 16, 1), batch_size=8)
    pre = AutoencoderTask(kind="vq", image_channels=3, **TASK)
    _trainer(tmp_path / "pre", max_epochs=3, limit_val_batches=0, enable_checkpointing=False).fit(pre, datamodule=rgb)
    pre.autoencoder.model.save_pretrained(str(tmp_path / "pretrained"))

    def gray():
        return _phantoms(num=32, batch_size=8, kind="textured")

    task = AutoencoderTask(kind="vq", image_channels=1, channel_mode="gray_to_rgb",
                           init_from=str(tmp_path / "pretrained"), **{**TASK, "ema_decay": None})
    trainer = _trainer(tmp_path / "ft", max_epochs=4, enable_checkpointing=False)
    before = trainer.validate(task, datamodule=gray(), verbose=False)[0]
    trainer.fit(task, datamodule=gray())
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert after["val/rec_loss"] < 0.6 * before["val/rec_loss"], (before, after)
    assert after["val/psnr"] > before["val/psnr"] + 3.0 and after["val/ssim"] > before["val/ssim"]


def test_reconstruction_grid_png(tmp_path):
    task = AutoencoderTask(kind="vq", image_channels=1, **{**TASK, "image_every_n_epochs": 1, "num_val_images": 3})
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, enable_checkpointing=False)
    trainer.fit(task, datamodule=_phantoms())
    from PIL import Image

    grid = Image.open(tmp_path / "reconstructions" / "epoch_0000.png")
    assert grid.size == (2 + 3 * 18, 2 + 2 * 18)  # make_grid: 3 columns (inputs over reconstructions), padding 2


# ----------------------------------------------------------------------------------------------------------------------
# user errors


def test_grayscale_model_on_rgb_data_is_refused(tmp_path):
    task = AutoencoderTask(kind="vq", image_channels=1, **TASK)
    rgb = ImageTrainingDataModule(train=_color_blobs(8, 16, 0), val=None, batch_size=4)
    with pytest.raises(UserError, match=r"3 channel\(s\).*data\.train\.mode.*model\.channel_mode"):
        _trainer(tmp_path, max_epochs=1).fit(task, datamodule=rgb)


def test_init_from_missing_dir_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(UserFileError, match="init_from"):
        AutoencoderTask(kind="vq", image_channels=1, init_from=str(tmp_path / "missing"), **TASK)
    other = build_autoencoder("vq", 1, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
                              num_vq_embeddings=16)
    other.model.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"shape differences: quantize\.embedding\.weight: checkpoint \(16, 3\)"):
        AutoencoderTask(kind="vq", image_channels=1, init_from=str(tmp_path / "other"), **TASK)
    # a checkpoint missing keys: the error lists them
    _, task = _fit(tmp_path / "run", max_epochs=1, kind="vq")
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    for key in ("ema.module.model.decoder.conv_out.weight", "ema.module.model.decoder.conv_out.bias"):
        del ckpt["state_dict"][key]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(UserError, match=r"2 missing keys: decoder\.conv_out\.bias, decoder\.conv_out\.weight"):
        load_autoencoder(tmp_path / "broken.ckpt")
    with pytest.raises(UserError, match="missing keys"):
        AutoencoderTask(kind="vq", image_channels=1, init_from=str(tmp_path / "broken.ckpt"), **TASK)


def test_perceptual_loss_without_vgg_weights_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFINV_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    task = AutoencoderTask(kind="vq", image_channels=1, **{**TASK, "perceptual_weight": 1.0})
    record = _RecordLosses()
    with pytest.raises(UserFileError, match=r"(?s)lpips_weights_dir.*vgg16-397923af\.pth.*perceptual_weight=0") as err:
        trainer = _trainer(tmp_path, max_epochs=1, callbacks=[record], enable_checkpointing=False)
        trainer.fit(task, datamodule=_phantoms())
    assert str(tmp_path / "weights") in str(err.value) and record.losses == []  # refused before any step
    cfg = compose("train", ["experiment=autoencoder_tiny", "model.perceptual_weight=1.0",
                            f"paths.output_dir={tmp_path / 'out'}", *QUIET])
    with pytest.raises(Exception) as err:
        run_training(cfg)
    assert "vgg16-397923af.pth" in str(err.value) or "vgg16-397923af.pth" in str(err.value.__cause__)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Hydra experiments


def test_train_experiment_autoencoder_tiny_runs_two_steps(tmp_path):
    overrides = ["experiment=autoencoder_tiny", f"paths.output_dir={tmp_path}", "+trainer.max_steps=2",
                 "data.train.num_images=16", "data.val.num_images=8", *QUIET]
    cfg = compose("train", overrides)
    assert cfg.model.kind == "vq" and cfg.model.image_channels == 1 and cfg.data.train.kind == "textured"
    metrics = run_training(cfg)
    assert metrics["val/psnr"] > 0 and 0 < metrics["val/rec_loss"] < 1
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["diffinv_pl"]["channel_mode"] == "native"
    ae = load_autoencoder(tmp_path / "checkpoints" / "last.ckpt")
    assert ae.latent_shape((1, 32, 32)) == (3, 16, 16)
    resume = [o for o in overrides if not o.startswith("+trainer.max_steps")] + ["+trainer.max_steps=3"]
    run_training(compose("train", [*resume, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_paper_scale_experiments_compose(tmp_path):
    kl = compose("train", ["experiment=autoencoder_kl_tiny", f"paths.output_dir={tmp_path}"])
    assert kl.model.kind == "kl" and kl.model.block_out_channels == [32, 64]
    vq = compose("train", ["experiment=autoencoder_vq_f4", f"paths.output_dir={tmp_path}"])
    assert list(vq.model.block_out_channels) == [128, 256, 512] and vq.model.num_vq_embeddings == 8192
    assert vq.model.mid_block_add_attention and vq.model.latent_channels == 3 and vq.trainer.accelerator == "gpu"
    task = instantiate(vq.model)  # LDM VQ-f4: 55 M parameters (methods.md §0.5)
    assert sum(p.numel() for p in task.autoencoder.parameters()) == pytest.approx(55.3e6, rel=1e-3)
    assert task.autoencoder.downsample_factor == 4 and task.discriminator is not None
    ft = compose("train", ["experiment=autoencoder_vq_f4_finetune", "model.init_from=/x",
                           f"paths.output_dir={tmp_path}"])
    assert (ft.model.channel_mode, ft.model.image_channels, ft.data.train.mode) == ("gray_to_rgb", 1, "L")


def test_reconstruction_grid_is_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="diffinv-test", offline=True)
    task = AutoencoderTask(kind="vq", image_channels=1, **{**TASK, "image_every_n_epochs": 1, "num_val_images": 4})
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger, limit_train_batches=2, limit_val_batches=1,
                       log_every_n_steps=1)
    trainer.fit(task, datamodule=_phantoms())
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    assert len(list(tmp_path.glob("wandb/offline-run-*/files/media/images/reconstructions_*.png"))) == 1
    logged = {"train/rec_loss", "train/codebook_loss", "val/rec_loss", "val/psnr", "val/ssim", "reconstructions"}
    assert logged <= set(summary)


def test_diffusers_folder_with_a_missing_weight_is_refused_not_randomly_filled(tmp_path):
    from safetensors.torch import load_file, save_file

    from diffinv_pl.errors import UserError
    from diffinv_pl.priors.autoencoders import build_autoencoder, load_autoencoder

    ae = build_autoencoder("vq", image_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                           num_vq_embeddings=16, norm_num_groups=8)
    ae.model.save_pretrained(tmp_path / "ae")
    weights = tmp_path / "ae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.weight"]
    save_file(state, weights)
    with pytest.raises(UserError, match=r"missing \['decoder.conv_out.weight'\]"):
        load_autoencoder(tmp_path / "ae")
