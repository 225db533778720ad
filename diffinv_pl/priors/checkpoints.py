"""Load a prior trained by ``python train.py`` (a ``DiffusionTask`` Lightning checkpoint) as a solver :class:`Prior`.

Everything needed to rebuild the prior, besides the weights (``denoiser.*`` and, with EMA, ``ema.module.*``), is one
:class:`PriorCheckpointDescription` stored as ``checkpoint["diffinv_pl"]``: the network's Hydra config, the objective
and its parameters (which fix the preconditioning), the channel count, the data/model ranges, the positional
convention, the inference patch size, whether the inference weights are an EMA and the noise levels the denoiser is
meant for. ``DiffusionTask`` writes it and :func:`load_diffusion_prior` reads it, both through that class; nothing
is guessed or read from ``hyper_parameters``. A checkpoint without it, of another format version, with unknown or
missing fields, or whose convention or channel count differs from what the caller expects, is refused with the
differences named.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from diffinv_pl.diffusion.losses import (
    EDMObjective,
    LDMObjective,
    Objective,
    VEObjective,
    VPObjective,
    build_objective,
)
from diffinv_pl.diffusion.schedules import vp_continuous_sigma
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
from diffinv_pl.priors.patches import PositionalConvention, data_zero

FORMAT_PREFIX = "diffinv_pl.diffusion_prior/"
CHECKPOINT_FORMAT = FORMAT_PREFIX + "3"
# format 3: patch priors pad with the data-unit zero (air) and solve on the padded canvas (format 2 padded with the
# model-range 0, mid-grey). Whole-image descriptions did not change, so format 2 is still read for them.
WHOLE_IMAGE_FORMATS = (FORMAT_PREFIX + "2",)
# the sampling ranges of EDM (Karras et al. 2022, Table 1 / Appendix): sigma in [0.002, 80] for EDM, t in [1e-3, 1]
# for the continuous VP schedule (the VP sampler's epsilon_s)
EDM_SIGMA_RANGE = (0.002, 80.0)
VP_T_RANGE = (1e-3, 1.0)


def objective_sigma_range(objective: Objective) -> tuple[float, float]:
    """(sigma_min, sigma_max), in model-range units, of the noise levels a denoiser trained with ``objective`` is
    meant for: the sampling range EDM uses with that parameterisation.

    * ``edm``: (0.002, 80), EDM's sampling range (training draws ln sigma ~ N(p_mean, p_std^2), unbounded, so the
      sampling range is the meaningful one).
    * ``vp``: (sigma_VP(1e-3), sigma_VP(1)) with the objective's beta_min / beta_d (about (0.0105, 152) for the
      defaults): t from EDM's VP sampling epsilon_s = 1e-3 to 1. Training draws t down to ``epsilon_t`` (1e-5), but
      the VP sampler never goes below 1e-3.
    * ``ve``: (sigma_min, sigma_max) of the objective (default (0.02, 100)): the training range, which is also EDM's
      VE sampling range.
    * ``ldm``: (sigma_0, sigma_{T-1}) of the discrete schedule (about (0.0388, 83.8) for LDM's).
    """
    if isinstance(objective, EDMObjective):
        return EDM_SIGMA_RANGE
    if isinstance(objective, VPObjective):
        t = torch.tensor(VP_T_RANGE, dtype=torch.float64)
        lo, hi = vp_continuous_sigma(t, objective.beta_min, objective.beta_d).tolist()
        return (float(lo), float(hi))
    if isinstance(objective, VEObjective):
        return (float(objective.sigma_min), float(objective.sigma_max))
    if isinstance(objective, LDMObjective):
        sigmas = objective.sigmas()
        return (float(sigmas[0]), float(sigmas[-1]))
    raise TypeError(f"no sigma range for objective {type(objective).__name__}")


def _pair(value: Any, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair or None, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError(f"{name} must have lo < hi, got {(lo, hi)}")
    return (lo, hi)


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PriorCheckpointDescription:
    """What a trained diffusion prior is, apart from its weights: written by ``DiffusionTask`` (its
    ``checkpoint_description``) as ``checkpoint["diffinv_pl"] = description.to_dict()``, read by
    :func:`load_diffusion_prior` and on resume with :meth:`from_dict`.

    Fields:
        net: Hydra config (``_target_`` and kwargs) of the raw backbone network; None when the task was given an
            ``nn.Module`` (such a checkpoint can be resumed but not loaded as a prior).
        objective, objective_params: ``edm`` | ``vp`` | ``ve`` and all its parameters (defaults included), which
            fix the preconditioning wrapper around ``net``.
        image_channels: channels the network denoises (None: flat vectors).
        data_range, model_range: the affine map applied to training data ((lo, hi) or None); noise levels are in
            model-range units.
        positional_convention: canvas size, pad width and normalisation of the positional channels (the pad width is
            stored here and only here); None for whole-image models.
        inference_patch_size: P of the assembled whole-image denoiser (the largest training patch unless set);
            None for whole-image models.
        ema: whether the weights meant for inference are an EMA (``ema.module.*``) rather than the raw weights.
        sigma_range: (sigma_min, sigma_max) in model units the denoiser is meant for, derived from the objective by
            :func:`objective_sigma_range`.
        latent: None for pixel models; for latent diffusion models (the network denoises the scaled latent
            z = latent_scale * E(x) of a frozen autoencoder, :mod:`diffinv_pl.priors.latent`) a plain dict with
            ``autoencoder`` (its path, str), ``autoencoder_description`` (its ``describe()`` dict) and
            ``latent_scale`` (float > 0). Optional when reading (older descriptions have none).
        format: :data:`CHECKPOINT_FORMAT`; any other value is refused.
    """

    net: dict | None
    objective: str
    objective_params: dict
    image_channels: int | None
    data_range: tuple[float, float] | None
    model_range: tuple[float, float] | None
    positional_convention: PositionalConvention | None
    inference_patch_size: int | None
    ema: bool
    sigma_range: tuple[float, float]
    latent: dict | None = None
    format: str = CHECKPOINT_FORMAT

    def __post_init__(self):
        if self.format != CHECKPOINT_FORMAT:
            raise ValueError(_format_message(self.format))
        if self.net is not None and not isinstance(self.net, Mapping):
            raise ValueError(f"net must be a Hydra config mapping or None, got {type(self.net).__name__}")
        if not isinstance(self.objective_params, Mapping):
            raise ValueError(f"objective_params must be a mapping, got {type(self.objective_params).__name__}")
        build_objective(self.objective, **self.objective_params)  # unknown objective or parameters: ValueError
        if not isinstance(self.ema, bool):
            raise ValueError(f"ema must be a bool, got {self.ema!r}")
        conv = self.positional_convention
        if isinstance(conv, Mapping):
            conv = PositionalConvention.from_dict(conv)
        if conv is not None and not isinstance(conv, PositionalConvention):
            raise ValueError(f"positional_convention must be a PositionalConvention or None, got {conv!r}")
        size = _optional_int(self.inference_patch_size, "inference_patch_size")
        if (conv is None) != (size is None):
            raise ValueError(
                "inference_patch_size must be set exactly when there is a positional convention (patch model), got "
                f"{size!r} with convention {conv!r}"
            )
        if conv is not None and size > conv.padded_size:
            raise ValueError(f"inference_patch_size {size} is larger than the padded canvas ({conv.padded_size})")
        sigma = _pair(self.sigma_range, "sigma_range")
        if sigma is None or sigma[0] < 0:
            raise ValueError(f"sigma_range must be a (lo, hi) pair with 0 <= lo < hi, got {self.sigma_range!r}")
        if self.latent is not None:
            _check_latent(self.latent)
        data, model = _pair(self.data_range, "data_range"), _pair(self.model_range, "model_range")
        if data is not None and model is None:
            raise ValueError("data_range needs a model_range")
        for name, value in [
            ("net", copy.deepcopy(dict(self.net)) if self.net is not None else None),
            ("objective_params", dict(self.objective_params)),
            ("image_channels", _optional_int(self.image_channels, "image_channels")),
            ("data_range", data),
            ("model_range", model),
            ("positional_convention", conv),
            ("inference_patch_size", size),
            ("sigma_range", sigma),
            ("latent", copy.deepcopy(dict(self.latent)) if self.latent is not None else None),
        ]:
            object.__setattr__(self, name, value)

    def objective_instance(self) -> Objective:
        return build_objective(self.objective, **self.objective_params)

    def to_dict(self) -> dict:
        """Plain containers only (str, int, float, bool, None, list, dict), as ``torch.load(weights_only=True)``
        and JSON accept them."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PositionalConvention):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> PriorCheckpointDescription:
        """The inverse of :meth:`to_dict`. Another format version, unknown fields and missing fields are refused,
        each with the names."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a prior checkpoint description must be a mapping, got {type(d).__name__}")
        found = d.get("format")
        if found in WHOLE_IMAGE_FORMATS and d.get("positional_convention") is not None:
            raise ValueError(
                f"this patch prior has checkpoint format {found!r}: it was trained with the pad filled with the "
                "model-range 0 (mid-grey), not the data-unit 0 (air) that PaDIS and format 3 use; retrain it with the "
                "current train.py"
            )
        if found != CHECKPOINT_FORMAT and found not in WHOLE_IMAGE_FORMATS:
            raise ValueError(_format_message(found))
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown prior checkpoint description field(s) {unknown}; valid: {names}")
        missing = [n for n in names if n not in d and n not in OPTIONAL_FIELDS]
        if missing:
            raise ValueError(f"prior checkpoint description lacks field(s) {missing}")
        values = {**d, "format": CHECKPOINT_FORMAT}  # a whole-image format-2 description reads unchanged
        conv = values["positional_convention"]
        values["positional_convention"] = PositionalConvention.from_dict(conv) if conv is not None else None
        return cls(**values)


OPTIONAL_FIELDS = ("latent",)
LATENT_KEYS = ("autoencoder", "autoencoder_description", "latent_scale")


def _check_latent(latent: Any) -> None:
    """ValueError unless ``latent`` is a mapping with exactly :data:`LATENT_KEYS` and a finite scale > 0."""
    if not isinstance(latent, Mapping) or sorted(latent) != sorted(LATENT_KEYS):
        raise ValueError(f"latent must be a mapping with keys {list(LATENT_KEYS)}, got {latent!r}")
    scale = latent["latent_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"latent.latent_scale must be a finite number > 0, got {scale!r}")
    if not isinstance(latent["autoencoder_description"], Mapping):
        raise ValueError("latent.autoencoder_description must be the autoencoder's describe() mapping")


def _format_message(found: Any) -> str:
    if isinstance(found, str) and found.startswith(FORMAT_PREFIX):
        return (
            f"checkpoint format {found!r} is not {CHECKPOINT_FORMAT!r}, the one this version reads: retrain the prior "
            "with the current train.py, or re-export it (build DiffusionTask(**ckpt['hyper_parameters']), load "
            "ckpt['state_dict'] into it and store task.checkpoint_description().to_dict() as ckpt['diffinv_pl'])"
        )
    return f"not a diffinv_pl diffusion-prior description (format {found!r}, expected {CHECKPOINT_FORMAT!r})"


@dataclass
class DiffusionPrior:
    """A trained denoiser and what it was trained on.

    ``denoiser`` is D(x, sigma[, pos]) on what the network was trained on (patches in patch mode);
    ``convention`` is None for whole-image models; ranges are (lo, hi) tuples or None; ``sigma_range`` the noise
    levels (model units) the denoiser is meant for; ``description`` what the checkpoint stores about it.
    """

    denoiser: nn.Module
    image_channels: int | None
    convention: PositionalConvention | None
    data_range: tuple[float, float] | None
    model_range: tuple[float, float] | None
    max_patch_size: int | None
    sigma_range: tuple[float, float] = (0.0, math.inf)
    description: PriorCheckpointDescription | None = None

    def whole_image(
        self, patch_size: int | None = None, per_sample_calls: bool = False, canvas_state: bool = True
    ) -> Prior:
        """The whole-image prior in model-range units: the denoiser itself, or patches assembled on a randomly
        shifted grid (shifts drawn from the generators the solver passes), padded with the model-unit image of the
        data-unit zero (:func:`~diffinv_pl.priors.patches.data_zero`: -1 for [0, 1] data trained in [-1, 1]).
        ``canvas_state`` (patch priors; PaDIS: True): the solver state is the padded canvas (see
        :class:`PatchAssembledPrior`); False: the image."""
        if self.convention is None:
            if patch_size is not None:
                raise ValueError("patch_size is only meaningful for a patch-trained prior; this one is whole-image")
            return NetworkPrior(self.denoiser, self.model_range, self.image_channels, self.sigma_range, per_sample_calls)
        return PatchAssembledPrior(
            self.denoiser,
            self.convention,
            int(patch_size or self.max_patch_size),
            data_range=self.model_range,
            image_channels=self.image_channels,
            sigma_range=self.sigma_range,
            per_sample_calls=per_sample_calls,
            pad_value=data_zero(self.data_range, self.model_range),
            canvas_state=canvas_state,
        )


def load_diffusion_prior(
    path: str | Path,
    use_ema: bool = True,
    expected_channels: int | None = None,
    expected_convention: PositionalConvention | dict | None = None,
    map_location: str | torch.device = "cpu",
) -> DiffusionPrior:
    """Rebuild the trained denoiser of a ``DiffusionTask`` checkpoint (module docstring), in eval mode.

    ``expected_channels`` / ``expected_convention``: refuse the checkpoint unless it matches (e.g. an inference
    config that pads by 24 where training padded by 64).
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileError(
            f"no checkpoint at {str(path)!r} (prior.path): train a diffusion prior with train.py (it writes "
            "<run>/checkpoints/last.ckpt) and put it at that path or pass prior.path=<run>/checkpoints/last.ckpt"
        )
    try:  # weights_only: our checkpoints hold plain containers and tensors, so no pickled code is ever run
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means the file is not a checkpoint)
        raise ValueError(
            f"{str(path)!r} is not a readable diffinv_pl checkpoint ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    info = ckpt.get("diffinv_pl") if isinstance(ckpt, dict) else None
    if not isinstance(info, Mapping) or not str(info.get("format", "")).startswith(FORMAT_PREFIX):
        raise ValueError(f"{str(path)!r} is not a diffinv_pl diffusion-prior checkpoint (no {CHECKPOINT_FORMAT!r} block)")
    try:
        desc = PriorCheckpointDescription.from_dict(info)
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {err}") from err
    if desc.net is None:
        raise ValueError(
            f"{str(path)!r} does not store its network config (the model was built from an nn.Module, not a Hydra "
            "config): retrain with model.net given as a config"
        )
    channels, convention = desc.image_channels, desc.positional_convention
    if expected_channels is not None and channels is not None and channels != expected_channels:
        raise UserError(
            f"checkpoint {str(path)!r} denoises {channels} channel(s) but {expected_channels} are expected: use a "
            "prior trained on data with the same channel count (mode L = 1, RGB = 3)"
        )
    if expected_convention is not None:
        if convention is None:
            raise UserError(
                f"checkpoint {str(path)!r} is a whole-image model but the prior config expects a patch prior "
                f"({expected_convention}): give a patch-prior checkpoint, or use a whole-image prior config "
                "(e.g. prior=trained, or prior.expected_convention=null)"
            )
        convention.assert_compatible(
            expected_convention,
            "(the checkpoint's, the expected) use a prior trained with the expected image size and pad, or change "
            "prior.expected_convention",
        )
    if use_ema and not desc.ema:
        raise ValueError(f"checkpoint {str(path)!r} has no EMA weights: load it with use_ema=False")
    denoiser = desc.objective_instance().precondition(instantiate(desc.net))
    prefix = "ema.module." if use_ema else "denoiser."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state)
    return DiffusionPrior(
        denoiser.eval().requires_grad_(False),
        channels,
        convention,
        desc.data_range,
        desc.model_range,
        desc.inference_patch_size,
        desc.sigma_range,
        desc,
    )


def trained_prior(
    path: str | Path,
    use_ema: bool = True,
    data_range: tuple[float, float] | None = None,
    patch_size: int | None = None,
    expected_channels: int | None = None,
    expected_convention: dict | None = None,
    map_location: str = "cpu",
    per_sample_calls: bool = False,
    canvas_state: bool = True,
) -> Prior:
    """The whole-image :class:`Prior` of a trained checkpoint on ``data_range`` images (default: the range the prior
    was trained from, stored in the checkpoint); patch priors are assembled on a randomly shifted grid whose shifts
    come from the solver's per-sample generators. ``per_sample_calls``: one network call per image, for results
    bitwise independent of the batch and the number of ranks. ``canvas_state`` (patch priors): the solver state is
    the padded canvas (PaDIS, default) or the image (False). This is what ``prior=trained prior.path=<ckpt>`` gives
    a solver."""
    prior = load_diffusion_prior(path, use_ema, expected_channels, expected_convention, map_location)
    if prior.description.latent is not None:
        raise UserError(
            f"{str(path)!r} is a latent diffusion model: load it with prior=latent prior.path={path} (it needs its "
            "autoencoder)"
        )
    whole = prior.whole_image(patch_size, per_sample_calls, canvas_state)
    target = tuple(data_range) if data_range is not None else prior.data_range
    if prior.model_range is None or target is None or tuple(target) == tuple(prior.model_range):
        return whole
    return RangeAdaptedPrior(whole, target, prior.model_range)
