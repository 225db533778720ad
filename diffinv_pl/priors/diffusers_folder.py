"""Local diffusers pixel-diffusion folders (``UNet2DModel`` + a DDPM-family scheduler config) as priors.

Layouts (``prior=diffusers prior.path=DIR``):

* pipeline: ``DIR/unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``) and
  ``DIR/scheduler/scheduler_config.json`` (e.g. ``google/ddpm-celebahq-256`` after ``save_pretrained`` or a hub
  snapshot); a ``model_index.json`` is not needed;
* bare model: ``DIR/config.json`` + weights, with ``DIR/scheduler_config.json`` beside them or the schedule given as
  options (``beta_schedule``, ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``prediction_type``,
  ``variance_type``); options that are set override the scheduler file.

The unet is loaded with ``UNet2DModel.from_pretrained(local_files_only=True)`` (``.bin`` files through
``torch.load(weights_only=True)``); any missing, unexpected or misshaped weight is a :class:`UserError` listing them
(diffusers itself would initialise missing weights at random with only a warning).

Schedule (float64, t = 0..T-1): ``linear`` beta_t linear in [beta_start, beta_end]; ``scaled_linear`` sqrt(beta_t)
linear in [sqrt(beta_start), sqrt(beta_end)] (diffinv_pl's ``sqrt_linear``); ``squaredcos_cap_v2``
beta_t = min(1 - f((t + 1) / T) / f(t / T), 0.999) with f(u) = cos(pi / 2 (u + 0.008) / 1.008)^2 (Nichol & Dhariwal);
or the file's ``trained_betas``. abar_t = prod_{s <= t} (1 - beta_s), sigma_t = sqrt((1 - abar_t) / abar_t); the
prior's ``sigma_range`` is (sigma_0, sigma_{T-1}). Other schedules and ``rescale_betas_zero_snr`` (abar_{T-1} = 0,
sigma infinite) are refused.

Denoiser (:class:`DiscreteVPPrecond`): with c_in = 1 / sqrt(1 + sigma^2) = sqrt(abar), the DDPM state is
x_t = c_in x = sqrt(abar) x0 + sqrt(1 - abar) n and the network time is the training index t(sigma) of the schedule
(exact at the grid points, linear in log sigma in between); with out = unet(x_t, t) (its first C channels for
``variance_type`` ``learned`` / ``learned_range``):

    epsilon:       D = x - sigma * out
    v_prediction:  D = c_in * (c_in x - sigma * out)      (x0 = sqrt(abar) x_t - sqrt(1 - abar) v)
    sample:        D = out

Images are in [-1, 1] (diffusers pipelines' range); another ``data_range`` wraps the prior in a
:class:`RangeAdaptedPrior`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import broadcast_sigma, discrete_time, discrete_vp_sigmas
from diffinv_pl.diffusion.schedules import alpha_bar_from_betas, sigma_from_alpha_bar
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.latent import DiffusersEpsNet
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior

if TYPE_CHECKING:
    from diffusers import UNet2DModel

MODEL_RANGE = (-1.0, 1.0)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
LAYOUT = ("a diffusers pixel-diffusion folder holds unet/config.json and unet/diffusion_pytorch_model.safetensors "
          "(or .bin) plus scheduler/scheduler_config.json (e.g. `DDPMPipeline.save_pretrained(DIR)`, or a snapshot of "
          "google/ddpm-celebahq-256), or is a bare UNet2DModel folder (config.json + weights) with the schedule given "
          "as prior.beta_schedule / prior.num_train_timesteps / prior.beta_start / prior.beta_end")


class DiscreteVPPrecond(nn.Module):
    """A network trained on a discrete DDPM schedule with ``sigmas`` (T,) and any diffusers prediction type, seen
    as an EDM denoiser D(x, sigma) (module docstring). ``learned_variance``: the network returns 2C channels, the
    first C are the prediction."""

    def __init__(self, net: nn.Module, sigmas: Tensor, prediction_type: str = "epsilon",
                 learned_variance: bool = False) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.net = net
        self.sigmas = sigmas.to(torch.float64)  # not a buffer: rebuilt from the schedule, never saved
        self.prediction_type = prediction_type
        self.learned_variance = learned_variance

    def network_time(self, sigma: Tensor) -> Tensor:
        """The training index of noise levels ``sigma`` (B,) on the schedule (:func:`discrete_time`)."""
        return discrete_time(sigma, self.sigmas)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = broadcast_sigma(sigma, x)
        c_in = 1.0 / (1.0 + sigma**2).sqrt()
        out = self.net(c_in * x, self.network_time(sigma.reshape(-1)).expand(x.shape[0]))
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return c_in * (c_in * x - sigma * out)
        return out


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """diffusers' ``squaredcos_cap_v2``: beta_t = min(1 - f((t + 1) / T) / f(t / T), max_beta),
    f(u) = cos(pi / 2 (u + 0.008) / 1.008)^2 (float64)."""
    u = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def schedule_sigmas(schedule: Mapping[str, Any], where: str) -> Tensor:
    """sigma_t (T,), float64, increasing, of a scheduler config (module docstring); UserError naming ``where``."""
    if schedule.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: rescale_betas_zero_snr=true puts abar = 0 (sigma = infinity) at the last step, "
                        "which a denoiser D(x, sigma) cannot express: use a model trained without it")
    trained = schedule.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(list(trained), dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError(f"{where}: trained_betas must be a list of at least 2 values in (0, 1)")
        return sigma_from_alpha_bar(alpha_bar_from_betas(betas))
    missing = [k for k in SCHEDULE_KEYS if schedule.get(k) is None]
    if missing:
        raise UserError(f"{where}: the schedule lacks {missing}: {LAYOUT}")
    kind, steps = schedule["beta_schedule"], int(schedule["num_train_timesteps"])
    start, end = float(schedule["beta_start"]), float(schedule["beta_end"])
    if steps < 2:
        raise UserError(f"{where}: num_train_timesteps must be >= 2, got {steps}")
    if kind == "linear":
        return discrete_vp_sigmas("linear", steps, start, end)
    if kind == "scaled_linear":
        return discrete_vp_sigmas("sqrt_linear", steps, start, end)
    if kind == "squaredcos_cap_v2":
        return sigma_from_alpha_bar(alpha_bar_from_betas(cosine_betas(steps)))
    raise UserError(f"{where}: beta_schedule {kind!r} is not supported: use one of {', '.join(BETA_SCHEDULES)} "
                    "(or trained_betas)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}): save the folder again with save_pretrained") from err
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data


def find_folder(root: Path) -> tuple[Path, dict]:
    """The unet folder under ``root`` (``root/unet`` or ``root`` itself) and its scheduler config ({} if none).
    UserFileError naming the path and :data:`LAYOUT` when there is no unet config or no weights; UserError for
    a latent / conditional pipeline."""
    if not root.is_dir():
        raise UserFileError(f"no diffusers folder at {str(root)!r} (prior.path): {LAYOUT}")
    for latent in ("vae", "vqvae", "text_encoder"):
        if (root / latent).is_dir():
            raise UserError(f"{str(root)!r} has a {latent}/ folder: it is a latent or text-conditioned pipeline, not "
                            "a pixel prior (a CompVis LDM loads with prior=ldm_official)")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise UserFileError(f"no UNet config in {str(root)!r} (looked for unet/config.json and config.json): {LAYOUT}")
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise UserFileError(f"no weights in {str(unet_dir)!r} (looked for {', '.join(WEIGHT_FILES)}; never random "
                            f"weights): {LAYOUT}")
    for sched in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if sched.is_file():
            config = _read_json(sched)
            if "beta_schedule" not in config and "trained_betas" not in config:
                raise UserError(f"{str(sched)!r} ({config.get('_class_name', 'no _class_name')}) is not a discrete "
                                "DDPM-family scheduler (no beta_schedule / trained_betas; e.g. a VE score-SDE "
                                "model): only VP pixel models with a beta schedule load with prior=diffusers")
            return unet_dir, {**config, "_file": str(sched)}
    return unet_dir, {}


def load_unet(unet_dir: Path, map_location: str = "cpu") -> UNet2DModel:
    """``UNet2DModel.from_pretrained(unet_dir, local_files_only=True)`` in eval mode, strict: UserError listing
    missing / unexpected / misshaped weights, an unconditional UNet2DModel only."""
    from diffusers import UNet2DModel

    config = _read_json(unet_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{str(unet_dir)!r} holds a {config['_class_name']}, not an unconditional pixel UNet2DModel")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise UserError(f"{str(unet_dir)!r} is a class-conditional UNet2DModel: only unconditional models are priors")
    try:
        unet, info = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:  # unreadable file, size mismatch, refused pickle
        cause, seen = err, {id(err)}
        while (parent := cause.__cause__ or cause.__context__) is not None and id(parent) not in seen:
            cause = parent
            seen.add(id(cause))
        why = " ".join(str(err).split())[:400]
        if cause is not err:  # e.g. torch's weights-only unpickler refusing a global inside a .bin file
            why += f"; cause: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
        raise UserError(f"could not load the UNet2DModel in {str(unet_dir)!r} ({type(err).__name__}: {why}): save it "
                        "again with save_pretrained (a .bin file must be a plain state_dict of tensors)") from err
    problems = [f"{name} {sorted(info[key])[:10]}" for key, name in
                (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mismatched"))
                if info.get(key)]
    if problems:
        raise UserError(f"the weights in {str(unet_dir)!r} do not match its config.json ({'; '.join(problems)}): "
                        "save the model again with save_pretrained (never loaded with random weights)")
    return unet.to(map_location).eval().requires_grad_(False)


def diffusers_prior(
    path: str | Path,
    beta_schedule: str | None = None,
    num_train_timesteps: int | None = None,
    beta_start: float | None = None,
    beta_end: float | None = None,
    prediction_type: str | None = None,
    variance_type: str | None = None,
    data_range: tuple[float, float] | None = MODEL_RANGE,
    per_sample_calls: bool = False,
    map_location: str = "cpu",
) -> NetworkPrior | RangeAdaptedPrior:
    """The diffusers folder at ``path`` as a whole-image prior (module docstring).

    Args:
        path: pipeline folder (``unet/`` + ``scheduler/``) or bare UNet2DModel folder.
        beta_schedule, num_train_timesteps, beta_start, beta_end: the training schedule; null = the scheduler
            config's (required for a bare folder without ``scheduler_config.json``).
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``; null = the scheduler config's, else epsilon.
        variance_type: ``learned`` / ``learned_range`` take the first C output channels; null = the scheduler
            config's, else ``fixed_small``.
        data_range: the solver's image range (the network's is [-1, 1]; another range is adapted; null keeps it).
        per_sample_calls: one network call per image (:class:`NetworkPrior`).
        map_location: device of the network.
    """
    root = Path(str(path)).expanduser()
    unet_dir, sched = find_folder(root)
    where = sched.get("_file", f"{root} (schedule options)")
    explicit = {"beta_schedule": beta_schedule, "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                "beta_end": beta_end, "prediction_type": prediction_type, "variance_type": variance_type}
    schedule = {**sched, **{k: v for k, v in explicit.items() if v is not None}}
    if any(explicit[k] is not None for k in SCHEDULE_KEYS):
        schedule.pop("trained_betas", None)  # an explicit schedule replaces the file's
    sigmas = schedule_sigmas(schedule, where)
    prediction = schedule.get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{where}: prediction_type {prediction!r} is not supported: use one of "
                        f"{', '.join(PREDICTION_TYPES)}")
    learned = (schedule.get("variance_type") or "fixed_small") in LEARNED_VARIANCE_TYPES
    unet = load_unet(unet_dir, map_location)
    channels = int(unet.config.in_channels)
    if int(unet.config.out_channels) != (2 if learned else 1) * channels:
        kind = "learned" if learned else "fixed"
        raise UserError(
            f"{str(unet_dir)!r}: the UNet maps {channels} to {unet.config.out_channels} channels, but variance_type "
            f"{schedule.get('variance_type')!r} ({kind}) needs {(2 if learned else 1) * channels}: set "
            f"prior.variance_type={'fixed_small' if learned else 'learned_range'} to match the network"
        )
    denoiser = DiscreteVPPrecond(DiffusersEpsNet(unet), sigmas, prediction, learned).eval()
    prior = NetworkPrior(denoiser, MODEL_RANGE, channels, (float(sigmas[0]), float(sigmas[-1])), per_sample_calls)
    if data_range is None or tuple(float(v) for v in data_range) == MODEL_RANGE:
        return prior
    return RangeAdaptedPrior(prior, tuple(float(v) for v in data_range), MODEL_RANGE)
