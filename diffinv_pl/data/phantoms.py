"""Deterministic random-ellipse CT phantoms: a test set generated from its seed, nothing to download.

Each phantom is a "head": a skull (outer ellipse, value 1) filled by a brain (an inner ellipse subtracting 0.6-0.8,
leaving 0.2-0.4) holding 3-10 random structures (ellipses with random centres inside the brain, axes, angles and
signed intensities, cut off at the brain's edge), added up and clipped to [0, 1]: a random Shepp-Logan. Coordinates
are the pixel centres of [-1, 1]^2 (axis 0 = rows, axis 1 = columns), so the head fits the inscribed disc that every
CT geometry sees; edges are sharp (no antialiasing).

Phantom ``index`` of a set with ``seed`` draws every number from ``key_generator(seed, "ct-phantom/{index}")``
(sha256-seeded, diffinv_pl/utils/seeding.py), so it depends on (seed, index) only: not on the set size, batch
composition or rank; the ellipse parameters do not depend on ``size`` either (the same head at any resolution). The
"ct-phantom/" prefix keeps this stream apart from the per-sample operator and noise generators, which are seeded by
the bare sample key.

A second family, ``textured`` (diffinv_pl/data/textured_phantoms.py), gives torso slices with smooth intensity
gradients and band-limited texture, which total variation does not model. :class:`CTPhantomDataset` serves either
(``kind``); the families' keys differ (``phantom_00042`` / ``textured_00042``), so sets of both never collide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffinv_pl.data.phantom_grid import check_phantom_request, pixel_centres
from diffinv_pl.data.textured_phantoms import TexturedParams, textured_phantom
from diffinv_pl.errors import UserError
from diffinv_pl.utils.seeding import key_generator

MAX_STRUCTURES = 10
KEY_PREFIXES = {"ellipses": "phantom", "textured": "textured"}  # family (kind) -> key prefix
PHANTOM_KINDS = tuple(KEY_PREFIXES)

PhantomGenerator = Callable[[int, int, int], Tensor]  # (index, seed, size) -> (1, size, size) float32 in [0, 1]


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or kind not in KEY_PREFIXES:
        raise UserError(f"unknown phantom kind {kind!r}; choose one of {list(PHANTOM_KINDS)} (data.kind)")


def phantom_key(index: int, kind: str = "ellipses") -> str:
    """The sample key of phantom ``index`` of the family ``kind``: ``phantom_00042`` (ellipses), ``textured_00042``."""
    _check_kind(kind)
    return f"{KEY_PREFIXES[kind]}_{index:05d}"


def phantom_generator(kind: str = "ellipses", **options: object) -> PhantomGenerator:
    """The generator ``(index, seed, size) -> image`` of the family ``kind``, its options checked now.

    ``ellipses`` takes no options; ``textured`` takes the fields of
    :class:`~diffinv_pl.data.textured_phantoms.TexturedParams` (texture_amplitude, texture_band, num_structures, lungs).
    """
    _check_kind(kind)
    if kind == "textured":
        return partial(textured_phantom, params=TexturedParams.from_options(options))
    if options:
        raise UserError(
            f"the ellipse phantoms take no options, got {sorted(options)}; drop them, or set kind: textured for the "
            "textured family's options"
        )
    return random_ellipses_phantom


def random_ellipses_phantom(index: int, seed: int, size: int = 256) -> Tensor:
    """Phantom ``index`` of the set ``seed``: (1, size, size) float32 in [0, 1] (module docstring)."""
    check_phantom_request(index, size)
    gen = key_generator(seed, f"ct-phantom/{index}")

    def u(lo: float, hi: float, n: int = 1) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    # skull and brain: shared centre and tilt; the brain is 88-94 % of the skull
    a, b = u(0.66, 0.80), u(0.78, 0.92)  # semi-axes along columns / rows
    c0, c1 = u(-0.04, 0.04), u(-0.04, 0.04)
    tilt = u(-0.2, 0.2)
    shrink = u(0.88, 0.94)
    ba, bb = a * shrink, b * shrink
    # inner structures: always draw MAX_STRUCTURES so every number sits at a fixed stream position
    n = int(torch.randint(3, MAX_STRUCTURES + 1, (1,), generator=gen))
    m = MAX_STRUCTURES
    r, phi = u(0.0, 0.75, m).sqrt(), u(0.0, 2 * math.pi, m)  # uniform in a disc of radius ~0.87 of the brain
    sx, sy = r * torch.cos(phi) * ba, r * torch.sin(phi) * bb  # brain frame
    cx = c0 + sx * torch.cos(tilt) - sy * torch.sin(tilt)
    cy = c1 + sx * torch.sin(tilt) + sy * torch.cos(tilt)
    sa = u(0.04, 0.35, m) * ba
    sb = u(0.04, 0.35, m) * bb
    ang = u(0.0, math.pi, m)
    val = u(-0.2, 0.5, m)

    centres_c = torch.cat([c0, c0, cx[:n]])
    centres_r = torch.cat([c1, c1, cy[:n]])
    axes_c = torch.cat([a, ba, sa[:n]])
    axes_r = torch.cat([b, bb, sb[:n]])
    angles = torch.cat([tilt, tilt, ang[:n]])
    values = torch.cat([torch.ones(1, dtype=torch.float64), -u(0.6, 0.8), val[:n]])

    grid = pixel_centres(size)
    rows, cols = grid[:, None], grid[None, :]
    dc = cols[None] - centres_c[:, None, None]
    dr = rows[None] - centres_r[:, None, None]
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    p = (dc * cos + dr * sin) / axes_c[:, None, None]
    q = (-dc * sin + dr * cos) / axes_r[:, None, None]
    inside = (p * p + q * q <= 1.0).to(torch.float64)
    inside[2:] *= inside[1]  # structures stay inside the brain
    image = (values[:, None, None] * inside).sum(0).clamp(0.0, 1.0)
    return image.to(torch.float32)[None]


class CTPhantomDataset(Dataset):
    """``num_images`` phantoms of the family ``kind`` and the set ``seed`` as
    ``{"key": "phantom_00042", "image" (1, size, size), "index"}``, generated on access (ellipses about 14 ms each at
    256^2 on one core, textured about 50 ms).

    Args:
        num_images: phantoms 0 .. num_images - 1.
        seed: the set's seed; sets with different seeds are independent.
        size: image side in pixels.
        kind: ``ellipses`` (piecewise constant, keys ``phantom_*``) or ``textured`` (keys ``textured_*``).
        **options: the family's parameters (``textured``: texture_amplitude, texture_band, num_structures, lungs).
    """

    def __init__(self, num_images: int, seed: int = 0, size: int = 256, kind: str = "ellipses", **options: object):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise UserError(f"num_images must be an integer >= 1, got {num_images!r}; set data.num_images")
        check_phantom_request(0, size)
        self.generate = phantom_generator(kind, **options)
        self.num_images, self.seed, self.size, self.kind = num_images, seed, size, kind
        self.keys: list[str] = [phantom_key(i, kind) for i in range(num_images)]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} phantoms")
        image = self.generate(index, self.seed, self.size)
        return {"key": self.keys[index], "image": image, "index": index}
