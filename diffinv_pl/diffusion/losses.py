"""Denoising score-matching objectives of EDM (Karras et al. 2022, Table 1), one per parameterisation.

Every objective trains a denoiser D(x, sigma) ~ E[x0 | x0 + sigma n] with

    L = E_{x0, sigma, n} [ lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / d ],

d the number of elements of one training example (a mean instead of EDM's sum, so values do not grow with the
patch or image size). The objectives differ in the training distribution of sigma, the weight lambda(sigma) and the
preconditioning that turns the raw network F into D:

========  =====================================================  ==========================  ===================
name      sigma distribution                                     lambda(sigma)               preconditioning
========  =====================================================  ==========================  ===================
``edm``   ln sigma ~ N(p_mean, p_std^2)                          (s^2 + sd^2) / (s sd)^2     :class:`EDMPrecond`
``vp``    sigma = sigma_VP(t), t ~ U(epsilon_t, 1)               1 / s^2                     :class:`VPEpsPrecond`
``ve``    ln sigma ~ U(ln sigma_min, ln sigma_max)               1 / s^2                     :class:`VEPrecond`
``ldm``   sigma = sigma_t of a discrete schedule, t ~ U{0..T-1}   1 / s^2                     DiscreteVPEpsPrecond
========  =====================================================  ==========================  ===================

(``ldm`` is latent diffusion's DDPM eps loss: with D = x - sigma eps, lambda ||D - x0||^2 = ||eps - n||^2.)
with sigma_VP(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (continuous VP schedule), s = sigma, sd = sigma_data.
All noise levels are in the units of the training data (the model range, e.g. [-1, 1]). Random draws use the
``torch.Generator`` passed in, never the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import (
    DiscreteVPEpsPrecond,
    EDMPrecond,
    VEPrecond,
    VPEpsPrecond,
    discrete_vp_sigmas,
)
from diffinv_pl.diffusion.schedules import vp_continuous_sigma


@dataclass(frozen=True)
class EDMObjective:
    """EDM loss: ln sigma ~ N(p_mean, p_std^2), lambda = 1 / c_out^2; the network sits behind :class:`EDMPrecond`."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        if not (self.sigma_data > 0 and self.p_std > 0):
            raise ValueError(f"EDM objective needs sigma_data > 0 and p_std > 0, got {self.sigma_data}, {self.p_std}")

    def precondition(self, net: nn.Module) -> nn.Module:
        return EDMPrecond(net, self.sigma_data)

    def sample_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
        return (self.p_mean + self.p_std * z).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@dataclass(frozen=True)
class VPObjective:
    """VP loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1 / sigma^2; epsilon network behind
    :class:`VPEpsPrecond` (time input (M - 1) t with M = ``num_train_steps``)."""

    beta_min: float = 0.1
    beta_d: float = 19.9
    epsilon_t: float = 1e-5
    num_train_steps: int = 1000

    def __post_init__(self):
        if not (self.beta_min > 0 and self.beta_d > 0 and 0 < self.epsilon_t < 1 and self.num_train_steps >= 2):
            raise ValueError(
                "VP objective needs beta_min > 0, beta_d > 0, 0 < epsilon_t < 1 and num_train_steps >= 2, got "
                f"{self.beta_min}, {self.beta_d}, {self.epsilon_t}, {self.num_train_steps}"
            )

    def precondition(self, net: nn.Module) -> nn.Module:
        return VPEpsPrecond(net, self.num_train_steps, self.beta_min, self.beta_d)

    def sample_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        return vp_continuous_sigma(1 + u * (self.epsilon_t - 1), self.beta_min, self.beta_d)

    def weight(self, sigma: Tensor) -> Tensor:
        return 1.0 / sigma**2


@dataclass(frozen=True)
class VEObjective:
    """VE loss: ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1 / sigma^2; network behind :class:`VEPrecond`."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VE objective needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def precondition(self, net: nn.Module) -> nn.Module:
        return VEPrecond(net)

    def sample_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        return (math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min)).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        return 1.0 / sigma**2


@dataclass(frozen=True)
class LDMObjective:
    """Latent diffusion's DDPM eps loss: t ~ U{0, ..., T-1}, sigma = sigma_t of the discrete schedule
    (:func:`~diffinv_pl.diffusion.preconditioning.discrete_vp_sigmas`; LDM: ``sqrt_linear`` 0.0015 -> 0.0195, 1000
    steps), lambda = 1 / sigma^2, so the x0 loss is the eps MSE; network behind :class:`DiscreteVPEpsPrecond`."""

    beta_schedule: str = "sqrt_linear"
    num_train_steps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195

    def __post_init__(self):
        if not (self.num_train_steps >= 2 and 0 < self.linear_start < self.linear_end < 1):
            raise ValueError(
                "LDM objective needs num_train_steps >= 2 and 0 < linear_start < linear_end < 1, got "
                f"{self.num_train_steps}, {self.linear_start}, {self.linear_end}"
            )
        self.sigmas()  # unknown schedule: ValueError

    def sigmas(self) -> Tensor:
        """sigma_t, t = 0..T-1 (float64, increasing)."""
        return discrete_vp_sigmas(self.beta_schedule, self.num_train_steps, self.linear_start, self.linear_end)

    def precondition(self, net: nn.Module) -> nn.Module:
        return DiscreteVPEpsPrecond(net, self.beta_schedule, self.num_train_steps, self.linear_start, self.linear_end)

    def sample_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        t = torch.randint(0, self.num_train_steps, (n,), generator=generator, device=generator.device)
        return self.sigmas().to(generator.device)[t]

    def weight(self, sigma: Tensor) -> Tensor:
        return 1.0 / sigma**2


Objective = EDMObjective | VPObjective | VEObjective | LDMObjective
OBJECTIVES: dict[str, type] = {"edm": EDMObjective, "vp": VPObjective, "ve": VEObjective, "ldm": LDMObjective}


def build_objective(name: str, **params) -> Objective:
    """The objective called ``name`` (edm | vp | ve | ldm) with its parameters; unknown names or parameters are
    refused."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown diffusion objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    valid = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for the {name!r} objective; valid: {sorted(valid)}")
    return cls(**params)


def denoising_loss(
    denoiser: nn.Module,
    objective: Objective,
    x0: Tensor,
    sigma: Tensor,
    noise: Tensor,
    **net_kwargs: Tensor,
) -> Tensor:
    """Per-example weighted loss lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / d, shape (B,), in float32 or wider.

    ``x0`` and ``noise`` are (B, ...), ``sigma`` is (B,); ``net_kwargs`` (e.g. positional channels ``pos``) go to the
    network unchanged (not scaled by c_in).
    """
    if sigma.shape != (x0.shape[0],) or noise.shape != x0.shape:
        raise ValueError(
            f"need sigma ({x0.shape[0]},) and noise {tuple(x0.shape)}, got {tuple(sigma.shape)}, {tuple(noise.shape)}"
        )
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    denoised = denoiser(x0 + s * noise, sigma.to(x0.dtype), **net_kwargs)
    wide = torch.promote_types(x0.dtype, torch.float32)
    per_example = (denoised.to(wide) - x0.to(wide)).square().flatten(1).mean(1)
    return objective.weight(sigma).to(wide) * per_example
