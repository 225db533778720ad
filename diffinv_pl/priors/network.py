"""Network priors: a whole-image denoiser network and the range adapter, as :class:`~diffinv_pl.priors.base.Prior`.

* :class:`NetworkPrior`: any ``D(x, sigma)`` module (a raw network behind a preconditioning wrapper such as
  ``EDMPrecond``) on whole images.
* :class:`RangeAdaptedPrior`: a prior trained on images in ``model_range`` seen on images in ``data_range``
  (e.g. a [-1, 1] network used by a solver working on [0, 1] CT images).

The patch-assembled prior of PaDIS is :class:`diffinv_pl.priors.patch_denoiser.PatchAssembledPrior`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import broadcast_sigma
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike
from diffinv_pl.utils.ranges import convert_range


def _range(r: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if r is None else (float(r[0]), float(r[1]))


class NetworkPrior(nn.Module, Prior):
    """A whole-image denoiser module as a prior: ``denoise(x, sigma) = denoiser(x, sigma)`` (no randomness).

    Args:
        denoiser: ``D(x, sigma)`` on (B, C, H, W) images in ``data_range``.
        data_range: the image range the denoiser works in (its noise levels are in these units); None: unknown.
        image_channels: C, checked against the operator's input shape when known.
        sigma_range: the noise levels the denoiser is meant for.
        per_sample_calls: evaluate the network on one image at a time, so that an image's result is bitwise the same
            in any batch and on any rank (batched convolutions otherwise sum in another order: ~1e-7 per call); slower.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        data_range: tuple[float, float] | None = None,
        image_channels: int | None = None,
        sigma_range: tuple[float, float] = (0.0, math.inf),
        per_sample_calls: bool = False,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.data_range = _range(data_range)
        self.image_channels = image_channels
        self.sigma_range = _range(sigma_range)
        self.per_sample_calls = per_sample_calls

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if not self.per_sample_calls or x.shape[0] == 1:
            return self.denoiser(x, sigma)
        sigma = broadcast_sigma(sigma, x).reshape(-1).expand(x.shape[0])
        return torch.cat([self.denoiser(x[i : i + 1], sigma[i : i + 1]) for i in range(x.shape[0])])

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        return self(x, sigma)

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        if len(data_shape) != 3 or (self.image_channels is not None and data_shape[0] != self.image_channels):
            want = f"({self.image_channels}, H, W)" if self.image_channels is not None else "(C, H, W)"
            raise ValueError(
                f"this image prior denoises images of shape {want}, but the operator takes {tuple(data_shape)}: "
                "use a prior trained on data with the operator's channel count, or set operator.channels"
            )


class RangeAdaptedPrior(nn.Module, Prior):
    """A prior on ``model_range`` images seen on ``data_range`` images.

    With the affine map x_m = lo_m + k (x - lo), k = (hi_m - lo_m) / (hi - lo), noise scales by k too, so
    D(x, sigma) = lo + (D_model(x_m, k sigma) - lo_m) / k; the sigma range scales by 1/k. Keyword arguments of
    ``denoise`` (the generator) pass through unchanged.
    """

    def __new__(cls, prior: Prior | None = None, *args, **kwargs) -> RangeAdaptedPrior:
        # a wrapped prior whose state is not the image (a patch prior's padded canvas, a latent) gets encode/decode
        # seen in data units; a pixel prior keeps the identity ones (solvers take closed-form paths for those)
        # (prior None: copy/pickle, which restore the class they saved)
        if cls is RangeAdaptedPrior and prior is not None and type(prior).decode is not Prior.decode:
            cls = RangeAdaptedStatePrior
        return super().__new__(cls)

    def __init__(self, prior: Prior, data_range: tuple[float, float], model_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        model_range = model_range if model_range is not None else prior.data_range
        if model_range is None:
            raise ValueError("the wrapped prior has no data_range; give model_range explicitly")
        self.prior = prior
        self.data_range = _range(data_range)
        self.model_range = _range(model_range)
        if not (self.data_range[0] < self.data_range[1] and self.model_range[0] < self.model_range[1]):
            raise ValueError(f"ranges must be increasing (lo < hi), got data {self.data_range}, model {self.model_range}")
        self.scale = (self.model_range[1] - self.model_range[0]) / (self.data_range[1] - self.data_range[0])
        lo, hi = prior.sigma_range
        self.sigma_range = (lo / self.scale, hi / self.scale)

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        sigma = broadcast_sigma(sigma, x).reshape(-1)
        x_model = convert_range(x, self.data_range, self.model_range)
        denoised = self.prior.denoise(x_model, sigma * self.scale, generator=generator)
        return convert_range(denoised, self.model_range, self.data_range)

    def forward(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        return self.denoise(x, sigma, generator=generator)

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        self.prior.check_data_shape(data_shape)

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.prior.state_shape(data_shape)

class RangeAdaptedStatePrior(RangeAdaptedPrior):
    """A :class:`RangeAdaptedPrior` of a prior whose state is not the image (``RangeAdaptedPrior(prior, ...)`` builds
    it by itself when the wrapped prior overrides ``decode``): encode/decode of the wrapped prior seen in
    ``data_range`` units, e.g. a patch prior's canvas padded with the data-unit zero."""

    def encode(self, x: Tensor) -> Tensor:
        """The wrapped prior's encode seen in ``data_range`` units (e.g. a patch prior's canvas, padded with the
        data-unit zero)."""
        state = self.prior.encode(convert_range(x, self.data_range, self.model_range))
        return convert_range(state, self.model_range, self.data_range)

    def decode(self, z: Tensor) -> Tensor:
        """The wrapped prior's decode seen in ``data_range`` units."""
        image = self.prior.decode(convert_range(z, self.data_range, self.model_range))
        return convert_range(image, self.model_range, self.data_range)


def as_prior(denoiser: Prior | nn.Module, data_range: tuple[float, float] | None = None) -> Prior:
    """A :class:`Prior` as is; a bare ``D(x, sigma)`` module wrapped in a :class:`NetworkPrior`."""
    if isinstance(denoiser, Prior):
        return denoiser
    if isinstance(denoiser, nn.Module):
        return NetworkPrior(denoiser, data_range)
    raise TypeError(f"expected a Prior or a D(x, sigma) nn.Module, got {type(denoiser).__name__}")
