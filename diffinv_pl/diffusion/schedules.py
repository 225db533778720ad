"""Noise schedules and sampling grids.

Conventions (see ``shared/reference/methods.md`` §1.1):

* Variance-exploding ("sigma") form: ``x_sigma = x0 + sigma * n``. Every denoiser is called as
  ``D(x_sigma, sigma) -> E[x0 | x_sigma]``.
* Variance-preserving (DDPM) form: ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``, which is the VE form scaled by
  ``s = sqrt(abar_t)`` with ``sigma = sqrt((1 - abar_t) / abar_t)``.

A :class:`SamplingGrid` lists the ``(s_i, sigma_i)`` pairs a sampler visits, ending at ``sigma = 0``; the sampler state
is ``x_i = s_i * (x0 + sigma_i * n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


BETA_KINDS = ("linear", "sqrt_linear", "mcgdiff_decreasing")


def linear_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """guided-diffusion / DPS ``linear`` schedule: betas linear in [beta_start, beta_end] scaled by 1000/T (float64)."""
    scale = 1000.0 / num_train_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_train_steps, dtype=torch.float64)


def sqrt_linear_betas(num_train_steps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> Tensor:
    """Latent-diffusion ``linear`` schedule: sqrt(beta) linear in [sqrt(beta_start), sqrt(beta_end)] (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2


def make_betas(kind: str, num_train_steps: int = 1000) -> Tensor:
    """Betas by name: ``linear`` (DPS), ``sqrt_linear`` (LDM) or ``mcgdiff_decreasing`` (MCGdiff GMM script).

    ``mcgdiff_decreasing`` is ``linspace(0.02, 1e-4, T - 1)`` with a leading beta of 0 so that ``abar_0 = 1``; it is
    decreasing, which is unusual, and needs adapted timesteps (exact_posterior.md §1.5, §5.2).
    """
    if kind == "linear":
        return linear_betas(num_train_steps)
    if kind == "sqrt_linear":
        return sqrt_linear_betas(num_train_steps)
    if kind == "mcgdiff_decreasing":
        tail = torch.linspace(0.02, 1e-4, num_train_steps - 1, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), tail])
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_KINDS)}")


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """VE noise level of a VP marginal: sigma = sqrt((1 - abar) / abar)."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`sigma_from_alpha_bar`: abar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma**2)


def vp_continuous_sigma(t: Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> Tensor:
    """Continuous VP schedule (Song et al.): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [0, 1]."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_continuous_t(sigma: Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> Tensor:
    """Inverse of :func:`vp_continuous_sigma`: the root in [0, 1] of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
    log_term = torch.log1p(sigma**2)
    return (torch.sqrt(beta_min**2 + 2.0 * beta_d * log_term) - beta_min) / beta_d


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (EDM) grid: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..N-1.

    Returned in decreasing order, float64, without the final zero.
    """
    if num_steps < 2:
        raise ValueError(f"EDM grid needs num_steps >= 2, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"EDM grid needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_rho_max, inv_rho_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def respace_timesteps(num_train_steps: int, spacing: str | int) -> list[int]:
    """Timesteps kept when respacing a discrete schedule (guided-diffusion ``space_timesteps`` semantics).

    ``spacing`` is an int or a string: ``"100"`` (uniform, endpoints kept, as guided-diffusion's section rule with one
    section), ``"ddim100"`` (stride ``T // 100`` starting at 0, as DDIM), or comma-separated section counts
    ``"10,15,20"``. Returns sorted increasing timesteps in ``[0, T-1]``.
    """
    spec = str(spacing)
    if spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        if not 0 < count <= num_train_steps:
            raise ValueError(f"cannot respace {num_train_steps} steps to {count}")
        stride = num_train_steps // count
        return list(range(0, num_train_steps, stride))[:count]
    try:
        section_counts = [int(part) for part in spec.split(",")]
    except ValueError as err:
        raise ValueError(f"bad timestep respacing {spacing!r}: use an int, 'ddimN' or 'n1,n2,...'") from err
    size_per = num_train_steps // len(section_counts)
    extra = num_train_steps % len(section_counts)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class SamplingGrid:
    """Noise levels a sampler visits, from noisiest to clean; the last entry is sigma = 0, s = 1.

    Attributes:
        sigmas: (N+1,) float64 VE noise levels, decreasing, ``sigmas[-1] == 0``.
        scales: (N+1,) float64 state scalings ``s_i`` (1 for VE/EDM, ``sqrt(abar_t)`` for VP); ``scales[-1] == 1``.
        init_std: standard deviation of the pure-noise initial state (1 for VP, sigma_max for EDM); solvers draw it
            in the prior's state space (``Prior.initial_state``).
    """

    sigmas: Tensor
    scales: Tensor
    init_std: float

    def __post_init__(self) -> None:
        if self.sigmas.shape != self.scales.shape or self.sigmas.ndim != 1 or len(self.sigmas) < 2:
            raise ValueError("SamplingGrid needs 1-D sigmas and scales of equal length >= 2")
        if self.sigmas[-1] != 0 or self.scales[-1] != 1:
            raise ValueError("SamplingGrid must end at sigma = 0 with scale 1")
        if bool((self.sigmas[:-1] <= 0).any()):
            raise ValueError("SamplingGrid sigmas must be > 0 before the final step")
        if bool((self.sigmas[1:] > self.sigmas[:-1]).any()):
            raise ValueError("SamplingGrid sigmas must be non-increasing")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def vp_grid(num_steps: int | str = 100, beta_schedule: str = "linear", num_train_steps: int = 1000) -> SamplingGrid:
    """DDPM/DDIM grid: respaced timesteps of a discrete VP schedule, visited from t = T-1 down to the smallest kept t.

    The final entry (sigma = 0) is the clean estimate returned by the last step.
    """
    alpha_bar = alpha_bar_from_betas(make_betas(beta_schedule, num_train_steps))
    steps = torch.tensor(respace_timesteps(num_train_steps, num_steps)).flip(0)
    abar = alpha_bar[steps]
    keep = abar < 1.0  # abar = 1 is sigma = 0 (the mcgdiff schedule's t = 0): it is the final clean point.
    abar = abar[keep]
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    return SamplingGrid(
        sigmas=torch.cat([sigma_from_alpha_bar(abar), zero]), scales=torch.cat([abar.sqrt(), one]), init_std=1.0
    )


def edm_grid(num_steps: int = 50, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> SamplingGrid:
    """EDM grid (s = 1) with the final sigma = 0 appended."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    zero = torch.zeros(1, dtype=torch.float64)
    scales = torch.ones(num_steps + 1, dtype=torch.float64)
    return SamplingGrid(sigmas=torch.cat([sigmas, zero]), scales=scales, init_std=float(sigma_max))
