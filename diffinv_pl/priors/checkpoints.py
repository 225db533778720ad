"""Load a prior trained by ``python train.py`` (a ``DiffusionTask`` Lightning checkpoint) as a denoiser D(x, sigma).

The checkpoint holds the network's Hydra config (``hyper_parameters.net``), the objective (which fixes the
preconditioning), the weights (``denoiser.*`` and, with EMA, ``ema.module.*``) and a ``diffinv_pl`` block with the
positional convention, the channel count and the data/model ranges. Nothing is guessed: a checkpoint without these,
or one whose convention or channel count differs from what the caller expects, is refused with the differences named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from diffinv_pl.diffusion.losses import build_objective
from diffinv_pl.diffusion.preconditioning import broadcast_sigma
from diffinv_pl.priors.patch_denoiser import PatchAssembledDenoiser
from diffinv_pl.priors.patches import PatchTraining, PositionalConvention
from diffinv_pl.utils.ranges import convert_range

CHECKPOINT_FORMAT = "diffinv_pl.diffusion_prior/1"


@dataclass
class DiffusionPrior:
    """A trained denoiser and what it was trained on.

    ``denoiser`` is D(x, sigma[, pos]) on what the network was trained on (patches in patch mode);
    ``convention`` is None for whole-image models; ranges are (lo, hi) tuples or None.
    """

    denoiser: nn.Module
    image_channels: int | None
    convention: PositionalConvention | None
    data_range: tuple[float, float] | None
    model_range: tuple[float, float] | None
    max_patch_size: int | None

    def whole_image(self, patch_size: int | None = None, generator: torch.Generator | None = None) -> nn.Module:
        """D(x, sigma) on whole images (model range): the denoiser itself, or patches assembled with random shifts."""
        if self.convention is None:
            if patch_size is not None:
                raise ValueError("patch_size is only meaningful for a patch-trained prior; this one is whole-image")
            return self.denoiser
        return PatchAssembledDenoiser(self.denoiser, self.convention, patch_size or self.max_patch_size, generator)


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
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: pass the .ckpt written by train.py (checkpoints/last.ckpt)")
    try:  # weights_only: our checkpoints hold plain containers and tensors, so no pickled code is ever run
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means the file is not a checkpoint)
        raise ValueError(
            f"{str(path)!r} is not a readable diffinv_pl checkpoint ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    info = ckpt.get("diffinv_pl") if isinstance(ckpt, dict) else None
    if not info or info.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a diffinv_pl diffusion-prior checkpoint (no {CHECKPOINT_FORMAT!r} block)")
    hp: dict[str, Any] = ckpt["hyper_parameters"]
    if not hp.get("net"):
        raise ValueError(
            f"{str(path)!r} does not store its network config (the model was built from an nn.Module, not a Hydra "
            "config): retrain with model.net given as a config"
        )
    convention = PositionalConvention.from_dict(info["positional_convention"]) if info["positional_convention"] else None
    channels = info.get("image_channels")
    if expected_channels is not None and channels is not None and channels != expected_channels:
        raise ValueError(
            f"checkpoint {str(path)!r} denoises {channels} channel(s) but {expected_channels} are expected: use a "
            "prior trained on data with the same channel count (mode L = 1, RGB = 3)"
        )
    if expected_convention is not None:
        if convention is None:
            raise ValueError(f"checkpoint {str(path)!r} is a whole-image model but a patch convention was expected")
        convention.assert_compatible(expected_convention)
    objective = build_objective(hp["objective"], **dict(hp.get("objective_params") or {}))
    denoiser = objective.precondition(instantiate(hp["net"]))
    prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "denoiser."
    if use_ema and prefix != "ema.module.":
        raise ValueError(f"checkpoint {str(path)!r} has no EMA weights: load it with use_ema=False")
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state)
    max_patch = hp.get("inference_patch_size")
    if convention is not None and max_patch is None:  # the largest training patch, as DiffusionTask resolves it
        max_patch = max(PatchTraining.build(**hp["patch"]).probabilities)
    ranges = {k: tuple(info[k]) if info.get(k) is not None else None for k in ("data_range", "model_range")}
    return DiffusionPrior(
        denoiser.eval().requires_grad_(False),
        channels,
        convention,
        ranges["data_range"],
        ranges["model_range"],
        max_patch,
    )


class RangeAdaptedDenoiser(nn.Module):
    """A model-range denoiser seen on another image range: with the affine map x_m = lo_m + k (x - lo), k = (hi_m -
    lo_m) / (hi - lo), noise scales by k too, so D(x, sigma) = lo + (D_model(x_m, k sigma) - lo_m) / k.

    ``data_range`` is the range of the images the caller works in (a solver's iterate, e.g. [0, 1] for CT), exposed
    as an attribute so evaluation can check it against the operator's input range.
    """

    def __init__(self, denoiser: nn.Module, data_range: tuple[float, float], model_range: tuple[float, float]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.data_range = tuple(float(v) for v in data_range)
        self.model_range = tuple(float(v) for v in model_range)
        self.scale = (self.model_range[1] - self.model_range[0]) / (self.data_range[1] - self.data_range[0])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, x).reshape(-1)
        x_model = convert_range(x, self.data_range, self.model_range)
        return convert_range(self.denoiser(x_model, sigma * self.scale), self.model_range, self.data_range)


def trained_denoiser(
    path: str | Path,
    use_ema: bool = True,
    data_range: tuple[float, float] | None = None,
    patch_size: int | None = None,
    shift_seed: int = 0,
    expected_channels: int | None = None,
    expected_convention: dict | None = None,
    map_location: str = "cpu",
) -> nn.Module:
    """Whole-image D(x, sigma) of a trained checkpoint on ``data_range`` images (default: the range the prior was
    trained from, stored in the checkpoint); patch priors are assembled with random shifts drawn from a generator
    seeded by ``shift_seed``. This is what ``prior=trained prior.path=<ckpt>`` gives a solver."""
    prior = load_diffusion_prior(path, use_ema, expected_channels, expected_convention, map_location)
    generator = torch.Generator().manual_seed(shift_seed)
    whole = prior.whole_image(patch_size, generator)
    target = tuple(data_range) if data_range is not None else prior.data_range
    if prior.model_range is None or target is None:
        return whole
    return RangeAdaptedDenoiser(whole, target, prior.model_range)
