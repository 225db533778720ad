"""Patch sampling with global positional channels for patch-based diffusion priors (PaDIS, Patch-Diffusion).

Pure torch, no network code (methods.md §3.2, §3.8).

Geometry
--------
An image of side ``N = convention.image_size`` (the *unpadded* image side) is zero-padded by ``M =
convention.pad_width`` on every side, giving the padded canvas of side ``R = convention.padded_size = N + 2M``.
Canvas pixel indices ``(i, j)`` run over ``0 .. R-1``; ``i`` is the row (axis -2, height), ``j`` the column (axis -1,
width); image pixel ``(r, c)`` sits at canvas pixel ``(r + M, c + M)``.

Positional channels (``positional_channels``): channel 0 is **x** (varies along the width, i.e. with the column
``j``), channel 1 is **y** (varies along the height, with the row ``i``), exactly as PaDIS / Patch-Diffusion
(``images_pos = cat(x_pos, y_pos)``). Two normalisations are offered:

* ``"canvas"`` (default; PaDIS, methods.md §3.2): ``x = (j / (R-1) - 0.5) * 2``, ``y = (i / (R-1) - 0.5) * 2``.
  The **centre of the first padded pixel** (canvas index 0, i.e. the top-left pad pixel) maps to **-1** and the
  **centre of the last padded pixel** (canvas index R-1) maps to **+1**; every coordinate lies in [-1, 1]. These
  values depend on ``pad_width``: a network trained with pad 64 (R = 384) and evaluated with pad 24 (R = 304) sees
  shifted coordinates (methods.md §3.8), which :meth:`PositionalConvention.assert_compatible` refuses.
* ``"image"`` (not upstream; the §3.8 "normalise by the unpadded image size" fix): ``x = ((j - M) / (N-1) - 0.5) * 2``,
  so the centre of the first *image* pixel maps to -1 and that of the last image pixel to +1; pad pixels lie outside
  [-1, 1] (down to ``-1 - 2M/(N-1)``). An image pixel then has the same coordinates for every pad width.

Random positions
----------------
``sample_patches`` draws one top-left corner per image, ``top, left ~ U{0, ..., R-P}`` independently (so a patch may be
partly or entirely in the zero pad, as in PaDIS), from the given ``torch.Generator`` only: the same generator state
gives the same patches. For the Patch-Diffusion variant the largest "patch" is the whole padded canvas (``P = R``),
whose only position is (0, 0); ``patch_diffusion_sizes`` gives ``(R//4, R//2, R)``.

Patch-size probabilities (``patch_size_probabilities``), reading of methods.md §3.2
---------------------------------------------------------------------------------
PaDIS / Patch-Diffusion draw one patch size per iteration. With sizes sorted ascending ``P_1 < P_2 < P_3`` the
**largest** size gets probability ``real_p`` and the remaining mass ``1 - real_p`` is split between the smaller
sizes in the ratio 2:3 (smallest 0.4, middle 0.6): ``{P_1: 0.4 (1-real_p), P_2: 0.6 (1-real_p), P_3: real_p}``,
e.g. {16: 0.2, 32: 0.3, 64: 0.5} for real_p = 0.5 (in Patch-Diffusion ``real_p`` is thus the ratio of full-size
images). With two sizes the smaller one takes all of ``1 - real_p`` (the LION P = 16 preset {8: 0.3, 16: 0.7} is
real_p = 0.7); with one size it has probability 1 (``real_p`` must then be 1). For four or more sizes the notes
give no rule: pass ``small_weights`` (relative weights of the non-largest sizes, ascending) explicitly.

Batch multipliers (``batch_multipliers``): a smaller patch gets a larger batch: one patch is cut from each of
``batch x m(P)`` images. Two tables (methods.md §0.5):

* ``"padis"`` (default for explicit patch sizes; PaDIS's ``batch_mul_dict``): m = 64 (P = 16), 32 (24, 32),
  16 (48, 56, 64), 8 (96); the full image gets 1.
* ``"patch_diffusion"`` (Patch-Diffusion's): m = 64 (16), 32 (32), 16 (64), 4 (128), 2 (256), 1 (512).

Sizes outside a table take the multiplier of the nearest tabulated size >= P (never more patch pixels per batch than
the tabulated neighbour, e.g. m(40) = m(48) = 16); a size above the table (the full image) gets 1.

Pad value: the canvas is padded with ``pad_value``, the **model-unit image of the data-unit zero** (air in CT), as
PaDIS pads [0, 1] images with 0 before any rescaling (methods.md §0.5). With data [0, 1] mapped to model [-1, 1]
that is -1, not the mid-grey 0 (:func:`data_zero`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from diffinv_pl.errors import UserError
from diffinv_pl.utils.ranges import convert_range

NORMALIZATIONS = ("canvas", "image")
# batch_mul_dict of PaDIS (jasonhu4/PaDIS) and of Patch-Diffusion (Zhendong-Wang/Patch-Diffusion), methods.md §0.5
BATCH_MULTIPLIER_TABLES: dict[str, dict[int, int]] = {
    "padis": {16: 64, 24: 32, 32: 32, 48: 16, 56: 16, 64: 16, 96: 8},
    "patch_diffusion": {16: 64, 32: 32, 64: 16, 128: 4, 256: 2, 512: 1},
}
PADIS_PATCH_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class PositionalConvention:
    """How positional channels are computed; stored with a checkpoint and checked at inference (module docstring).

    ``image_size``: side N of the (square) *unpadded* image; ``pad_width``: zero pad M on every side; the padded
    canvas has side ``padded_size = N + 2M``; ``normalization``: "canvas" (PaDIS: canvas pixel centre 0 -> -1,
    R-1 -> +1) or "image" (image pixel centre 0 -> -1, N-1 -> +1).
    """

    image_size: int
    pad_width: int
    normalization: str = "canvas"

    def __post_init__(self):
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 2:
            raise ValueError(f"image_size must be an int >= 2, got {self.image_size!r}")
        if not isinstance(self.pad_width, int) or isinstance(self.pad_width, bool) or self.pad_width < 0:
            raise ValueError(f"pad_width must be an int >= 0, got {self.pad_width!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; valid: {', '.join(NORMALIZATIONS)}")

    @property
    def padded_size(self) -> int:
        return self.image_size + 2 * self.pad_width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PositionalConvention:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PositionalConvention field(s) {unknown}; valid: {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.name != "normalization")
        if missing:
            raise ValueError(f"PositionalConvention dict lacks field(s) {missing}")
        return cls(**{k: (int(v) if k in ("image_size", "pad_width") else v) for k, v in d.items()})

    def assert_compatible(self, other: PositionalConvention | Mapping, fix: str) -> None:
        """Raise a UserError naming every field where ``other`` differs (e.g. training pad 64 vs sampling pad 24) and
        ``fix``, what the caller's user can do about it."""
        if isinstance(other, Mapping):
            other = PositionalConvention.from_dict(other)
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise UserError(
                "positional conventions differ (the network would see shifted coordinates): " + "; ".join(diffs)
                + f": {fix}"
            )

    def coordinate(self, index: Tensor) -> Tensor:
        """Normalised coordinate of canvas pixel index ``index`` (0 .. R-1) along either axis."""
        if self.normalization == "canvas":
            return (index / (self.padded_size - 1) - 0.5) * 2.0
        return ((index - self.pad_width) / (self.image_size - 1) - 0.5) * 2.0


def positional_channels(
    convention: PositionalConvention,
    top: int | Tensor,
    left: int | Tensor,
    patch_size: int,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, 2, p, p) global coordinates of the pixels of the p x p patches whose top-left canvas pixel is
    (``top``, ``left``) (ints, or (B,) integer tensors): channel 0 = x (along the width, from the column), channel
    1 = y (along the height, from the row). ``batch`` is required for int positions and must match tensors."""
    top_t, left_t = _positions(top, left, batch, device)
    _check_patch(convention, patch_size)
    r = convention.padded_size
    if bool(((top_t < 0) | (top_t > r - patch_size) | (left_t < 0) | (left_t > r - patch_size)).any()):
        raise ValueError(f"patch positions must lie in [0, {r - patch_size}] for p={patch_size} on a {r}^2 canvas")
    offs = torch.arange(patch_size, device=top_t.device, dtype=torch.float64)
    rows = top_t.to(torch.float64)[:, None] + offs  # (B, p) canvas row indices
    cols = left_t.to(torch.float64)[:, None] + offs
    y = convention.coordinate(rows)[:, :, None].expand(-1, -1, patch_size)
    x = convention.coordinate(cols)[:, None, :].expand(-1, patch_size, -1)
    return torch.stack([x, y], dim=1).to(dtype)


def canvas_positional_channels(
    convention: PositionalConvention, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """(2, R, R) coordinates of the whole padded canvas (x, y), e.g. to cut inference patches from."""
    return positional_channels(convention, 0, 0, convention.padded_size, 1, dtype, device)[0]


def patch_size_probabilities(
    real_p: float,
    patch_sizes: Sequence[int] = PADIS_PATCH_SIZES,
    small_weights: Sequence[float] | None = None,
) -> dict[int, float]:
    """{size: probability} (ascending sizes, summing to 1): largest size ``real_p``, the rest ``1 - real_p`` split by
    ``small_weights`` (default 0.4/0.6 for three sizes, 1 for two; module docstring)."""
    sizes = _check_sizes(patch_sizes)
    real_p = float(real_p)
    if not 0.0 <= real_p <= 1.0:
        raise ValueError(f"real_p must lie in [0, 1], got {real_p}")
    n_small = len(sizes) - 1
    if small_weights is None:
        if n_small > 2:
            raise ValueError(
                f"no default split of 1 - real_p over {n_small} smaller patch sizes {sizes[:-1]}; pass small_weights"
            )
        small_weights = {0: (), 1: (1.0,), 2: (0.4, 0.6)}[n_small]
    w = [float(v) for v in small_weights]
    if len(w) != n_small:
        raise ValueError(f"small_weights needs {n_small} entries (one per non-largest size), got {len(w)}")
    if any(not v >= 0.0 for v in w) or (n_small and sum(w) <= 0.0):
        raise ValueError(f"small_weights must be non-negative with a positive sum, got {w}")
    if n_small == 0 and real_p != 1.0:
        raise ValueError(f"with a single patch size {sizes[0]} real_p must be 1, got {real_p}")
    total = sum(w)
    probs = {s: (1.0 - real_p) * v / total for s, v in zip(sizes[:-1], w)}
    probs[sizes[-1]] = real_p
    return probs


def check_probabilities(probs: Mapping[int, float], atol: float = 1e-6) -> dict[int, float]:
    """Validate a {size: probability} mapping (positive int sizes, probabilities in [0, 1] summing to 1)."""
    if not probs:
        raise ValueError("patch-size probabilities are empty")
    _check_sizes(list(probs))
    out = {}
    for s, p in probs.items():
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability of patch size {s} must lie in [0, 1], got {p}")
        out[int(s)] = p
    total = sum(out.values())
    if abs(total - 1.0) > atol:
        raise ValueError(f"patch-size probabilities must sum to 1, got {total} ({out})")
    return dict(sorted(out.items()))


def batch_multipliers(patch_sizes: Sequence[int] = PADIS_PATCH_SIZES, table: str = "padis") -> dict[int, int]:
    """{size: m(size)}: images per batch entry for patches of that size, from the ``"padis"`` or ``"patch_diffusion"``
    table (module docstring)."""
    sizes = _check_sizes(patch_sizes)
    if table not in BATCH_MULTIPLIER_TABLES:
        raise UserError(
            f"unknown batch-multiplier table {table!r}: set model.patch.batch_multipliers to one of "
            f"{', '.join(BATCH_MULTIPLIER_TABLES)} (or give model.patch.multipliers explicitly)"
        )
    values = BATCH_MULTIPLIER_TABLES[table]
    out = {}
    for s in sizes:
        above = [t for t in sorted(values) if t >= s]
        out[s] = values[above[0]] if above else 1
    return out


_table_multipliers = batch_multipliers  # PatchTraining.build has an argument of that name (the config key)


def data_zero(data_range: Sequence[float] | None, model_range: Sequence[float] | None) -> float:
    """The model-unit value of the data-unit zero (the pad value, module docstring): lo_m + (0 - lo) (hi_m - lo_m) /
    (hi - lo) for the affine map ``data_range`` -> ``model_range``; 0 without a map. [0, 1] -> [-1, 1] gives -1."""
    if data_range is None or model_range is None:
        return 0.0
    return float(convert_range(0.0, tuple(map(float, data_range)), tuple(map(float, model_range))))


def draw_patch_size(probs: Mapping[int, float], generator: torch.Generator) -> int:
    """One patch size drawn from ``probs`` with ``generator`` (one draw per training iteration, as PaDIS)."""
    probs = check_probabilities(probs)
    sizes = list(probs)
    weights = torch.tensor([probs[s] for s in sizes], dtype=torch.float64)
    return sizes[int(torch.multinomial(weights, 1, generator=generator))]


def patch_diffusion_sizes(convention: PositionalConvention) -> tuple[int, int, int]:
    """Patch-Diffusion sizes (R//4, R//2, R): the largest "patch" is the whole padded canvas."""
    r = convention.padded_size
    if r // 4 < 1:
        raise ValueError(f"padded canvas {r} is too small for Patch-Diffusion sizes (R//4 >= 1 needed)")
    return (r // 4, r // 2, r)


def pad_images(images: Tensor, convention: PositionalConvention, value: float = 0.0) -> Tensor:
    """(B, C, N, N) -> (B, C, R, R) padded by ``pad_width`` on every side with ``value`` (the model-unit image of
    the data-unit zero: :func:`data_zero`)."""
    _check_images(images, convention)
    m = convention.pad_width
    return torch.nn.functional.pad(images, (m, m, m, m), value=float(value)) if m else images


def sample_patches(
    images: Tensor,
    convention: PositionalConvention,
    patch_size: int,
    generator: torch.Generator,
    pad_value: float = 0.0,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """One random p x p patch per image of the (B, C, N, N) ``images`` padded with ``pad_value``: (patches (B, C, p, p),
    pos (B, 2, p, p) in ``images.dtype``, (top, left) (B,) int64 canvas indices of the patches' top-left pixels).
    Positions are uniform on {0..R-p}^2 and drawn from ``generator`` (on the CPU) only; p = R gives the whole
    padded image (Patch-Diffusion's largest size)."""
    _check_images(images, convention)
    _check_patch(convention, patch_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    b = images.shape[0]
    r = convention.padded_size
    n_pos = r - patch_size + 1
    top = torch.randint(0, n_pos, (b,), generator=generator, device=generator.device).cpu()
    left = torch.randint(0, n_pos, (b,), generator=generator, device=generator.device).cpu()
    patches = cut_patches(pad_images(images, convention, pad_value), top, left, patch_size)
    pos = positional_channels(convention, top, left, patch_size, b, images.dtype, images.device)
    return patches, pos, (top, left)


def cut_patches(
    padded: Tensor, top: Tensor, left: Tensor, patch_size: int, source: Tensor | None = None
) -> Tensor:
    """(K, C, p, p) patches ``padded[source[k], :, top[k]:top[k]+p, left[k]:left[k]+p]`` (one gather, no Python
    loop); ``source`` (K,) picks the image of each patch (default: patch k from image k)."""
    if padded.ndim != 4:
        raise ValueError(f"padded images must be (B, C, H, W), got shape {tuple(padded.shape)}")
    offs = torch.arange(patch_size, device=padded.device)
    rows = top.to(padded.device)[:, None] + offs  # (K, p)
    cols = left.to(padded.device)[:, None] + offs
    if source is None:
        source = torch.arange(padded.shape[0])
    bi = source.to(padded.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, p, p, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _positions(top, left, batch, device) -> tuple[Tensor, Tensor]:
    def as_tensor(v, name):
        if isinstance(v, Tensor):
            if v.dtype.is_floating_point or v.dtype == torch.bool:
                raise ValueError(f"{name} must be integer positions, got dtype {v.dtype}")
            v = v.reshape(-1).to(torch.int64)
            if batch is not None and v.numel() != batch:
                raise ValueError(f"{name} has {v.numel()} entries but batch={batch}")
            return v if device is None else v.to(device)
        if batch is None:
            raise ValueError(f"batch is required when {name} is an int")
        return torch.full((batch,), int(v), dtype=torch.int64, device=device)

    top_t, left_t = as_tensor(top, "top"), as_tensor(left, "left")
    if top_t.numel() != left_t.numel():
        raise ValueError(f"top and left differ in length ({top_t.numel()} vs {left_t.numel()})")
    return top_t, left_t


def _check_patch(convention: PositionalConvention, patch_size: int) -> None:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if patch_size > convention.padded_size:
        raise ValueError(
            f"patch_size {patch_size} is larger than the padded canvas {convention.padded_size} "
            f"(image_size {convention.image_size} + 2 * pad_width {convention.pad_width})"
        )


def _check_images(images: Tensor, convention: PositionalConvention) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    n = convention.image_size
    if images.shape[-2:] != (n, n):
        raise ValueError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but the positional convention's image_size is {n}"
        )


def _check_sizes(patch_sizes: Sequence[int]) -> list[int]:
    sizes = list(patch_sizes)
    if not sizes:
        raise ValueError("patch_sizes is empty")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"patch sizes must be positive ints, got {s!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"patch sizes must be distinct, got {sizes}")
    return sorted(sizes)


@dataclass(frozen=True)
class PatchTraining:
    """Patch-mode training set-up (PaDIS, methods.md §3.2): each iteration draws one patch size P from
    ``probabilities`` and cuts ``multipliers[P]`` random P x P patches (with positional channels) from every image of
    the batch, so a batch of B images gives B m(P) patches. The canvas is padded with ``pad_value`` (model units; the
    image of the data-unit zero, :func:`data_zero`).

    PaDIS cuts one patch from each of ``batch_gpu x m(P)`` distinct images; here the data loader's B images are each
    reused m(P) times with independent positions, which gives the same number of patches per step without a
    size-dependent loader (the patches of one image are different crops, as in upstream's repeated images).
    """

    convention: PositionalConvention
    probabilities: Mapping[int, float]
    multipliers: Mapping[int, int]
    pad_value: float = 0.0

    def __post_init__(self):
        probs = check_probabilities(self.probabilities)
        object.__setattr__(self, "probabilities", probs)
        mult = {int(s): int(v) for s, v in self.multipliers.items()}
        missing = sorted(set(probs) - set(mult))
        if missing or any(v < 1 for v in mult.values()):
            raise ValueError(f"multipliers need an int >= 1 for every patch size {sorted(probs)}, got {mult}")
        object.__setattr__(self, "multipliers", {s: mult[s] for s in probs})
        object.__setattr__(self, "pad_value", float(self.pad_value))
        for s in probs:
            _check_patch(self.convention, s)

    @classmethod
    def build(
        cls,
        image_size: int,
        pad_width: int,
        normalization: str = "canvas",
        patch_sizes: Sequence[int] | str = PADIS_PATCH_SIZES,
        real_p: float = 0.5,
        small_weights: Sequence[float] | None = None,
        multipliers: Mapping[int, int] | None = None,
        batch_multipliers: str | None = None,
        pad_value: float = 0.0,
    ) -> PatchTraining:
        """From config values: ``patch_sizes`` a list or ``"patch_diffusion"`` ((R//4, R//2, R), the largest patch
        the whole padded canvas); ``multipliers`` an explicit {size: m} or None for the table ``batch_multipliers``
        (``"padis"`` | ``"patch_diffusion"``; None: ``"patch_diffusion"`` for ``patch_sizes="patch_diffusion"``,
        else ``"padis"``). With ``"patch_diffusion"`` sizes the table is divided by the full canvas's entry, as
        Patch-Diffusion does (e.g. 8/2/1 for R = 256). ``pad_value``: the model-unit pad (:func:`data_zero`)."""
        convention = PositionalConvention(int(image_size), int(pad_width), normalization)
        whole_canvas = isinstance(patch_sizes, str)
        if whole_canvas:
            if patch_sizes != "patch_diffusion":
                raise ValueError(f"patch_sizes must be a list of ints or 'patch_diffusion', got {patch_sizes!r}")
            sizes = list(patch_diffusion_sizes(convention))
        else:
            sizes = [int(s) for s in patch_sizes]
        probs = patch_size_probabilities(real_p, sizes, small_weights)
        if multipliers is not None:
            mult = {int(k): int(v) for k, v in multipliers.items()}
        else:
            table = batch_multipliers or ("patch_diffusion" if whole_canvas else "padis")
            mult = _table_multipliers(sizes, table)
            if whole_canvas:  # relative to the full canvas, which gets 1
                mult = {s: max(1, mult[s] // mult[sizes[-1]]) for s in sizes}
        return cls(convention, probs, mult, pad_value)

    @property
    def counted_images_factor(self) -> float:
        """PaDIS's ``batch_mul_avg``: sum_P p(P) m(P) / m(P_max), the images an EMA / lr ramp-up step counts per
        loader image (1.9 for {16: 0.2, 32: 0.3, 64: 0.5} with m 64/32/16: relative multipliers 4/2/1)."""
        largest = max(self.probabilities)
        return sum(p * self.multipliers[s] / self.multipliers[largest] for s, p in self.probabilities.items())

    def cut(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
        """(patches (B m, C, P, P), pos (B m, 2, P, P), P) from (B, C, N, N) ``images``; all draws from ``generator``.
        Patches k m .. k m + m - 1 come from image k; each image is padded once (with ``pad_value``), not m times."""
        size = draw_patch_size(self.probabilities, generator)
        m, b = self.multipliers[size], images.shape[0]
        n_pos = self.convention.padded_size - size + 1
        top = torch.randint(0, n_pos, (b * m,), generator=generator, device=generator.device).cpu()
        left = torch.randint(0, n_pos, (b * m,), generator=generator, device=generator.device).cpu()
        source = torch.arange(b).repeat_interleave(m)
        patches = cut_patches(pad_images(images, self.convention, self.pad_value), top, left, size, source)
        pos = positional_channels(self.convention, top, left, size, b * m, images.dtype, images.device)
        return patches, pos, size

