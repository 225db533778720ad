"""``DiffusionTask``: train a diffusion denoiser D(x, sigma) on whole images, PaDIS patches or flat vectors.

Objective (:mod:`diffinv_pl.diffusion.losses`): L = E[lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / d] with the
EDM (default: ln sigma ~ N(-1.2, 1.2^2), sigma_data 0.5), VP or VE choice of sigma distribution, weight and
preconditioning. Noise levels are in model-range units: image data in ``data_range`` (e.g. [0, 1]) are mapped
affinely to ``model_range`` (default [-1, 1]) before training, and that pair is stored in the checkpoint.

Patch mode (``patch`` set, PaDIS §3.2): every step draws a patch size P, cuts m(P) random P x P patches per image from
the padded image and trains the network on them with two positional channels (x, y) that it receives unscaled. The
pad is the data-unit zero (air), i.e. its model-unit image (-1 for [0, 1] data trained in [-1, 1]), as PaDIS pads
[0, 1] images with 0 (methods.md §0.5). The :class:`PositionalConvention` (canvas size, padding, normalisation) is part of the
:class:`PriorCheckpointDescription` written into every checkpoint (:meth:`DiffusionTask.checkpoint_description`) and
is checked when one is loaded (:mod:`diffinv_pl.priors.checkpoints`) or resumed.

Determinism: sigma, noise, patch sizes and positions come from generators seeded by (seed, epoch, batch index,
rank), and dropout runs under a forked global RNG seeded the same way, so a run resumed from a checkpoint repeats the
losses of an uninterrupted run exactly; nothing depends on the global RNG state. This holds for end-of-epoch
checkpoints, and for mid-epoch ones (``checkpoint_every_n_steps``) with the training data modules of
:mod:`diffinv_pl.data.training`, whose loaders skip the batches the restored epoch has already trained on; the EMA update happens inside the optimizer step, so
every checkpoint holds the EMA of the weights it stores.

Training extras: EMA of the denoiser weights (``torch.optim.swa_utils.AveragedModel``) with EDM's half-life
schedule, beta = 0.5 ** (images per step / min(halflife_images, rampup_ratio * images seen)); linear learning-rate
warm-up over ``warmup_steps`` optimizer steps, or EDM's ramp-up lr * min(1, images seen / ``lr_rampup_images``);
non-finite gradients sanitised (NaN -> 0, +-Inf -> +-``nonfinite_grad_value``); gradient clipping and mixed
precision come from the Trainer (``trainer.gradient_clip_val``, ``trainer.precision=bf16-mixed``).

Loss reduction and image counting (methods.md §0.5; whole-image defaults unchanged):

* ``loss_reduction="mean"`` (default): per example lambda(sigma) ||D - x0||^2 / d, averaged over the batch.
  ``"padis_sum"`` (PaDIS / EDM): summed over the d = C P^2 pixels of each patch, divided by the number of patches.
  Adam is invariant to a constant loss scale (up to eps), so the lr needs no retuning; the difference is that the
  sum weights a step by its patch size (P = 64 steps d = 4096, P = 16 steps 256).
* ``count_images="loader"`` (default): a step counts the B x world x accumulate images the loader gave.
  ``"padis"``: it counts that times PaDIS's ``batch_mul_avg`` = sum_P p(P) m(P) / m(P_max) (1.9 for its
  {16: 0.2, 32: 0.3, 64: 0.5} with m 64/32/16), for the EMA half-life and ``lr_rampup_images`` (patch mode only).

Logged: ``train/loss``; ``train/loss_sigma_<band>`` (per epoch: mean loss of the epoch's examples whose sigma falls in
each band of ``sigma_bands``; each rank sums its own batches, rank 0's values are logged); ``val/loss`` (EMA model,
fixed noise per validation batch); for images ``val/psnr_gain_sigma<s>`` (PSNR of D(x + s n) minus PSNR of x + s n, in
dB on the data range, whole images, patch models through the assembled denoiser); for data modules exposing an exact
``prior`` (GMM) ``val/mse_vs_exact``; every ``sample_every_n_epochs`` a grid of EMA samples (EDM Heun sampler) saved
as PNG under ``<log dir>/samples`` and sent to W&B when a W&B logger is attached.

Latent mode (``autoencoder`` set; latent diffusion, methods.md §4.2): the network denoises z = s * E(x), the
unscaled latent E(x) of a frozen autoencoder (:func:`~diffinv_pl.priors.autoencoders.load_autoencoder`, eval, no
gradients, kept out of the task's ``state_dict``) scaled by ``latent_scale`` s. Batches of images are encoded on the
fly, or a data module gives pre-encoded *unscaled* latents (batches ``{"latent": ...}``, e.g. from
``data_prep/encode_latents.py`` shards). Images are given in ``data_range`` and mapped to the autoencoder's range
(``model_range``, which defaults to it). ``latent_scale="auto"``: s = 1 / std of the latents of the first training
batch of rank 0 (LDM's recipe), estimated at fit start, broadcast to every rank and kept in the checkpoint (buffer
``latent_scale_value`` and the description's ``latent`` block, with the autoencoder's path and ``describe()``). The
checkpoint loads back with :func:`diffinv_pl.priors.latent.latent_prior` (``prior=latent``).

Epoch values after a mid-epoch resume (``checkpoint_every_n_steps``): the per-band sums and counts of the epoch in
progress are stored in every checkpoint (``checkpoint["diffinv_pl_epoch_bands"]``) and restored on resume, so
``train/loss_sigma_<band>`` of the resumed epoch covers the whole epoch and equals the uninterrupted run's. Where they
cannot be restored (a checkpoint without them, or a DDP rank other than 0, whose sums the checkpoint does not hold)
the resumed epoch's values cover only the batches after the resume and are logged as
``train/loss_sigma_<band>_partial`` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffinv_pl.diffusion.losses import build_objective, denoising_loss
from diffinv_pl.diffusion.schedules import edm_sigmas
from diffinv_pl.diffusion.steps import heun_step
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.analytic import GaussianMixture
from diffinv_pl.priors.checkpoints import PriorCheckpointDescription, objective_sigma_range
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.network import NetworkPrior
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
from diffinv_pl.priors.patches import PatchTraining, PositionalConvention, data_zero
from diffinv_pl.utils.io import save_png
from diffinv_pl.utils.ranges import convert_range
from diffinv_pl.utils.seeding import hash_seed

log = logging.getLogger(__name__)


def ema_beta(images_per_step: float, images_seen: float, halflife_images: float, rampup_ratio: float | None) -> float:
    """EDM's EMA decay per step: 0.5 ** (images_per_step / h), h = min(halflife, rampup_ratio * images_seen)."""
    halflife = halflife_images
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (images_per_step / max(halflife, 1e-8))


class DiffusionTask(L.LightningModule):
    """Train a denoiser with a diffusion objective; the model used for inference is :attr:`ema_denoiser`.

    Args:
        net: the raw network ``net(x_in, c_noise[, pos])``, or its Hydra config (a mapping with ``_target_``; then
            stored in the checkpoint so :func:`diffinv_pl.priors.checkpoints.load_diffusion_prior` can rebuild it).
        objective: ``edm`` | ``vp`` | ``ve``; ``objective_params`` its parameters (e.g. sigma_data, p_mean, p_std).
        image_channels: channels the network denoises (checked against the data at fit start); None for vectors.
        data_range, model_range: affine map applied to every batch (None: data used as is).
        patch: None (whole images) or the arguments of :meth:`PatchTraining.build` (image_size, pad_width,
            normalization, patch_sizes, real_p, small_weights, multipliers).
        lr, betas, eps, weight_decay: Adam(W) parameters; warmup_steps: linear warm-up (0: none).
        ema_halflife_images: EMA half-life in training examples (images, or vectors), None disables the EMA;
            ema_rampup_ratio: EDM's ramp-up (None: none).
        zero_nonfinite_grads: replace non-finite gradient entries before each optimizer step: NaN by 0, +-Inf by
            +-``nonfinite_grad_value`` (0 by default; EDM and PaDIS use 1e5).
        loss_reduction: ``mean`` (per-pixel mean) | ``padis_sum`` (sum over pixels / number of patches; module
            docstring).
        count_images: ``loader`` | ``padis`` (loader images x PaDIS's batch_mul_avg; patch mode) for the EMA and
            ``lr_rampup_images``.
        lr_rampup_images: EDM/PaDIS lr ramp-up lr * min(1, counted images before the step / this); None: off (use
            ``warmup_steps``, which it excludes).
        sigma_bands: increasing sigma edges of the per-band loss logging.
        val_sigmas: noise levels of the validation PSNR gain (images) or exact-denoiser comparison (GMM).
        sample_every_n_epochs: 0 disables sample grids; sample_steps, num_sample_images, sample_sigma_max: the EDM
            Heun sampler of the grids (sigma_min 0.002, rho 7).
        inference_patch_size: P of the assembled whole-image denoiser of a patch model (None: the largest training
            patch size).
        autoencoder: latent mode (module docstring): path of the frozen autoencoder (diffusers folder or
            AutoencoderTask ``.ckpt``); None: pixel mode. ``model_range`` then defaults to its data range.
        latent_scale: ``auto`` (1 / std of the first training batch's latents) or a number > 0 (latent mode only).
        seed: seed of every training and validation random draw.

    Epoch-level ``train/loss_sigma_<band>`` after a mid-epoch resume cover the whole epoch (the epoch's sums are
    stored in the checkpoint and restored); where they cannot be restored they are logged as
    ``train/loss_sigma_<band>_partial`` (see the module docstring).
    """

    def __init__(
        self,
        net: nn.Module | Mapping,
        objective: str = "edm",
        objective_params: Mapping[str, float] | None = None,
        image_channels: int | None = None,
        data_range: Sequence[float] | None = None,
        model_range: Sequence[float] | None = (-1.0, 1.0),
        patch: Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_halflife_images: float | None = 500_000,
        ema_rampup_ratio: float | None = 0.05,
        zero_nonfinite_grads: bool = True,
        nonfinite_grad_value: float = 0.0,
        loss_reduction: str = "mean",
        count_images: str = "loader",
        lr_rampup_images: float | None = None,
        sigma_bands: Sequence[float] = (0.1, 0.5, 2.0),
        val_sigmas: Sequence[float] = (0.2,),
        sample_every_n_epochs: int = 0,
        sample_steps: int = 18,
        num_sample_images: int = 16,
        sample_sigma_max: float = 80.0,
        inference_patch_size: int | None = None,
        autoencoder: str | None = None,
        latent_scale: float | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Hydra passes DictConfig/ListConfig; the checkpoint must hold plain containers (weights_only loading)
        objective_params, patch, betas = _plain(objective_params), _plain(patch), _plain(betas)
        data_range, model_range = _plain(data_range), _plain(model_range)
        sigma_bands, val_sigmas = _plain(sigma_bands), _plain(val_sigmas)
        if not (lr > 0 and eps > 0 and weight_decay >= 0 and warmup_steps >= 0 and len(betas) == 2):
            raise ValueError(
                "need lr > 0, eps > 0, weight_decay >= 0, warmup_steps >= 0 and two Adam betas, got "
                f"{lr}, {eps}, {weight_decay}, {warmup_steps}, {tuple(betas)}"
            )
        _check_padis_options(loss_reduction, count_images, patch, lr_rampup_images, warmup_steps, nonfinite_grad_value)
        if ema_halflife_images is not None and ema_halflife_images <= 0:
            raise ValueError(f"ema_halflife_images must be > 0 or null, got {ema_halflife_images}")
        bands = [float(s) for s in sigma_bands]
        if any(b <= 0 for b in bands) or bands != sorted(set(bands)):
            raise ValueError(f"sigma_bands must be increasing positive edges, got {bands}")
        val_sigmas = tuple(float(s) for s in val_sigmas)
        if not val_sigmas or min(val_sigmas) <= 0:
            raise ValueError(f"val_sigmas must be a non-empty list of positive noise levels, got {val_sigmas}")
        if sample_every_n_epochs < 0 or sample_steps < 1 or num_sample_images < 1:
            raise ValueError("need sample_every_n_epochs >= 0, sample_steps >= 1 and num_sample_images >= 1")
        ae = _load_frozen_autoencoder(autoencoder, patch, latent_scale) if autoencoder is not None else None
        if ae is not None:
            if model_range is not None and tuple(float(v) for v in model_range) != ae.data_range:
                raise UserError(
                    f"model.model_range={list(model_range)} differs from the autoencoder's data range "
                    f"{list(ae.data_range)}: in latent mode set model.model_range=null (the autoencoder's range)"
                )
            model_range = list(ae.data_range)
        if data_range is not None and model_range is None:
            raise ValueError("data_range needs a model_range (or set both to null)")
        net_config = _plain(net) if isinstance(net, Mapping) else None
        if net_config is not None:
            net_config.pop("_recursive_", None)
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_config
        self.objective = build_objective(objective, **dict(objective_params or {}))
        network = instantiate(net_config) if net_config is not None else net
        if not isinstance(network, nn.Module):
            raise TypeError(f"net must be an nn.Module or its config, got {type(network).__name__}")
        self.denoiser: nn.Module = self.objective.precondition(network)
        self._frozen = (ae,) if ae is not None else ()  # a tuple: the autoencoder stays out of state_dict/optimizer
        if ae is not None:  # a buffer only in latent mode: pixel checkpoints keep their state_dict keys
            scale = math.nan if latent_scale == "auto" else float(latent_scale)
            self.register_buffer("latent_scale_value", torch.tensor(scale, dtype=torch.float64))
        self.patch = _patch_training(patch, data_range, model_range) if patch is not None else None
        self._check_network_channels(network)
        self.ema: AveragedModel | None = None
        if ema_halflife_images is not None:
            self.ema = AveragedModel(self.denoiser, avg_fn=self._ema_update, use_buffers=True)
            self.ema.requires_grad_(False)
        self.data_range = tuple(float(v) for v in data_range) if data_range is not None else None
        self.model_range = tuple(float(v) for v in model_range) if model_range is not None else None
        self._images_per_step = 0
        self._band_sums: Tensor | None = None  # this epoch's per-band loss sums and example counts (float64)
        self._band_counts: Tensor | None = None
        self._band_batches = 0  # training batches accumulated in them
        self._band_epoch = -1  # the epoch they belong to
        self._partial_epoch = False  # resumed mid-epoch without the sums: the epoch values cover part of the epoch

    # ------------------------------------------------------------------------------------------------------------
    # models

    @property
    def convention(self) -> PositionalConvention | None:
        return self.patch.convention if self.patch is not None else None

    @property
    def autoencoder(self):
        """The frozen :class:`~diffinv_pl.priors.autoencoders.Autoencoder` of latent mode, else None."""
        return self._frozen[0] if self._frozen else None

    @property
    def latent_scale(self) -> float:
        """s of z = s * E(x) (NaN until ``auto`` has been estimated at fit start)."""
        return float(self.latent_scale_value) if self.autoencoder is not None else math.nan

    def data_channels(self) -> int | None:
        """Channels of the training images: the autoencoder's in latent mode, else the network's."""
        return self.autoencoder.image_channels if self.autoencoder is not None else self.hparams.image_channels

    @property
    def ema_denoiser(self) -> nn.Module:
        """The denoiser used for validation, sampling and export: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.denoiser

    def whole_image_prior(self) -> Prior:
        """The whole-image prior (model range) of the EMA denoiser, assembled from patches in patch mode (random
        shifts drawn from the generator given to ``denoise``; state: the canvas padded with the data-unit zero, so
        validation and sample grids noise and denoise the border too, as PaDIS)."""
        sigma_range = objective_sigma_range(self.objective)
        if self.autoencoder is not None:
            from diffinv_pl.priors.latent import LatentPrior  # imported here: latent imports the checkpoint module

            return LatentPrior(self.ema_denoiser, self.autoencoder.to(self.device), self.latent_scale, sigma_range)
        if self.patch is None:
            return NetworkPrior(self.ema_denoiser, self.model_range, self.hparams.image_channels, sigma_range)
        return PatchAssembledPrior(
            self.ema_denoiser, self.patch.convention, self.checkpoint_description().inference_patch_size,
            data_range=self.model_range, image_channels=self.hparams.image_channels, sigma_range=sigma_range,
            pad_value=self.patch.pad_value,
        )

    def forward(self, x: Tensor, sigma: Tensor | float, **net_kwargs: Tensor) -> Tensor:
        return self.denoiser(x, sigma, **net_kwargs)

    def _check_network_channels(self, network: nn.Module) -> None:
        c = self.hparams.image_channels
        net_c = getattr(network, "image_channels", None)
        if c is not None and net_c is not None and net_c != c:
            raise UserError(
                f"model.image_channels={c} but the network denoises {net_c} channel(s): make them equal "
                f"(model.net.image_channels sets both)"
            )
        ae = self.autoencoder
        if ae is not None and c != ae.latent_channels:
            raise UserError(
                f"the latent network denoises {c} channel(s) but the autoencoder's latent has {ae.latent_channels}: "
                f"set model.image_channels={ae.latent_channels} (and the network's channels)"
            )
        cond = getattr(network, "cond_channels", None)
        if cond is not None and (cond == 2) != (self.patch is not None):
            raise UserError(
                f"the network has {cond} conditioning channel(s) but patch mode is "
                f"{'on' if self.patch is not None else 'off'}: patch training needs cond_channels=2, whole images 0 "
                "(model.net.cond_channels)"
            )

    # ------------------------------------------------------------------------------------------------------------
    # data

    def _images(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping) and "latent" in batch:
            raise UserError("this batch holds pre-encoded latents but the model needs images (pixel mode)")
        if isinstance(batch, Mapping):
            x = batch["image"]
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            x = batch
        if self.data_range is not None:
            x = convert_range(x, self.data_range, self.model_range)
        return x

    def _examples(self, batch: Any) -> Tensor:
        """The training examples of a batch: model-range images, or in latent mode the scaled latents s * E(x)
        (encoded here, without gradients, or given pre-encoded and unscaled as ``batch["latent"]``)."""
        ae = self.autoencoder
        if ae is None:
            return self._images(batch)
        if isinstance(batch, Mapping) and "latent" in batch:
            z = batch["latent"]
        else:
            with torch.no_grad():
                z = ae.to(self.device).encode(self._images(batch))
        return self.latent_scale * z

    @torch.no_grad()
    def estimate_latent_scale(self, batch: Any) -> float:
        """1 / std of the unscaled latents of ``batch`` (LDM: ``1 / z.flatten().std()``)."""
        ae = self.autoencoder.to(self.device)
        if isinstance(batch, Mapping) and "latent" in batch:
            z = batch["latent"]
        else:
            z = ae.encode(self._images(batch).to(self.device))
        return float(1.0 / z.to(torch.float64).flatten().std())

    def _fit_start_latent(self, dm: Any) -> None:
        """Latent mode: check the data's channels against the autoencoder and estimate ``auto`` latent scales."""
        ae = self.autoencoder
        data_c = getattr(dm, "channels", None)
        if data_c is not None and data_c != ae.image_channels:
            raise UserError(
                f"the data has {data_c} channel(s) but the autoencoder takes {ae.image_channels} (e.g. a grayscale "
                f"model on RGB data): set data.train.mode={'L' if ae.image_channels == 1 else 'RGB'} or use an "
                "autoencoder trained on data with this channel count"
            )
        stored = getattr(dm, "autoencoder_description", None)  # pre-encoded latents: encoded by this autoencoder?
        if stored is not None:
            from diffinv_pl.priors.latent import check_autoencoder_matches

            check_autoencoder_matches(ae, stored, None, str(self.hparams.autoencoder))
        if math.isfinite(self.latent_scale):
            return  # a number, or restored from a checkpoint
        scale = None
        if self.trainer.is_global_zero:
            if dm is None or not hasattr(dm, "train_dataloader"):
                raise UserError("model.latent_scale=auto needs a data module to read a first batch: give a number")
            scale = self.estimate_latent_scale(next(iter(dm.train_dataloader())))
        scale = float(self.trainer.strategy.broadcast(scale, src=0))
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"the estimated latent scale is {scale} (constant latents?): give model.latent_scale")
        self.latent_scale_value.fill_(scale)
        log.info("latent scale (1 / std of the first batch's latents): %.6g", scale)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.autoencoder is not None:
            self._fit_start_latent(dm)
        data_c = getattr(dm, "channels", None)
        model_c = self.data_channels()
        if data_c is not None and model_c is not None and data_c != model_c:
            raise UserError(
                f"the data has {data_c} channel(s) but the model expects {model_c}: set the data's mode "
                f"(data.train.mode=L for 1 channel, RGB for 3) or model.net.image_channels={data_c}"
            )
        size = getattr(dm, "image_size", None)
        n = self.patch.convention.image_size if self.patch is not None else None
        if n is not None and size is not None and tuple(size) != (n, n):
            raise UserError(f"images are {tuple(size)} px but model.patch.image_size is {n}: make them equal")

    def _generators(self, stage: str, batch_idx: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """(CPU generator for sigma and patches, generator on ``device`` for the noise) of one step."""
        epoch = self.current_epoch if stage == "train" else 0
        seed = hash_seed(self.hparams.seed, stage, epoch, batch_idx, self.global_rank)
        cpu = torch.Generator().manual_seed(seed)
        dev = torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)
        return cpu, dev

    def _loss_terms(self, denoiser: nn.Module, x0: Tensor, cpu_gen: torch.Generator, dev_gen: torch.Generator):
        """(per-example loss (K,), sigma (K,), patch size or None) for one batch of model-range data."""
        size = None
        net_kwargs = {}
        if self.patch is not None:
            x0, pos, size = self.patch.cut(x0, cpu_gen)
            net_kwargs["pos"] = pos
        sigma = self.objective.sample_sigma(x0.shape[0], cpu_gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=dev_gen, device=x0.device, dtype=x0.dtype)
        per_example = denoising_loss(denoiser, self.objective, x0, sigma, noise, **net_kwargs)
        if self.hparams.loss_reduction == "padis_sum":  # sum over the d pixels of each patch, not the mean
            per_example = per_example * x0[0].numel()
        return per_example, sigma, size

    # ------------------------------------------------------------------------------------------------------------
    # training

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self._examples(batch)
        cpu_gen, dev_gen = self._generators("train", batch_idx, x0.device)
        devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=x0.device.type if devices else "cuda"):
            torch.manual_seed(cpu_gen.initial_seed() ^ 0x2545F491)  # dropout: a pure function of the step
            per_example, sigma, size = self._loss_terms(self.denoiser, x0, cpu_gen, dev_gen)
        loss = per_example.mean()
        loader_images = x0.shape[0] * self.trainer.world_size * self.trainer.accumulate_grad_batches
        self._images_per_step = self.counted_images(loader_images)
        self.log("train/loss", loss, prog_bar=True, batch_size=per_example.shape[0])
        if size is not None:
            self.log("train/patch_size", float(size), batch_size=1)
        self._log_sigma_bands(per_example.detach(), sigma)
        return loss

    def counted_images(self, loader_images: int) -> float:
        """Images one optimizer step counts for the EMA and the lr ramp-up: the loader's, times PaDIS's
        batch_mul_avg with ``count_images="padis"`` (module docstring)."""
        if self.hparams.count_images == "padis":
            return loader_images * self.patch.counted_images_factor
        return float(loader_images)

    def _band_names(self) -> list[str]:
        edges = [0.0, *self.hparams.sigma_bands, math.inf]
        return [
            f"lt{hi:g}" if lo == 0 else (f"ge{lo:g}" if hi == math.inf else f"{lo:g}-{hi:g}")
            for lo, hi in zip(edges[:-1], edges[1:])
        ]

    def _reset_bands(self, device: torch.device | None = None) -> None:
        n = len(self.hparams.sigma_bands) + 1
        self._band_sums = torch.zeros(n, dtype=torch.float64, device=device)
        self._band_counts = torch.zeros(n, dtype=torch.float64, device=device)
        self._band_batches = 0
        self._band_epoch = self.current_epoch

    def _log_sigma_bands(self, per_example: Tensor, sigma: Tensor) -> None:
        """Add one batch to the epoch's per-band sums (logged at epoch end: :meth:`on_train_epoch_end`)."""
        if self._band_sums is None:
            self._reset_bands(per_example.device)
        if self._band_sums.device != per_example.device:  # restored from a checkpoint on the CPU
            self._band_sums = self._band_sums.to(per_example.device)
            self._band_counts = self._band_counts.to(per_example.device)
        edges = torch.tensor(self.hparams.sigma_bands, dtype=sigma.dtype, device=sigma.device)
        band = torch.bucketize(sigma, edges, right=True).to(per_example.device)  # edges[i-1] <= sigma < edges[i]
        self._band_sums.index_add_(0, band, per_example.detach().to(torch.float64))
        self._band_counts.index_add_(0, band, torch.ones_like(band, dtype=torch.float64))
        self._band_batches += 1

    def on_train_epoch_start(self) -> None:
        """A fresh epoch (Lightning skips this hook when it resumes mid-epoch, keeping the restored sums)."""
        self._reset_bands(self.device)
        self._partial_epoch = False

    def on_train_epoch_end(self) -> None:
        if self._band_sums is None or self._band_epoch != self.current_epoch:
            return  # sums of another epoch (restored from a checkpoint written at the end of that epoch)
        suffix = "_partial" if self._partial_epoch else ""
        for name, total, count in zip(self._band_names(), self._band_sums.tolist(), self._band_counts.tolist()):
            if count:
                self.log(f"train/loss_sigma_{name}{suffix}", total / count, on_step=False, on_epoch=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.hparams.zero_nonfinite_grads:
            return
        big = float(self.hparams.nonfinite_grad_value)
        for p in self.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=big, neginf=-big)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: both inside the training batch, before callbacks such as
        ModelCheckpoint run their ``on_train_batch_end`` (a mid-epoch checkpoint then holds the updated EMA)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.denoiser)

    def _ema_update(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        per_step = max(self._images_per_step, 1)
        beta = ema_beta(per_step, int(num_averaged) * per_step, self.hparams.ema_halflife_images, self.hparams.ema_rampup_ratio)
        return averaged + (current - averaged) * (1.0 - beta)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.denoiser.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
            weight_decay=self.hparams.weight_decay,
        )
        warmup, rampup = self.hparams.warmup_steps, self.hparams.lr_rampup_images
        if rampup is not None:  # EDM: lr * min(1, images seen before this step / ramp-up), 0 at the first step
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step * self._images_per_step / rampup))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if warmup == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------------------
    # validation

    @torch.no_grad()
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.autoencoder is not None and not math.isfinite(self.latent_scale):
            raise UserError("model.latent_scale=auto is estimated at fit start: validate a trained checkpoint, or "
                            "give a number")
        examples = self._examples(batch)  # images, or latents in latent mode
        cpu_gen, dev_gen = self._generators("val", batch_idx, examples.device)
        per_example, _, _ = self._loss_terms(self.ema_denoiser, examples, cpu_gen, dev_gen)
        self.log("val/loss", per_example.mean(), prog_bar=True, sync_dist=True, batch_size=per_example.shape[0])
        if isinstance(batch, Mapping) and "latent" in batch:
            return  # pre-encoded latents: no images to measure the PSNR gain on
        x0 = self._images(batch)
        if x0.ndim == 4:
            for s, gain in self.psnr_gain(x0, cpu_gen, dev_gen).items():
                self.log(f"val/psnr_gain_sigma{s:g}", gain, sync_dist=True, batch_size=x0.shape[0])
        prior = getattr(getattr(self.trainer, "datamodule", None), "prior", None)
        if isinstance(prior, GaussianMixture):
            errors = self.mse_vs_exact(x0, prior, dev_gen)
            for s, err in errors.items():
                self.log(f"val/mse_vs_exact_sigma{s:g}", err, sync_dist=True)
            self.log("val/mse_vs_exact", torch.stack(list(errors.values())).mean(), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def psnr_gain(self, x0: Tensor, cpu_gen: torch.Generator, dev_gen: torch.Generator) -> dict[float, Tensor]:
        """Per sigma in ``val_sigmas`` (model units): mean over images of PSNR(D(x0 + s n), x0) - PSNR(x0 + s n, x0),
        PSNRs in dB on the data range (model range when no data range is set), outputs clamped to it."""
        prior = self.whole_image_prior()
        lo, hi = self.data_range or self.model_range or (float(x0.min()), float(x0.max()))
        gains = {}
        state = prior.encode(x0)  # patch priors: the padded canvas, noised over its border too (as PaDIS trains)
        for s in self.hparams.val_sigmas:
            noisy_state = state + s * torch.randn(state.shape, generator=dev_gen, device=x0.device, dtype=x0.dtype)
            sig = torch.full((x0.shape[0],), s, device=x0.device, dtype=x0.dtype)
            denoised = prior.decode(prior.denoise(noisy_state, sig, generator=cpu_gen))
            noisy = prior.decode(noisy_state)
            gains[s] = (_psnr(self._to_data(denoised), self._to_data(x0), lo, hi) - _psnr(self._to_data(noisy), self._to_data(x0), lo, hi)).mean()
        return gains

    def _to_data(self, x: Tensor) -> Tensor:
        return convert_range(x, self.model_range, self.data_range) if self.data_range is not None else x

    @torch.no_grad()
    def mse_vs_exact(self, x0: Tensor, prior: GaussianMixture, generator: torch.Generator) -> dict[float, Tensor]:
        """Per sigma in ``val_sigmas``: mean over elements of (D(x, sigma) - E_prior[x0 | x])^2 at x = x0 + sigma n,
        the exact Tweedie mean computed in the prior's dtype (float64)."""
        prior = prior.to(device=x0.device)
        errors = {}
        for s in self.hparams.val_sigmas:
            x = x0 + s * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            exact = prior.denoise(x.to(prior.means.dtype), s)
            errors[s] = (self.ema_denoiser(x, s).to(exact.dtype) - exact).square().mean()
        return errors

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir is a collective: every rank
        if not self.trainer.is_global_zero:  # one grid per epoch; the EMA model's calls need no collectives
            return
        size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        if self.data_channels() is None or size is None:
            return
        samples = self.sample(self.hparams.num_sample_images, tuple(size), hash_seed(self.hparams.seed, "samples"))
        self._save_sample_grid(samples, root / "samples" / f"epoch_{self.current_epoch:04d}.png")

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def sample(self, num_images: int, image_size: tuple[int, int], seed: int = 0) -> Tensor:
        """``num_images`` unconditional samples (data range) by EDM's deterministic Heun sampler (Algorithm 1) on the
        rho = 7 grid from ``sample_sigma_max`` to 0.002 with ``sample_steps`` levels, using the EMA model; ``image_size``
        is (H, W)."""
        gen = torch.Generator().manual_seed(seed)
        prior = self.whole_image_prior()
        sigmas = edm_sigmas(self.hparams.sample_steps, 0.002, self.hparams.sample_sigma_max).tolist() + [0.0]
        shape = (num_images, *prior.state_shape((self.data_channels(), *image_size)))
        x = sigmas[0] * torch.randn(shape, generator=gen).to(self.device)

        def denoise(z: Tensor, sigma: float) -> Tensor:
            return prior.denoise(z, torch.full((num_images,), sigma, device=self.device), generator=gen)

        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x, _ = heun_step(x, denoise(x, s), s, s_next, denoise)
        return self._to_data(prior.decode(x)).float()

    def _save_sample_grid(self, samples: Tensor, path: Path) -> None:
        from torchvision.utils import make_grid  # imported here: torchvision is slow to import and only needed here

        lo, hi = self.data_range or self.model_range
        grid = make_grid(((samples - lo) / (hi - lo)).clamp(0, 1).cpu(), nrow=int(math.ceil(math.sqrt(len(samples)))))
        save_png(path, grid)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=self.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints

    def checkpoint_description(self) -> PriorCheckpointDescription:
        """What every checkpoint stores about this prior besides its weights (``checkpoint["diffinv_pl"]``): the
        network config, the objective with all its parameters, channels, ranges, positional convention, inference
        patch size (the largest training patch unless ``inference_patch_size`` is set), whether the inference weights
        are the EMA, and the sigma range derived from the objective."""
        size = None
        if self.patch is not None:
            size = int(self.hparams.inference_patch_size or max(self.patch.probabilities))
        return PriorCheckpointDescription(
            net=self.hparams.net,
            objective=self.hparams.objective,
            objective_params=asdict(self.objective),
            image_channels=self.hparams.image_channels,
            data_range=self.data_range,
            model_range=self.model_range,
            positional_convention=self.convention,
            inference_patch_size=size,
            ema=self.ema is not None,
            sigma_range=objective_sigma_range(self.objective),
            latent=self._latent_description(),
        )

    def _latent_description(self) -> dict | None:
        """The description's ``latent`` block: autoencoder path and ``describe()``, latent scale (None: pixel mode
        or a scale not estimated yet)."""
        if self.autoencoder is None or not math.isfinite(self.latent_scale):
            return None
        return {
            "autoencoder": str(Path(str(self.hparams.autoencoder)).expanduser().resolve()),
            "autoencoder_description": self.autoencoder.describe(),
            "latent_scale": self.latent_scale,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffinv_pl"] = self.checkpoint_description().to_dict()
        if self._band_sums is not None:  # the epoch in progress, for exact epoch values after a mid-epoch resume
            checkpoint["diffinv_pl_epoch_bands"] = {
                "global_step": int(self.global_step),
                "epoch": int(self._band_epoch),
                "rank": int(self.global_rank),
                "batches": int(self._band_batches),
                "sums": self._band_sums.tolist(),
                "counts": self._band_counts.tolist(),
                "partial": bool(self._partial_epoch),
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restore_bands(checkpoint)
        info = checkpoint.get("diffinv_pl")
        if info is None:
            return
        stored = PriorCheckpointDescription.from_dict(info)
        if (stored.latent is None) != (self.autoencoder is None):
            raise UserError(
                f"the checkpoint is a {'latent' if stored.latent else 'pixel'} diffusion model but this run is in "
                f"{'latent' if self.autoencoder is not None else 'pixel'} mode: resume with the experiment that "
                "wrote it (model.autoencoder), or start a new run without ckpt_path"
            )
        if stored.latent is not None:
            from diffinv_pl.priors.latent import check_autoencoder_matches

            check_autoencoder_matches(
                self.autoencoder, stored.latent["autoencoder_description"], None, str(self.hparams.autoencoder)
            )
        if (stored.positional_convention is None) != (self.convention is None):
            raise UserError(
                f"the checkpoint was trained {'with' if stored.positional_convention else 'without'} patches but this "
                f"run is in {'patch' if self.convention else 'whole-image'} mode: resume with the experiment that "
                "wrote it, or start a new run without ckpt_path"
            )
        if stored.positional_convention is not None:
            self.convention.assert_compatible(
                stored.positional_convention,
                "(this run's, the checkpoint's) resume with the model.patch settings the checkpoint was trained with",
            )
        if stored.image_channels != self.hparams.image_channels:
            raise UserError(
                f"the checkpoint has image_channels={stored.image_channels} but this run has "
                f"{self.hparams.image_channels}: resume with model.net.image_channels={stored.image_channels}, or "
                "start a new run without ckpt_path"
            )

    def _restore_bands(self, checkpoint: Mapping) -> None:
        """The per-band sums of the epoch in progress when the checkpoint was written; if the run resumes mid-epoch
        (Lightning then skips :meth:`on_train_epoch_start`, which resets them), the epoch values cover the whole
        epoch. Sums of another rank, or none at all, leave the resumed epoch marked partial."""
        state = checkpoint.get("diffinv_pl_epoch_bands")
        n = len(self.hparams.sigma_bands) + 1
        usable = (
            isinstance(state, Mapping)
            and int(state.get("global_step", -2)) == int(checkpoint.get("global_step", -1))
            and int(state.get("rank", -1)) == int(self.global_rank)
            and len(state.get("sums", ())) == n
            and len(state.get("counts", ())) == n
        )
        if usable:
            self._band_sums = torch.tensor(state["sums"], dtype=torch.float64)
            self._band_counts = torch.tensor(state["counts"], dtype=torch.float64)
            self._band_batches = int(state["batches"])
            self._band_epoch = int(state.get("epoch", -1))
            self._partial_epoch = bool(state.get("partial", False))
        else:
            self._reset_bands()
            self._band_epoch = int(checkpoint.get("epoch", -1))
            self._partial_epoch = True


LOSS_REDUCTIONS = ("mean", "padis_sum")
COUNT_IMAGES = ("loader", "padis")


def _check_padis_options(
    loss_reduction: str, count_images: str, patch: Mapping | None, lr_rampup_images: float | None, warmup_steps: int,
    nonfinite_grad_value: float,
) -> None:
    """Refuse unknown or conflicting PaDIS training options (UserError naming the fix)."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise UserError(f"model.loss_reduction={loss_reduction!r} is unknown: use one of {', '.join(LOSS_REDUCTIONS)}")
    if count_images not in COUNT_IMAGES:
        raise UserError(f"model.count_images={count_images!r} is unknown: use one of {', '.join(COUNT_IMAGES)}")
    if count_images == "padis" and patch is None:
        raise UserError(
            "model.count_images=padis counts PaDIS's patch batch multipliers: it needs model.patch (or use loader)"
        )
    if lr_rampup_images is not None and (lr_rampup_images <= 0 or warmup_steps):
        raise UserError(
            f"model.lr_rampup_images={lr_rampup_images} needs a value > 0 and model.warmup_steps=0 (got "
            f"{warmup_steps}): use one of the two warm-ups"
        )
    if not (math.isfinite(nonfinite_grad_value) and nonfinite_grad_value >= 0):
        raise UserError(f"model.nonfinite_grad_value must be finite and >= 0 (EDM: 1e5), got {nonfinite_grad_value}")


def _patch_training(
    patch: Mapping, data_range: Sequence[float] | None, model_range: Sequence[float] | None
) -> PatchTraining:
    """:meth:`PatchTraining.build` from the ``patch`` config, padding with the model-unit image of the data-unit
    zero (:func:`data_zero`)."""
    if "pad_value" in patch:
        raise UserError(
            "model.patch.pad_value is not a setting: the pad is the data-unit zero (air), mapped to model units by "
            "model.data_range/model_range; remove it"
        )
    return PatchTraining.build(**dict(patch), pad_value=data_zero(data_range, model_range))


def _load_frozen_autoencoder(path: str, patch: Mapping | None, latent_scale: float | str):
    """The frozen autoencoder of latent mode (eval, no gradients); UserError for patch mode or a bad scale."""
    from diffinv_pl.priors.autoencoders import load_autoencoder  # imported here: diffusers is slow to import

    if patch is not None:
        raise UserError("latent mode (model.autoencoder) trains on whole latents: set model.patch=null")
    if latent_scale != "auto":
        try:
            ok = math.isfinite(float(latent_scale)) and float(latent_scale) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"model.latent_scale={latent_scale!r} must be 'auto' or a number > 0")
    try:
        return load_autoencoder(path)
    except UserFileError as err:
        raise UserFileError(
            f"{err}. Train the autoencoder first (model.autoencoder names it); for experiment=ldm_tiny: python "
            "train.py experiment=autoencoder_tiny paths.output_dir=data/weights/autoencoder_tiny"
        ) from err


def _psnr(x: Tensor, ref: Tensor, lo: float, hi: float) -> Tensor:
    """Per-image PSNR in dB of ``x`` clamped to [lo, hi] against ``ref``, data range hi - lo (torchmetrics)."""
    return peak_signal_noise_ratio(x, ref, data_range=(lo, hi), reduction="none", dim=tuple(range(1, x.ndim)))


def _plain(value: Any) -> Any:
    """Plain Python containers for OmegaConf containers (resolved); mappings copied; anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value
