"""Latent diffusion priors: a denoiser on the (scaled) latent of an autoencoder, as a solver :class:`Prior`.

State z = s * E(x) with s = ``latent_scale`` (LDM's scale factor, 1 / std of the training latents) and E the
autoencoder's unscaled encoder (:mod:`diffinv_pl.priors.autoencoders`):

    encode(x) = s * E(x),   decode(z) = Dec(z / s)   (differentiable: solvers backprop through it)
    denoise(z, sigma[, network_sigma]) = D(z, sigma) of the latent denoiser (VE form, latent units)

The operator stays in pixel space, so DPS on this prior is latent DPS and DAPS is LatentDAPS (methods.md §5.2).

Time maps of an eps-prediction latent network (config ``time_map``; methods.md §0.5):

* ``ldm``: the network gets the discrete training index of its own DDPM schedule (LDM: sqrt-linear 0.0015 -> 0.0195)
  whose sigma_t = sqrt((1 - abar_t) / abar_t) matches sigma, interpolated in log sigma
  (:class:`~diffinv_pl.diffusion.preconditioning.DiscreteVPEpsPrecond`). sigma = 10 -> t = 736.8, 0.1 -> 5.6.
* ``pixel_vp``: the released LatentDAPS map, the continuous pixel-DDPM VP schedule (beta_min 0.1, beta_d 19.9,
  t * 999; :class:`~diffinv_pl.diffusion.preconditioning.VPEpsPrecond`). sigma = 10 -> t = 675.4, 0.1 -> 27.0.

Builders: :func:`latent_prior` (a ``DiffusionTask`` latent checkpoint, ``conf/prior/latent.yaml``) and
:func:`ldm_official_prior` (the CompVis LDM converted to a diffusers folder, ``conf/prior/ldm_official.yaml``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import (
    DiscreteVPEpsPrecond,
    VPEpsPrecond,
    broadcast_sigma,
    discrete_vp_sigmas,
)
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.autoencoders import Autoencoder, load_autoencoder
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike

TIME_MAPS = ("ldm", "pixel_vp")
# ldm.json names the schedule in diffinv_pl's naming (diffinv_pl.diffusion.schedules): "sqrt_linear" = sqrt(beta)
# linear in [sqrt(linear_start), sqrt(linear_end)], which CompVis's make_beta_schedule calls "linear"
LDM_JSON_SCHEDULES = ("sqrt_linear", "linear")
LDM_FFHQ_URL = "https://ommer-lab.com/files/latent-diffusion/ffhq.zip"


class DiffusersEpsNet(nn.Module):
    """``net(x, t) = unet(x, t).sample`` for a diffusers ``UNet2DModel`` (eps prediction, t the DDPM index, float).

    Built from ``UNet2DModel`` keyword arguments (Hydra config, e.g. conf/model/ldm_unet.yaml) or around a given
    ``unet`` (a converted checkpoint). ``image_channels`` = the unet's input channels (the latent channels).
    """

    def __init__(self, unet: UNet2DModel | None = None, **config: Any) -> None:
        super().__init__()
        if (unet is None) == (not config):
            raise ValueError("give either a UNet2DModel or its keyword arguments, not both")
        self.unet = unet if unet is not None else UNet2DModel(**{k: _tuple(v) for k, v in config.items()})
        self.image_channels = int(self.unet.config.in_channels)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t.to(x.dtype).reshape(-1).expand(x.shape[0])).sample


def _tuple(value: Any) -> Any:
    """Lists (also OmegaConf's) as tuples, as diffusers configs hold them."""
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def with_time_map(denoiser: nn.Module, time_map: str | None) -> nn.Module:
    """The eps denoiser of ``denoiser`` with the chosen network-time map (module docstring); None keeps it.

    ``ldm`` keeps a :class:`DiscreteVPEpsPrecond` (its own schedule); ``pixel_vp`` puts its network behind a
    :class:`VPEpsPrecond` (beta_min 0.1, beta_d 19.9, 1000 steps). Other denoisers (EDM preconditioning) have no time
    map to choose: UserError."""
    if time_map is None:
        return denoiser
    if time_map not in TIME_MAPS:
        raise UserError(f"prior.time_map={time_map!r} is unknown: use one of {', '.join(TIME_MAPS)} (or null)")
    if not isinstance(denoiser, DiscreteVPEpsPrecond):
        raise UserError(
            f"prior.time_map={time_map} applies to eps-prediction latent models (objective ldm), but this one is "
            f"{type(denoiser.net if hasattr(denoiser, 'net') else denoiser).__name__} behind "
            f"{type(denoiser).__name__}: use prior.time_map=null"
        )
    if time_map == "ldm":
        return denoiser
    return VPEpsPrecond(denoiser.net, learned_variance=denoiser.learned_variance)


class LatentPrior(nn.Module, Prior):
    """A latent denoiser and its autoencoder as a solver prior (module docstring).

    Args:
        denoiser: ``D(z, sigma[, network_sigma])`` on scaled latents (B, latent_channels, h, w).
        autoencoder: the (frozen) :class:`Autoencoder`; its ``data_range`` is the prior's.
        latent_scale: s of z = s * E(x) (> 0).
        sigma_range: noise levels (latent units) the denoiser is meant for.
        per_sample_calls: one denoiser call per latent (results independent of the batch; slower).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        autoencoder: Autoencoder,
        latent_scale: float,
        sigma_range: tuple[float, float] = (0.0, math.inf),
        per_sample_calls: bool = False,
    ) -> None:
        super().__init__()
        if not (math.isfinite(latent_scale) and latent_scale > 0):
            raise UserError(f"latent_scale must be a finite number > 0, got {latent_scale}")
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        self.latent_scale = float(latent_scale)
        self.data_range = tuple(float(v) for v in autoencoder.data_range)
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.per_sample_calls = per_sample_calls

    def denoise(
        self,
        x: Tensor,
        sigma: Tensor | float,
        *,
        generator: GeneratorLike = None,
        network_sigma: Tensor | float | None = None,
    ) -> Tensor:
        """E[z0 | z] in latent units; ``network_sigma`` sets only the eps network's time (default: sigma)."""
        kwargs = {} if network_sigma is None else {"network_sigma": network_sigma}
        if kwargs and not isinstance(self.denoiser, (DiscreteVPEpsPrecond, VPEpsPrecond)):
            raise UserError(
                f"network_sigma needs an eps-prediction latent model (time map ldm or pixel_vp), this one is behind "
                f"{type(self.denoiser).__name__}"
            )
        if not self.per_sample_calls or x.shape[0] == 1:
            return self.denoiser(x, sigma, **kwargs)
        per_sample = {k: broadcast_sigma(v, x).reshape(-1).expand(x.shape[0]) for k, v in kwargs.items()}
        sig = broadcast_sigma(sigma, x).reshape(-1).expand(x.shape[0])
        return torch.cat([
            self.denoiser(x[i : i + 1], sig[i : i + 1], **{k: v[i : i + 1] for k, v in per_sample.items()})
            for i in range(x.shape[0])
        ])

    def forward(self, x: Tensor, sigma: Tensor | float, network_sigma: Tensor | float | None = None) -> Tensor:
        return self.denoise(x, sigma, network_sigma=network_sigma)

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        self.check_data_shape(data_shape)
        return tuple(self.autoencoder.latent_shape(tuple(data_shape)))

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        """UserError unless data are (image_channels, H, W) with H, W divisible by the downsample factor."""
        if len(data_shape) != 3:
            raise UserError(
                f"this latent prior decodes images of shape ({self.autoencoder.image_channels}, H, W), but the "
                f"operator takes {tuple(data_shape)}: use an image operator"
            )
        self.autoencoder.latent_shape(tuple(data_shape))  # channels / divisibility: UserError naming the fix

    def encode(self, x: Tensor) -> Tensor:
        """Images (..., C, H, W) in data_range -> scaled latents s * E(x)."""
        lead = x.shape[:-3]
        z = self.autoencoder.encode(x.reshape(-1, *x.shape[-3:]))
        return self.latent_scale * z.reshape(*lead, *z.shape[1:])

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (..., c, h, w) -> images Dec(z / s) in data_range (differentiable)."""
        lead = z.shape[:-3]
        x = self.autoencoder.decode(z.reshape(-1, *z.shape[-3:]) / self.latent_scale)
        return x.reshape(*lead, *x.shape[1:])


# ---------------------------------------------------------------------------------------------------------- builders
def latent_prior(
    path: str | Path,
    autoencoder: str | Path | None = None,
    latent_scale: float | None = None,
    time_map: str | None = None,
    use_ema: bool = True,
    expected_channels: int | None = None,
    data_range: tuple[float, float] | None = None,
    per_sample_calls: bool = False,
    map_location: str = "cpu",
) -> LatentPrior:
    """The :class:`LatentPrior` of a latent ``DiffusionTask`` checkpoint (``prior=latent prior.path=<ckpt>``).

    ``autoencoder``: overrides the autoencoder path stored in the checkpoint; it must match the stored description
    (latent channels, downsample factor, image channels). ``latent_scale``: if given, must equal the stored one.
    ``time_map``: null = the checkpoint's own preconditioning; ``ldm`` | ``pixel_vp`` for eps (objective ldm) models.
    ``expected_channels``: refuse an autoencoder for images of another channel count (UserError).
    ``data_range``: the image range the solver works in (default: the autoencoder's); the autoencoder maps it
    affinely to its model range, so the latent state is unchanged (a latent state must not be range-adapted).
    """
    from diffinv_pl.priors.checkpoints import load_diffusion_prior  # checkpoints imports this module's users

    if not Path(path).expanduser().is_file():
        raise UserFileError(
            f"no latent diffusion checkpoint at {str(path)!r} (prior.path): train one and put its "
            "checkpoints/last.ckpt there, or pass prior.path=<run>/checkpoints/last.ckpt. Tiny CPU prior: `python "
            "train.py experiment=autoencoder_tiny paths.output_dir=data/weights/autoencoder_tiny`, then `python "
            "train.py experiment=ldm_tiny paths.output_dir=data/weights/ldm_tiny`; your data: experiment=ldm_custom"
        )
    loaded = load_diffusion_prior(path, use_ema, map_location=map_location)
    latent = loaded.description.latent
    if latent is None:
        raise UserError(
            f"{path} is a pixel-space diffusion prior (no autoencoder stored): use prior=trained for it, or give a "
            "checkpoint of a latent run (model.autoencoder=<dir>, e.g. experiment=ldm_tiny)"
        )
    ae_path = autoencoder if autoencoder is not None else latent["autoencoder"]
    ae = load_autoencoder(ae_path, data_range=data_range, device=map_location)
    check_autoencoder_matches(ae, latent["autoencoder_description"], loaded.image_channels, str(ae_path))
    stored = float(latent["latent_scale"])
    if latent_scale is not None and not math.isclose(float(latent_scale), stored, rel_tol=1e-6):
        raise UserError(
            f"prior.latent_scale={latent_scale} differs from the checkpoint's latent scale {stored} (the model was "
            "trained on latents scaled by it): remove prior.latent_scale or set it to the checkpoint's value"
        )
    if expected_channels is not None and ae.image_channels != expected_channels:
        raise UserError(
            f"the latent prior's autoencoder takes {ae.image_channels}-channel images but {expected_channels} are "
            "expected: use a latent model trained on data with that channel count (e.g. grayscale model on RGB data)"
        )
    denoiser = with_time_map(loaded.denoiser, time_map)
    return LatentPrior(denoiser, ae, stored, loaded.sigma_range, per_sample_calls)


def check_autoencoder_matches(ae: Autoencoder, stored: Mapping, latent_channels: int | None, where: str) -> None:
    """UserError listing what differs between an autoencoder and the one a latent model was trained with: latent
    channels / downsample factor / image channels (and the model's latent channels)."""
    found = ae.describe()
    keys = ("latent_channels", "downsample_factor", "image_channels")
    diffs = [f"{k}: autoencoder {found[k]} vs latent model {stored.get(k)}" for k in keys if found[k] != stored.get(k)]
    if latent_channels is not None and ae.latent_channels != latent_channels:
        diffs.append(f"latent channels: autoencoder {ae.latent_channels} vs latent network {latent_channels}")
    if diffs:
        raise UserError(
            f"the autoencoder {where} does not belong to this latent diffusion model ({'; '.join(diffs)}): give the "
            "autoencoder it was trained with (prior.autoencoder=DIR, or drop it to use the stored path)"
        )


def ldm_official_prior(
    path: str | Path,
    time_map: str = "ldm",
    image_channels: int | None = None,
    data_range: tuple[float, float] | None = None,
    per_sample_calls: bool = False,
    map_location: str = "cpu",
) -> LatentPrior:
    """The CompVis LDM (e.g. FFHQ-256, VQ-f4) converted to a folder with ``unet/`` (diffusers UNet2DModel,
    eps prediction), ``vqvae/`` (diffusers VQModel) and ``ldm.json`` (beta_schedule in diffinv_pl's naming,
    linear_start, linear_end, num_timesteps, scale_factor, latent_channels, downsample_factor).
    ``image_channels=1`` feeds grayscale data through the RGB model (gray_to_rgb)."""
    root = Path(str(path)).expanduser()
    needed = [root / "ldm.json", root / "unet", root / "vqvae"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserFileError(
            f"the converted LDM folder is incomplete (missing {', '.join(missing)}): download {LDM_FFHQ_URL} "
            "(it contains model.ckpt), run `python -m diffinv_pl.priors.compvis convert <model.ckpt> <dir>` and "
            "put the result at ${paths.data_dir}/weights/ldm_ffhq/ (or pass prior.path=<dir>); offline, the tiny "
            "variants run without it (e.g. experiment=resample_sr_tiny, experiment=latent_daps_sr_tiny) after "
            "`python train.py experiment=autoencoder_tiny paths.output_dir=data/weights/autoencoder_tiny` and "
            "`python train.py experiment=ldm_tiny paths.output_dir=data/weights/ldm_tiny`"
        )
    info = json.loads((root / "ldm.json").read_text())
    keys = ("beta_schedule", "linear_start", "linear_end", "num_timesteps", "scale_factor", "latent_channels",
            "downsample_factor")
    absent = [k for k in keys if k not in info]
    if absent:
        raise UserError(f"{root / 'ldm.json'} lacks {absent}: re-run the diffinv_pl.priors.compvis converter")
    schedule = info["beta_schedule"]
    if schedule not in LDM_JSON_SCHEDULES:
        raise UserError(f"{root / 'ldm.json'}: beta_schedule {schedule!r} is not supported (diffinv_pl names: "
                        f"{', '.join(LDM_JSON_SCHEDULES)}); re-run the diffinv_pl.priors.compvis converter")
    from diffinv_pl.priors.diffusers_folder import load_unet  # strict, offline; imports this module

    unet = load_unet(root / "unet", map_location)
    ae = load_autoencoder(root / "vqvae", image_channels=image_channels, data_range=data_range, device=map_location)
    stored = {"latent_channels": int(info["latent_channels"]), "downsample_factor": int(info["downsample_factor"]),
              "image_channels": ae.image_channels}
    check_autoencoder_matches(ae, stored, int(unet.config.in_channels), str(root / "vqvae"))
    schedule_args = (schedule, int(info["num_timesteps"]), float(info["linear_start"]), float(info["linear_end"]))
    denoiser = DiscreteVPEpsPrecond(DiffusersEpsNet(unet), *schedule_args).eval().requires_grad_(False)
    sigmas = discrete_vp_sigmas(*schedule_args)
    return LatentPrior(with_time_map(denoiser, time_map), ae, float(info["scale_factor"]),
                       (float(sigmas[0]), float(sigmas[-1])), per_sample_calls)
