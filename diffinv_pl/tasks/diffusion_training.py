"""Lightning task that trains a denoiser with the EDM objective (Karras et al. 2022, §5 and Table 1).

Training pairs are x = x0 + sigma n with n ~ N(0, I) and ln(sigma) ~ N(P_mean, P_std^2). The loss is

    L = E_{x0, sigma, n} [ lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / d ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with d the number of elements of one sample (the mean over elements instead of EDM's sum, so values do not grow with
the data size) and D the EDM-preconditioned network. The weight makes the effective training target of the raw
network unit-variance at every sigma. sigma and sigma_data are in data units.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import Denoiser, EDMPrecond
from diffinv_pl.priors.analytic import GaussianMixture


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser: Denoiser, x0: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float) -> Tensor:
    """Batch mean of lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / d for x0, noise (B, ...) and sigma (B,)."""
    if sigma.shape != (x0.shape[0],) or noise.shape != x0.shape:
        raise ValueError(f"need sigma ({x0.shape[0]},) and noise {tuple(x0.shape)}, got {tuple(sigma.shape)}, {tuple(noise.shape)}")
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    denoised = denoiser(x0 + s * noise, sigma)
    per_sample = (denoised - x0).square().flatten(1).mean(1)
    return (edm_loss_weight(sigma, sigma_data) * per_sample).mean()


class EDMDenoiserTask(L.LightningModule):
    """Train ``net`` behind :class:`EDMPrecond`; the trained model is ``task.denoiser``, called as D(x, sigma).

    Args:
        net: raw network called as ``net(c_in * x, c_noise)`` with c_noise (B,), returning x's shape.
        sigma_data: data standard deviation assumed by the preconditioning and the loss weight.
        p_mean, p_std: training noise levels ln(sigma) ~ N(p_mean, p_std^2).
        lr, weight_decay: AdamW parameters.
        warmup_steps: linear learning-rate warm-up from lr / warmup_steps to lr over this many optimizer steps
            (0: constant lr).
        val_sigmas: noise levels at which validation compares D with the exact denoiser of the datamodule's
            ``prior`` (a :class:`GaussianMixture`), when it has one.

    Logged: ``train/loss``; ``val/loss`` (same objective with noise fixed per validation batch, so epochs compare);
    with an exact prior, ``val/mse_vs_exact`` (mean over ``val_sigmas`` of the per-element mean squared difference
    between D and E[x0 | x], in squared data units) and ``val/mse_vs_exact_sigma<s>`` per noise level.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        val_sigmas: Sequence[float] = (0.2, 1.0, 5.0),
    ) -> None:
        super().__init__()
        if sigma_data <= 0 or p_std <= 0 or lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(
                "need sigma_data > 0, p_std > 0, lr > 0, weight_decay >= 0 and warmup_steps >= 0, got "
                f"{sigma_data}, {p_std}, {lr}, {weight_decay}, {warmup_steps}"
            )
        val_sigmas = tuple(float(s) for s in val_sigmas)
        if not val_sigmas or min(val_sigmas) <= 0:
            raise ValueError(f"val_sigmas must be a non-empty list of positive noise levels, got {val_sigmas}")
        self.save_hyperparameters(ignore=["net"])
        self.denoiser = EDMPrecond(net, sigma_data)
        self.val_sigmas = val_sigmas

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return self.denoiser(x, sigma)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n training noise levels sigma = exp(p_mean + p_std z), z ~ N(0, 1), shape (n,) on CPU when a generator is given."""
        device = "cpu" if generator is not None else self.device
        z = torch.randn(n, generator=generator, device=device)
        return (self.hparams.p_mean + self.hparams.p_std * z).exp()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        (x0,) = batch
        sigma = self.sample_sigma(x0.shape[0]).to(x0.dtype)
        loss = edm_loss(self.denoiser, x0, sigma, torch.randn_like(x0), self.hparams.sigma_data)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        (x0,) = batch
        gen = torch.Generator().manual_seed(batch_idx)  # same noise every epoch for a given batch
        sigma = self.sample_sigma(x0.shape[0], gen).to(x0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        loss = edm_loss(self.denoiser, x0, sigma, noise, self.hparams.sigma_data)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        prior = getattr(self.trainer.datamodule, "prior", None)
        if isinstance(prior, GaussianMixture):
            errors = self.mse_vs_exact(x0, prior, gen)
            for s, err in errors.items():
                self.log(f"val/mse_vs_exact_sigma{s:g}", err, sync_dist=True)
            self.log("val/mse_vs_exact", torch.stack(list(errors.values())).mean(), prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def mse_vs_exact(self, x0: Tensor, prior: GaussianMixture, generator: torch.Generator) -> dict[float, Tensor]:
        """Per sigma in ``val_sigmas``: mean over elements of (D(x, sigma) - E_prior[x0 | x])^2 at x = x0 + sigma n.

        The exact Tweedie mean is computed in the prior's dtype (float64); noise comes from ``generator`` (CPU).
        """
        prior = prior.to(device=x0.device)
        errors = {}
        for s in self.val_sigmas:
            x = x0 + s * torch.randn(x0.shape, generator=generator).to(x0)
            exact = prior.denoise(x.to(prior.means.dtype), s)
            errors[s] = (self.denoiser(x, s).to(exact.dtype) - exact).square().mean()
        return errors

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if warmup == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
