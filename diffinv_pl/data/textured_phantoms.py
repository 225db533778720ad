"""Deterministic textured CT phantoms (family ``textured``): torso slices that are not piecewise constant.

The random-ellipse phantoms (diffinv_pl/data/phantoms.py) are piecewise constant, exactly the model total variation
assumes. A textured phantom is an axial torso slice on [-1, 1]^2 (diffinv_pl/data/phantom_grid.py), values in [0, 1]:

* **body**: an ellipse (semi-axes 0.70-0.80 along columns, 0.52-0.66 along rows, tilt up to 0.15 rad) whose radius is
  modulated by ``1 + sum_{m=2..4} a_m cos(m theta + phi_m)``, ``|a_m| <= 0.02``, so the outline is smooth but not an
  ellipse; air (exactly 0) outside it. A subcutaneous fat layer (0.22-0.30, 5-12 % of the body radius thick) wraps
  soft tissue (0.40-0.48 plus a linear ramp of up to 0.04 per unit length in each direction).
* **structures** (``num_structures``, default 5): organs as ellipses inside the soft tissue whose intensity is not
  constant but ``v + d1 (p cos b + q sin b) + d2 (1 - p^2 - q^2)`` in the organ's own unit coordinates (p, q):
  v in [0.30, 0.70], a linear gradient ``d1`` and a dome or bowl ``d2``, both in [-0.12, 0.12].
* **lungs** (``lungs``, default on): two dark lobes (0.06-0.10) holding vessels, bright (+0.25-0.40) curves along the
  zero set of a second band-limited field ``V``: ``exp(-(V / 0.35)^2)``, band 3-9 cycles per field of view.
* **bone**: a vertebral body and up to 6 ribs as bright rims (cortex 0.85-1.0, 0.012-0.035 thick) around textured
  marrow (0.48-0.62).
* **texture**: ``texture_amplitude * G * T`` is added everywhere in the body, where ``T`` is a band-limited Gaussian
  random field of unit variance whose spectrum lies in the annulus ``texture_band`` (cycles per field of view, i.e.
  per image side) and ``G`` a per-tissue gain (soft tissue and organs 1, fat 0.6, lungs 0.3, cortex 0.2, marrow 1.5).

Edges are soft: every region's indicator falls from 1 to 0 over ``EDGE_WIDTH`` (0.012, in [-1, 1] units: 0.4 pixels at
64^2, 1.5 at 256^2) with a smoothstep, reaching exactly 0 on the boundary. The sum is clipped to [0, 1].

Determinism: phantom ``index`` of the set ``seed`` draws its layout, its texture field and its vessel field from three
generators ``key_generator(seed, "ct-textured/{index}/layout" | ".../texture" | ".../vessels")``, every draw at a fixed
stream position (the maximum number of structures and ribs is always drawn), so a phantom depends on (seed, index) and
the parameters only, and changing ``texture_amplitude`` changes nothing but the texture's size. Every shape and field is
defined in continuous coordinates: the same torso at every ``size``; the texture is resolved without aliasing when
``size >= 2 * texture_band[1]`` (the default band needs 40 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from diffinv_pl.data.phantom_grid import check_phantom_request, pixel_centres
from diffinv_pl.errors import UserError
from diffinv_pl.utils.seeding import key_generator

MAX_STRUCTURES = 8
NUM_RIBS = 6
NUM_WAVES = 128  # plane waves per random field: a sum of 128 random-phase cosines is close to Gaussian
EDGE_WIDTH = 0.012
VESSEL_BAND = (3.0, 9.0)
VESSEL_WIDTH = 0.35  # in units of the vessel field's standard deviation
MAX_AMPLITUDE = 0.2
GAIN_FAT, GAIN_LUNG, GAIN_CORTEX, GAIN_MARROW = 0.6, 0.3, 0.2, 1.5


@dataclass(frozen=True)
class TexturedParams:
    """Parameters of the ``textured`` family (module docstring).

    Attributes:
        texture_amplitude: standard deviation of the soft-tissue texture in image units (the range is [0, 1]);
            0 <= a <= 0.2, default 0.03 (a few % of the range, like soft tissue in a CT window).
        texture_band: (low, high) radial frequencies of the texture in cycles per field of view (per image side),
            0 < low < high; default (6, 20): periods of 1/6 to 1/20 of the image side.
        num_structures: number of organs, 0 .. 8; default 5.
        lungs: whether the slice holds two lungs with vessels; default True.
    """

    texture_amplitude: float = 0.03
    texture_band: tuple[float, float] = (6.0, 20.0)
    num_structures: int = 5
    lungs: bool = True

    def __post_init__(self) -> None:
        a = self.texture_amplitude
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= MAX_AMPLITUDE:
            raise UserError(
                f"texture_amplitude must be a number in [0, {MAX_AMPLITUDE}] (the texture's standard deviation in "
                f"image units), got {a!r}; the default is 0.03"
            )
        object.__setattr__(self, "texture_amplitude", float(a))
        object.__setattr__(self, "texture_band", _check_band(self.texture_band))
        n = self.num_structures
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_STRUCTURES:
            raise UserError(f"num_structures must be an integer in [0, {MAX_STRUCTURES}], got {n!r}; the default is 5")
        if not isinstance(self.lungs, bool):
            raise UserError(f"lungs must be true or false, got {self.lungs!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> TexturedParams:
        """Parameters from a mapping (a config's extra keys); an unknown name raises a UserError listing the known."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(f"unknown textured-phantom option(s) {unknown}; the options are {known}")
        return cls(**options)


def _check_band(band: object) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in band)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UserError(
            f"texture_band must be two numbers [low, high] in cycles per field of view, got {band!r}; e.g. [6, 20]"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
        raise UserError(f"texture_band needs 0 < low < high (cycles per field of view), got [{lo}, {hi}]; e.g. [6, 20]")
    return lo, hi


def band_limited_field(gen: torch.Generator, band: tuple[float, float], size: int) -> Tensor:
    """A (size, size) float64 Gaussian-like random field on the pixel grid, zero mean and unit variance.

    ``T(r, c) = sqrt(2 / K) sum_k cos(w_k (r sin t_k + c cos t_k) + phi_k)`` with K = NUM_WAVES waves, directions t_k
    and phases phi_k uniform, and frequencies ``f_k = w_k / pi`` (cycles per field of view, the side of [-1, 1]) drawn
    uniformly over the area of the annulus ``band``: a flat power spectrum inside the band and none outside. Summed as
    separable outer products in a fixed order, so the result is bitwise reproducible.
    """
    lo, hi = band
    t, angle, phase = (torch.rand(NUM_WAVES, generator=gen, dtype=torch.float64) for _ in range(3))
    omega = math.pi * torch.sqrt(lo**2 + t * (hi**2 - lo**2))
    angle, phase = angle * (2 * math.pi), phase * (2 * math.pi)
    grid = pixel_centres(size)[:, None]
    rows_arg = grid * (omega * torch.sin(angle)) + phase
    cols_arg = grid * (omega * torch.cos(angle))
    rc, rs, cc, cs = torch.cos(rows_arg), torch.sin(rows_arg), torch.cos(cols_arg), torch.sin(cols_arg)
    field = torch.zeros(size, size, dtype=torch.float64)
    for k in range(NUM_WAVES):  # cos(a + b) = cos a cos b - sin a sin b
        field += torch.outer(rc[:, k], cc[:, k]) - torch.outer(rs[:, k], cs[:, k])
    return field * math.sqrt(2.0 / NUM_WAVES)


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Canvas:
    """Painter's-order compositing of soft regions: intensity ``I`` and texture gain ``G`` maps on the pixel grid."""

    def __init__(self, size: int):
        grid = pixel_centres(size)
        self.rows, self.cols = grid[:, None], grid[None, :]
        self.image = torch.zeros(size, size, dtype=torch.float64)
        self.gain = torch.zeros(size, size, dtype=torch.float64)

    def frame(self, centre: tuple[float, float], axes: tuple[float, float], angle: float) -> tuple[Tensor, Tensor]:
        """Unit ellipse coordinates (p, q) of every pixel: the ellipse is p^2 + q^2 <= 1 (axes: columns, rows)."""
        dc, dr = self.cols - centre[1], self.rows - centre[0]
        cos, sin = math.cos(angle), math.sin(angle)
        return (dc * cos + dr * sin) / axes[0], (-dc * sin + dr * cos) / axes[1]

    @staticmethod
    def soft(rho: Tensor, scale: float) -> Tensor:
        """Soft indicator of rho < 1 for a region of size ``scale``: 1 inside, 0 from rho = 1 on, EDGE_WIDTH wide."""
        return _smoothstep((1.0 - rho) * (scale / EDGE_WIDTH))

    def paint(self, mask: Tensor, value: Tensor | float, gain: Tensor | float) -> None:
        self.image += mask * (value - self.image)
        self.gain += mask * (gain - self.gain)


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


class _Torso:
    """The layout of one phantom, drawn from the layout generator in a fixed order, painted onto a canvas.

    Positions inside the body are given in the body frame: (sx, sy) in units of the body's semi-axes (a, b)."""

    def __init__(self, gen: torch.Generator, params: TexturedParams):
        self.params = params

        def u(lo: float, hi: float, n: int = 1) -> list[float]:
            return _uniform(gen, lo, hi, n).tolist()

        self.a, self.b = u(0.70, 0.80)[0], u(0.52, 0.66)[0]
        self.centre, self.tilt = u(-0.03, 0.03, 2), u(-0.15, 0.15)[0]
        self.wobble = list(zip((2, 3, 4), u(-0.02, 0.02, 3), u(0.0, 2 * math.pi, 3)))
        self.fat_t, self.fat, self.tissue = u(0.05, 0.12)[0], u(0.22, 0.30)[0], u(0.40, 0.48)[0]
        self.ramp = u(-0.04, 0.04, 2)
        m = MAX_STRUCTURES  # organ: radius^2 and angle of its centre, semi-axes, angle, v, d1, d2, gradient direction
        self.organs = list(zip(u(0.0, 0.3, m), u(0.0, 2 * math.pi, m), u(0.12, 0.35, m), u(0.12, 0.35, m),
                               u(0.0, math.pi, m), u(0.30, 0.70, m), u(-0.12, 0.12, m), u(-0.12, 0.12, m),
                               u(0.0, 2 * math.pi, m)))
        # lung: centre, semi-axes (body-frame units), tilt, base intensity, vessel contrast; left and right mirrored
        self.lungs = [(side * sx, -sy, ax, ay, side * ang, base, amp) for side, sx, sy, ax, ay, ang, base, amp in
                      zip((-1.0, 1.0), u(0.38, 0.48, 2), u(0.0, 0.2, 2), u(0.20, 0.28, 2), u(0.35, 0.50, 2),
                          u(-0.3, 0.3, 2), u(0.06, 0.10, 2), u(0.25, 0.40, 2))]
        # bone: centre, outer semi-axes and rim thickness ([-1, 1] units), cortex and marrow intensities
        spine_y, (spine_a, spine_b) = u(0.50, 0.62)[0], u(0.09, 0.13, 2)
        spine = (0.0, spine_y, spine_a * self.a, spine_b * self.a, *u(0.025, 0.035), *u(0.85, 1.0), *u(0.48, 0.62))
        n = NUM_RIBS  # ribs on a ring just inside the fat, at jittered angles; rib i is present if its draw is < 0.7
        ring = 1.0 - self.fat_t - 0.08
        ribs = zip(range(n), u(0.0, 1.0, n), u(0.03, 0.05, n), u(0.03, 0.05, n), u(0.012, 0.02, n),
                   u(0.85, 1.0, n), u(0.48, 0.62, n), u(0.0, 1.0, n))
        self.bones = [spine] + [
            (ring * math.cos(2 * math.pi * (i + t) / n), ring * math.sin(2 * math.pi * (i + t) / n), *rest)
            for i, t, *rest, present in ribs if present < 0.7
        ]

    def place(self, sx: float, sy: float) -> tuple[float, float]:
        """Image (row, column) of the body-frame point (sx, sy)."""
        x, y = sx * self.a, sy * self.b
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        return self.centre[0] + x * s + y * c, self.centre[1] + x * c - y * s

    def ellipse(self, canvas: _Canvas, centre: tuple[float, float], axes: tuple[float, float], angle: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        """(p, q, soft indicator) of an ellipse with semi-axes ``axes`` (columns, rows) in [-1, 1] units."""
        p, q = canvas.frame(centre, axes, angle)
        return p, q, canvas.soft(torch.sqrt(p * p + q * q), min(axes))

    def paint(self, canvas: _Canvas, vessels: Tensor | None) -> None:
        p, q = canvas.frame(tuple(self.centre), (self.a, self.b), self.tilt)
        theta = torch.atan2(q, p)
        radius = 1.0 + sum(w * torch.cos(m * theta + phase) for m, w, phase in self.wobble)
        rho = torch.sqrt(p * p + q * q) / radius
        body = canvas.soft(rho, min(self.a, self.b))
        inner = canvas.soft(rho / (1.0 - self.fat_t), min(self.a, self.b))
        canvas.paint(body, self.fat, GAIN_FAT)
        canvas.paint(inner, self.tissue + self.ramp[0] * canvas.rows + self.ramp[1] * canvas.cols, 1.0)
        if vessels is not None:
            for sx, sy, ax, ay, ang, base, amp in self.lungs:
                _, _, lung = self.ellipse(canvas, self.place(sx, sy), (ax * self.a, ay * self.b), self.tilt + ang)
                canvas.paint(lung * inner, base + amp * vessels, GAIN_LUNG)
        for r2, phi, sa, sb, ang, v, d1, d2, beta in self.organs[: self.params.num_structures]:
            centre = self.place(math.sqrt(r2) * math.cos(phi), math.sqrt(r2) * math.sin(phi))
            op, oq, organ = self.ellipse(canvas, centre, (sa * self.a, sb * self.b), ang)
            value = v + d1 * (op * math.cos(beta) + oq * math.sin(beta)) + d2 * (1.0 - op * op - oq * oq)
            canvas.paint(organ * inner, value, 1.0)
        for sx, sy, ax, ay, thick, cortex, marrow in self.bones:
            centre = self.place(sx, sy)
            _, _, outer = self.ellipse(canvas, centre, (ax, ay), self.tilt)
            _, _, inside = self.ellipse(canvas, centre, (ax - thick, ay - thick), self.tilt)
            gain = GAIN_CORTEX + inside * (GAIN_MARROW - GAIN_CORTEX)
            canvas.paint(outer * body, cortex + inside * (marrow - cortex), gain)


def textured_phantom(index: int, seed: int, size: int = 256, params: TexturedParams | None = None) -> Tensor:
    """Textured phantom ``index`` of the set ``seed``: (1, size, size) float32 in [0, 1] (module docstring)."""
    check_phantom_request(index, size)
    params = TexturedParams() if params is None else params
    torso = _Torso(key_generator(seed, f"ct-textured/{index}/layout"), params)
    texture = band_limited_field(key_generator(seed, f"ct-textured/{index}/texture"), params.texture_band, size)
    vessels = None
    if params.lungs:
        field = band_limited_field(key_generator(seed, f"ct-textured/{index}/vessels"), VESSEL_BAND, size)
        vessels = torch.exp(-((field / VESSEL_WIDTH) ** 2))
    canvas = _Canvas(size)
    torso.paint(canvas, vessels)
    image = (canvas.image + params.texture_amplitude * canvas.gain * texture).clamp(0.0, 1.0)
    return image.to(torch.float32)[None]
