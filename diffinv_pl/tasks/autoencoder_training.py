"""``AutoencoderTask``: train or fine-tune the image autoencoder of a latent diffusion model (VQ or KL).

Units: the diffusers model works on model-space images x in [-1, 1] with ``model_channels`` channels
(:meth:`Autoencoder.to_model`: data in ``data_range`` mapped affinely; with ``channel_mode=gray_to_rgb`` a gray image
g is fed as (g, g, g)). Every training loss compares the model-space reconstruction x_rec with that x, so with
gray_to_rgb the three output channels are each pulled towards g (colour is penalised, and the channel mean that
``decode`` returns is trained too). Per training step (all means over elements, then over the batch):

    L = L_rec + perceptual_weight * LPIPS(x_rec, x) + L_reg + g * w * L_G
    L_rec = mean |x_rec - x|  (rec_loss=l1, model units)  or  mean (x_rec - x)^2  (rec_loss=l2, model units^2)
    L_reg = codebook_weight * (||sg[z] - q||^2 + 0.25 ||z - sg[q]||^2)  (VQ; diffusers' commit_loss, element means)
          = kl_weight * KL(N(mu, sigma^2) || N(0, I))                   (KL; nats per image, summed over the latent;
            x_rec decodes the posterior sample z = mu + sigma n, n from a generator seeded per step)
    L_G = -mean D(x_rec)  (PatchGAN hinge generator term, :mod:`diffinv_pl.tasks.discriminator`), g = 1 from
          optimizer step ``disc_start`` on (0 before), w = ``disc_weight``, or with ``adaptive_disc_weight`` (LDM)
          w = disc_weight * clamp(||grad_last (L - g w L_G)|| / (||grad_last L_G|| + 1e-4), 0, 1e4) at the
          decoder's last conv weight, detached.

LPIPS (``lpips`` package, VGG, v0.1 heads) takes the 3-channel model-space images (one-channel models: the channel
repeated). ``lpips_backbone=pretrained`` needs the torchvision VGG16 file ``vgg16-397923af.pth`` found offline
(:mod:`diffinv_pl.metrics.weights`; ``lpips_weights_dir``, ``$DIFFINV_WEIGHTS_DIR`` or the torch hub cache); without
it fitting stops in ``setup`` with one UserFileError listing where to put the file, before the first step (the task
itself builds without it, so configs can be instantiated and checked anywhere). ``lpips_backbone=random`` keeps the
real heads on a random backbone: for tests only, the term is then not LPIPS.

The discriminator learns with the hinge loss L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(sg[x_rec]))) from
step ``disc_start`` on. Both networks share one optimizer (Adam, two parameter groups: ``lr`` and ``disc_lr``) and
one step per batch: the generator term evaluates D with detached weights, so L's gradient reaches only the
autoencoder and L_D's only the discriminator; ``global_step`` counts batches and ``checkpoint_every_n_steps`` works
as for the diffusion task.

EMA: ``ema_decay`` (None: off) keeps an exponential moving average of the autoencoder weights
(``AveragedModel``, updated inside the optimizer step, so every checkpoint holds the EMA of its weights). Validation,
reconstruction grids, :func:`~diffinv_pl.priors.autoencoders.load_autoencoder` and :func:`export_diffusers` use the
EMA weights. Validation logs, on data-range images of the EMA model's deterministic reconstruction decode(encode(x))
(KL: posterior mean, VQ: quantised): ``val/rec_loss`` (mean |x_rec - x| for l1, mean squared error for l2, data
units), ``val/psnr`` (dB, data range hi - lo, output clamped), ``val/ssim`` (torchmetrics, Gaussian 11x11), and every
``image_every_n_epochs`` a PNG grid (top row inputs, bottom row reconstructions) under ``<log dir>/reconstructions``,
sent to W&B when a W&B logger is attached.

Determinism: the only random draws of a step (the KL posterior sample) come from a generator seeded by (seed, epoch,
batch index, rank), so a run resumed from a checkpoint (also mid-epoch, with the training data modules of
:mod:`diffinv_pl.data.training`) repeats the losses of the uninterrupted run.

Fine-tuning: ``init_from`` (a diffusers folder or an AutoencoderTask ``.ckpt``, EMA weights) loads weights before
training; the architecture must match (otherwise the error lists missing / unexpected keys and shape differences).
Checkpoints store :func:`~diffinv_pl.priors.autoencoders.autoencoder_checkpoint_description` under
``checkpoint["diffinv_pl"]``. Export: ``python -m diffinv_pl.tasks.autoencoder_training export <ckpt> <dir>``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from diffinv_pl.errors import UserError, UserFileError, report_user_errors
from diffinv_pl.priors.autoencoders import (
    SIDECAR_NAME,
    Autoencoder,
    _load_diffusers_folder,
    autoencoder_checkpoint_description,
    autoencoder_from_checkpoint,
    build_autoencoder,
    load_autoencoder,
    load_state_into,
)
from diffinv_pl.tasks.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from diffinv_pl.utils.io import atomic_write_text, save_png
from diffinv_pl.utils.seeding import hash_seed

REC_LOSSES = ("l1", "l2")
LPIPS_BACKBONES = ("pretrained", "random")


class _Frozen:
    """Holds a module outside the LightningModule's registry (LPIPS: not trained, not in checkpoints)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class AutoencoderTask(L.LightningModule):
    """Train or fine-tune an :class:`Autoencoder` (module docstring for the losses).

    Args:
        kind, image_channels, channel_mode, block_out_channels, layers_per_block, latent_channels,
            num_vq_embeddings, norm_num_groups, mid_block_add_attention, data_range: the architecture
            (:func:`~diffinv_pl.priors.autoencoders.build_autoencoder`).
        init_from: diffusers folder or AutoencoderTask ``.ckpt`` whose weights start the training (None: random).
        rec_loss: ``l1`` | ``l2``; perceptual_weight: LPIPS weight (0: off); lpips_backbone: ``pretrained`` |
            ``random`` (tests only); lpips_weights_dir: first directory searched for vgg16-397923af.pth.
        codebook_weight (VQ), kl_weight (KL): regulariser weights.
        disc_weight: GAN weight (0: no discriminator); disc_start: first optimizer step with the GAN terms;
            adaptive_disc_weight: LDM's adaptive weight; disc_channels, disc_layers: PatchGAN size; disc_lr: its lr
            (None: lr).
        lr, betas, weight_decay: Adam(W) of both networks.
        ema_decay: EMA decay per optimizer step (None: no EMA).
        image_every_n_epochs: reconstruction grid period (0: off); num_val_images: images in the grid.
        seed: seed of the weights' initialisation and of every random draw.
    """

    def __init__(
        self,
        kind: str = "vq",
        image_channels: int = 3,
        channel_mode: str = "native",
        block_out_channels: Sequence[int] = (128, 256, 512),
        layers_per_block: int = 2,
        latent_channels: int = 3,
        num_vq_embeddings: int = 8192,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        data_range: Sequence[float] = (0.0, 1.0),
        init_from: str | None = None,
        rec_loss: str = "l1",
        perceptual_weight: float = 1.0,
        lpips_backbone: str = "pretrained",
        lpips_weights_dir: str | None = None,
        codebook_weight: float = 1.0,
        kl_weight: float = 1.0e-6,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        adaptive_disc_weight: bool = True,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        lr: float = 4.5e-6,
        betas: Sequence[float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.999,
        image_every_n_epochs: int = 1,
        num_val_images: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        block_out_channels, data_range, betas = _plain(block_out_channels), _plain(data_range), _plain(betas)
        if rec_loss not in REC_LOSSES:
            raise UserError(f"model.rec_loss={rec_loss!r} is unknown: use one of {', '.join(REC_LOSSES)}")
        if lpips_backbone not in LPIPS_BACKBONES:
            raise UserError(
                f"model.lpips_backbone={lpips_backbone!r} is unknown: use one of {', '.join(LPIPS_BACKBONES)}"
            )
        weights = dict(perceptual_weight=perceptual_weight, codebook_weight=codebook_weight, kl_weight=kl_weight,
                       disc_weight=disc_weight, disc_start=disc_start)
        bad = [f"{k}={v}" for k, v in weights.items() if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise UserError(f"model.{', model.'.join(bad)}: loss weights and disc_start must be finite and >= 0")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise UserError(f"model.ema_decay={ema_decay} must be in (0, 1), or null for no EMA")
        if not (lr > 0 and (disc_lr is None or disc_lr > 0) and len(betas) == 2):
            raise UserError(f"need lr > 0, disc_lr > 0 or null and two Adam betas, got {lr}, {disc_lr}, {betas}")
        self.save_hyperparameters()
        self.autoencoder: Autoencoder = build_autoencoder(
            kind, image_channels, channel_mode, block_out_channels, layers_per_block, latent_channels,
            num_vq_embeddings, norm_num_groups, mid_block_add_attention, data_range, seed,
        )
        self._lpips: _Frozen | None = None  # built in setup(), so configs instantiate without the VGG file
        if init_from is not None:
            init_weights(self.autoencoder, init_from)
        self.discriminator: NLayerDiscriminator | None = None
        if disc_weight > 0:
            self.discriminator = NLayerDiscriminator(
                self.autoencoder.model_channels, disc_channels, disc_layers, seed=hash_seed(seed, "discriminator")
            )
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.autoencoder, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self._val_images: tuple[Tensor, Tensor] | None = None

    @property
    def ema_autoencoder(self) -> Autoencoder:
        """The autoencoder of validation and export: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.autoencoder

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def _images(batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            return batch["image"]
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def setup(self, stage: str) -> None:
        """Build LPIPS (perceptual_weight > 0) before fitting: a missing VGG file stops the run before any step."""
        hp = self.hparams
        if stage == "fit" and hp.perceptual_weight > 0 and self._lpips is None:
            lpips = _build_perceptual(hp.lpips_backbone, hp.lpips_weights_dir, hash_seed(hp.seed, "lpips"))
            self._lpips = _Frozen(lpips)

    def on_fit_start(self) -> None:
        data_c = getattr(getattr(self.trainer, "datamodule", None), "channels", None)
        ae = self.autoencoder
        if data_c is not None and data_c != ae.image_channels:
            raise UserError(
                f"the training images have {data_c} channel(s) but the autoencoder takes {ae.image_channels} "
                f"(model.image_channels={ae.image_channels}, model.channel_mode={ae.channel_mode}): set "
                f"data.train.mode (L: 1 channel, RGB: 3) to match, or model.image_channels={data_c} (for grayscale "
                "data with an RGB model: model.channel_mode=gray_to_rgb)"
            )
        if self._lpips is not None:
            self._lpips.module.to(self.device)

    def _generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        seed = hash_seed(self.hparams.seed, "train", self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator(device=device).manual_seed(seed)

    # ------------------------------------------------------------------------------------------------ losses
    def _rec(self, x_rec: Tensor, x: Tensor) -> Tensor:
        diff = x_rec - x
        return diff.abs().mean() if self.hparams.rec_loss == "l1" else diff.square().mean()

    def _perceptual(self, x_rec: Tensor, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, x_rec = x.expand(-1, 3, -1, -1), x_rec.expand(-1, 3, -1, -1)
        return self._lpips.module(x_rec, x).mean()

    def _disc_logits(self, x: Tensor, detach_weights: bool) -> Tensor:
        if not detach_weights:
            return self.discriminator(x)
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def _adaptive_weight(self, loss_wo_gan: Tensor, g_loss: Tensor) -> Tensor:
        last = self.autoencoder.model.decoder.conv_out.weight
        g1 = torch.autograd.grad(loss_wo_gan, last, retain_graph=True)[0]
        g2 = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g1.norm() / (g2.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        hp = self.hparams
        ae = self.autoencoder
        x = ae.to_model(self._images(batch))
        x_rec, reg = ae.reconstruct_model(x, self._generator(batch_idx, x.device))
        rec = self._rec(x_rec, x)
        loss = rec + (hp.codebook_weight if ae.kind == "vq" else hp.kl_weight) * reg
        logs = {"train/rec_loss": rec, "train/codebook_loss" if ae.kind == "vq" else "train/kl": reg}
        if self._lpips is not None:
            perceptual = self._perceptual(x_rec, x)
            loss = loss + hp.perceptual_weight * perceptual
            logs["train/lpips"] = perceptual
        if self.discriminator is not None and self.global_step >= hp.disc_start:
            g_loss = hinge_g_loss(self._disc_logits(x_rec, detach_weights=True))
            weight = torch.tensor(hp.disc_weight, device=x.device)
            if hp.adaptive_disc_weight:
                weight = hp.disc_weight * self._adaptive_weight(loss, g_loss)
            d_loss = hinge_d_loss(self._disc_logits(x, False), self._disc_logits(x_rec.detach(), False))
            loss = loss + weight * g_loss + d_loss
            logs.update({"train/g_loss": g_loss, "train/d_loss": d_loss, "train/disc_weight": weight})
        self.log_dict(logs, batch_size=x.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update (inside the batch: a mid-epoch checkpoint holds the new EMA)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.autoencoder)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": list(self.autoencoder.parameters()), "lr": hp.lr}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "lr": hp.disc_lr or hp.lr})
        return torch.optim.AdamW(groups, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    # ------------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ae = self.ema_autoencoder
        x = self._images(batch)
        lo, hi = ae.data_range
        x_rec = ae.decode(ae.encode(x)).clamp(lo, hi)
        n = x.shape[0]
        diff = x_rec - x
        rec = diff.abs().mean() if self.hparams.rec_loss == "l1" else diff.square().mean()
        dims = tuple(range(1, x.ndim))
        psnr = peak_signal_noise_ratio(x_rec, x, data_range=(lo, hi), reduction="none", dim=dims).mean()
        ssim = structural_similarity_index_measure(x_rec, x, data_range=(lo, hi))
        self.log("val/rec_loss", rec, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/psnr", psnr, sync_dist=True, batch_size=n)
        self.log("val/ssim", ssim, sync_dist=True, batch_size=n)
        if batch_idx == 0:
            k = self.hparams.num_val_images
            self._val_images = (x[:k].detach().cpu(), x_rec[:k].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.image_every_n_epochs
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every or self._val_images is None:
            return
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir is a collective: every rank
        if self.trainer.is_global_zero:
            path = root / "reconstructions" / f"epoch_{self.current_epoch:04d}.png"
            self.save_reconstruction_grid(*self._val_images, path)
        self._val_images = None

    def save_reconstruction_grid(self, x: Tensor, x_rec: Tensor, path: Path) -> Path:
        """PNG grid, inputs (top row) over reconstructions (bottom row), scaled from data_range to [0, 1]; sent to
        every logger with ``log_image`` (W&B)."""
        from torchvision.utils import make_grid  # slow to import, only needed here

        lo, hi = self.autoencoder.data_range
        images = ((torch.cat([x, x_rec]) - lo) / (hi - lo)).clamp(0, 1)
        save_png(path, make_grid(images, nrow=x.shape[0]))
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="reconstructions", images=[str(path)], step=self.global_step)
        return path

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffinv_pl"] = autoencoder_checkpoint_description(self.autoencoder, ema=self.ema is not None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("diffinv_pl", {})
        mine = autoencoder_checkpoint_description(self.autoencoder, ema=self.ema is not None)
        differ = [k for k in ("kind", "channel_mode", "image_channels", "ema") if info.get(k) != mine[k]]
        if differ:
            raise UserError(
                "the checkpoint was written by another autoencoder setup ("
                + ", ".join(f"{k}: checkpoint {info.get(k)!r} vs this run {mine[k]!r}" for k in differ)
                + "): resume with the experiment that wrote it, or start a new run without ckpt_path"
            )


# ---------------------------------------------------------------------------------------------------------- helpers
def _build_perceptual(backbone: str, weights_dir: str | None, seed: int) -> nn.Module:
    """LPIPS-VGG with the backbone resolved offline; a UserFileError listing where to put the file when missing.
    The random backbone (tests) is drawn with ``seed``, the global RNG untouched."""
    from diffinv_pl.metrics.image import build_lpips
    from diffinv_pl.metrics.weights import resolve_weights

    path = None
    if backbone == "pretrained":
        try:
            path = resolve_weights(["vgg16"], weights_dir)["vgg16"]
        except FileNotFoundError as err:
            raise UserFileError(
                "the perceptual loss (model.perceptual_weight > 0) needs the LPIPS VGG backbone, searched first in "
                f"model.lpips_weights_dir: {err}\n"
                "Or set model.perceptual_weight=0 to train without LPIPS."
            ) from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_lpips("vgg", path)


def init_weights(autoencoder: Autoencoder, source: str | Path) -> None:
    """Load the weights of a diffusers folder or an AutoencoderTask ``.ckpt`` (EMA weights) into ``autoencoder``."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise UserFileError(
            f"model.init_from={path} does not exist: give a diffusers autoencoder folder (save_pretrained) or an "
            "AutoencoderTask checkpoint, or init_from=null to train from scratch"
        )
    if path.is_dir():
        model, _ = _load_diffusers_folder(path)
        state = model.state_dict()
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means: not a checkpoint
            raise UserError(f"model.init_from={path} is not a readable PyTorch checkpoint ({type(err).__name__}): "
                            "give an AutoencoderTask .ckpt or a diffusers folder") from err
        state = autoencoder_from_checkpoint(checkpoint, f"model.init_from={path}").model.state_dict()
    load_state_into(autoencoder.model, state, f"model.init_from={path}")


def export_diffusers(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the (EMA) autoencoder of an AutoencoderTask checkpoint as a diffusers folder (``save_pretrained``) plus
    ``diffinv_autoencoder.json`` (image_channels, channel_mode, data_range) that :func:`load_autoencoder` reads."""
    ae = load_autoencoder(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ae.model.save_pretrained(str(out))
    extra = {k: ae.describe()[k] for k in ("image_channels", "channel_mode", "data_range")}
    atomic_write_text(out / SIDECAR_NAME, json.dumps(extra, indent=2) + "\n")
    return out


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffinv_pl.tasks.autoencoder_training")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the EMA weights of a training checkpoint as a diffusers folder")
    export.add_argument("ckpt", help="AutoencoderTask checkpoint, e.g. <run>/checkpoints/last.ckpt")
    export.add_argument("out_dir", help="folder to write (config.json, weights, diffinv_autoencoder.json)")
    args = parser.parse_args(argv)
    print(export_diffusers(args.ckpt, args.out_dir))


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


if __name__ == "__main__":
    main()
