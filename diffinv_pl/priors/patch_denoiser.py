"""Whole-image prior assembled from a patch denoiser (PaDIS ``denoisedFromPatches``, methods.md §0.5, §3.3).

Given a patch denoiser ``D_patch(x, sigma, pos=...)`` trained on P x P patches of N x N images padded by M with the
data-unit zero (model units: ``pad_value``, :func:`~diffinv_pl.priors.patches.data_zero`) and a
:class:`PositionalConvention` (canvas side R = N + 2M):

State (``canvas_state=True``, default, as PaDIS trains and samples): the solver's iterate is the whole padded canvas,
``state_shape((C, N, N)) = (C, R, R)``; ``encode`` pads an image with ``pad_value``, ``decode`` crops the centre
N x N, ``initial_state`` draws noise over the whole canvas, so the border carries the sampler's noise (the network was
trained with noise over the pad too). ``canvas_state=False`` (the former behaviour): the state is the N x N image and
every call pads it with ``pad_value`` (no noise in the border).

One call ``D(x, sigma)`` on a (B, C, R, R) canvas:

1. draws one shift (a, b) per image uniformly from {0, ..., M-1}^2 (a = b = 0 when M = 0) from the ``generator`` the
   solver passes (one per image, or one for the batch): a new shift at every call removes seams on average, and an
   image's shifts depend only on its own generator, so it gets the same result in any batch, on any rank and after
   a resume;
2. tiles the canvas with a non-overlapping grid of n x n patches with top-left corners (a + iP, b + jP), i, j in
   0..n-1, n = ceil((N + M) / P), which covers the image region [M, M + N) for every shift (a + nP >= M + N); where
   the grid runs past the canvas, it is extended with ``pad_value`` and the positional coordinates (normalised by
   the padded canvas side R - 1, channel 0 = column x, channel 1 = row y) continue linearly;
3. denoises all B n^2 patches (with their positional channels) in one network call (or chunks of
   ``max_patches_per_call``);
4. writes each denoised patch back (no overlap); D = x where no patch covers a pixel, then D = ``pad_value`` outside
   the centre (the pad is known). Because the grid always covers the centre, D is exactly: the assembled patches on
   the centre and ``pad_value`` on the border.

With PaDIS's inference setting N = 256, M = 24, P = 56 this is the 5 x 5 = 25-patch grid of the paper's code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import broadcast_sigma
from diffinv_pl.errors import UserError
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.patches import PositionalConvention, pad_images
from diffinv_pl.utils.random import GeneratorLike


class PatchAssembledPrior(nn.Module, Prior):
    """Whole-image prior from a patch denoiser; its state is the padded canvas by default (module docstring).

    Args:
        patch_denoiser: called as ``patch_denoiser(patches, sigma, pos=pos)`` with patches (K, C, P, P), sigma (K,)
            and pos (K, 2, P, P); typically an EDM-preconditioned patch network.
        convention: the positional convention the patch network was trained with (from its checkpoint).
        patch_size: P, the side of the inference patches.
        max_patches_per_call: split the network evaluation into chunks of at most this many patches (None: one call).
        data_range: the image range the patch network was trained on (its noise levels are in these units).
        image_channels: C, checked against the operator's input shape when known.
        sigma_range: the noise levels the denoiser is meant for.
        per_sample_calls: denoise each image's patches in a network call of their own, so that an image's result is
            bitwise the same in any batch and on any rank (batched convolutions otherwise sum in another order); slower.
        pad_value: the pad, in the network's units: the image of the data-unit zero (-1 for [0, 1] data trained in
            [-1, 1]; :func:`~diffinv_pl.priors.patches.data_zero`).
        canvas_state: True (PaDIS): the solver state is the (C, R, R) canvas; False: the (C, N, N) image.
    """

    def __init__(
        self,
        patch_denoiser: nn.Module,
        convention: PositionalConvention,
        patch_size: int,
        max_patches_per_call: int | None = None,
        data_range: tuple[float, float] | None = None,
        image_channels: int | None = None,
        sigma_range: tuple[float, float] = (0.0, math.inf),
        per_sample_calls: bool = False,
        pad_value: float = 0.0,
        canvas_state: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if max_patches_per_call is not None and max_patches_per_call < 1:
            raise ValueError(f"max_patches_per_call must be >= 1 or None, got {max_patches_per_call}")
        if not math.isfinite(float(pad_value)):
            raise UserError(f"pad_value must be finite (the model-unit image of the data-unit zero), got {pad_value}")
        self.patch_denoiser = patch_denoiser
        self.convention = convention
        self.patch_size = patch_size
        self.max_patches_per_call = max_patches_per_call
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.image_channels = image_channels
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.per_sample_calls = per_sample_calls
        self.pad_value = float(pad_value)
        self.canvas_state = bool(canvas_state)

    @property
    def patches_per_side(self) -> int:
        c = self.convention
        return math.ceil((c.image_size + c.pad_width) / self.patch_size)

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        n = self.convention.image_size
        channels_ok = self.image_channels is None or data_shape[0] == self.image_channels
        if len(data_shape) != 3 or tuple(data_shape[1:]) != (n, n) or not channels_ok:
            want = f"({self.image_channels if self.image_channels is not None else 'C'}, {n}, {n})"
            raise ValueError(
                f"this patch prior was trained on {want} images (its checkpoint's positional convention), but the "
                f"operator takes {tuple(data_shape)}: set operator.image_size/channels and the data size to match"
            )

    # ------------------------------------------------------------------------------------------------------------
    # state space: the padded canvas (canvas_state) or the image

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, N + 2M, N + 2M) for (C, N, N) data with ``canvas_state``, else ``data_shape``."""
        if not self.canvas_state:
            return tuple(data_shape)
        r = self.convention.padded_size
        return (*tuple(data_shape)[:-2], r, r)

    def encode(self, x: Tensor) -> Tensor:
        """(..., C, N, N) image -> (..., C, R, R) canvas padded with ``pad_value`` (identity without canvas_state)."""
        if not self.canvas_state:
            return x
        if x.ndim < 3:
            raise ValueError(f"expected (..., C, N, N) images to encode, got shape {tuple(x.shape)}")
        canvas = pad_images(x.reshape(-1, *x.shape[-3:]), self.convention, self.pad_value)
        return canvas.reshape(*x.shape[:-2], *canvas.shape[-2:])

    def decode(self, z: Tensor) -> Tensor:
        """(..., C, R, R) canvas -> its centre (..., C, N, N) (identity without canvas_state)."""
        if not self.canvas_state:
            return z
        self._check_canvas(z)
        m, n = self.convention.pad_width, self.convention.image_size
        return z[..., m : m + n, m : m + n]

    def _check_canvas(self, z: Tensor) -> None:
        r, n, m = self.convention.padded_size, self.convention.image_size, self.convention.pad_width
        if z.ndim < 3 or tuple(z.shape[-2:]) != (r, r):
            raise UserError(
                f"expected padded-canvas states (..., C, {r}, {r}) (image {n} padded by {m} on every side), got "
                f"{tuple(z.shape)}: map images to the state with prior.encode(x), or build the prior with "
                "canvas_state=False to work on images"
            )

    # ------------------------------------------------------------------------------------------------------------
    # denoiser

    def draw_shifts(self, batch: int, generator: GeneratorLike = None) -> list[tuple[int, int]]:
        """One grid shift (row, column) in [0, M-1]^2 per image: from generator b for image b, or ``batch`` draws
        from one generator (the global RNG when None)."""
        m = self.convention.pad_width
        if m == 0:
            return [(0, 0)] * batch
        if generator is None or isinstance(generator, torch.Generator):
            draws = torch.randint(0, m, (batch, 2), generator=generator, device=getattr(generator, "device", "cpu"))
            return [(int(a), int(b)) for a, b in draws.tolist()]
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} per-sample generators for a batch of {batch} images: need one per image")
        return [tuple(int(v) for v in torch.randint(0, m, (2,), generator=g, device=g.device).tolist()) for g in generators]

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        return self(x, sigma, generator=generator)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        *,
        generator: GeneratorLike = None,
        shift: tuple[int, int] | None = None,
    ) -> Tensor:
        """D(x, sigma) on (B, C, R, R) canvases (``canvas_state``) or (B, C, N, N) images, with shifts drawn from
        ``generator`` (module docstring), or one given ``shift`` for every image."""
        c = self.convention
        n_img, m = c.image_size, c.pad_width
        if self.canvas_state:
            if x.ndim != 4:
                raise UserError(f"expected (B, C, {c.padded_size}, {c.padded_size}) canvases, got {tuple(x.shape)}")
            self._check_canvas(x)
            canvas = x
        else:
            if x.ndim != 4 or x.shape[-2:] != (n_img, n_img):
                raise ValueError(
                    f"expected (B, C, {n_img}, {n_img}) images (the checkpoint's image_size), got {tuple(x.shape)}"
                )
            canvas = pad_images(x, c, self.pad_value)
        b = x.shape[0]
        sigma_b = broadcast_sigma(sigma, x).reshape(-1).expand(b)
        shifts = self.draw_shifts(b, generator) if shift is None else [tuple(shift)] * b
        for a_row, a_col in shifts:
            if not (0 <= a_row <= max(m - 1, 0) and 0 <= a_col <= max(m - 1, 0)):
                raise ValueError(f"shift {(a_row, a_col)} must lie in [0, {max(m - 1, 0)}]")
        centre = self._assembled_centre(canvas, sigma_b, shifts)
        return pad_images(centre, c, self.pad_value) if self.canvas_state else centre

    def _assembled_centre(self, canvas: Tensor, sigma: Tensor, shifts: list[tuple[int, int]]) -> Tensor:
        """The centre N x N of the patch-assembled D on (B, C, R, R) ``canvas`` (steps 2-4 of the module docstring)."""
        c, p, k = self.convention, self.patch_size, self.patches_per_side
        n_img, m, r = c.image_size, c.pad_width, c.padded_size
        b, ch = canvas.shape[:2]
        span = k * p  # grid side, starting at the shift
        size = max(r, max(max(a, c_) for a, c_ in shifts) + span)  # the canvas, extended where the grid runs past it
        ext = torch.nn.functional.pad(canvas, (0, size - r, 0, size - r), value=self.pad_value)
        coords = c.coordinate(torch.arange(size, dtype=torch.float64, device=canvas.device)).to(canvas.dtype)
        grids, positions = [], []
        for i, (a_row, a_col) in enumerate(shifts):
            grids.append(ext[i, :, a_row : a_row + span, a_col : a_col + span])
            ys = coords[a_row : a_row + span].reshape(k, p)  # y varies with the row
            xs = coords[a_col : a_col + span].reshape(k, p)
            pos_y = ys[:, None, :, None].expand(k, k, p, p)
            pos_x = xs[None, :, None, :].expand(k, k, p, p)
            positions.append(torch.stack([pos_x, pos_y], dim=2).reshape(k * k, 2, p, p))
        grid = torch.stack(grids)  # (B, C, span, span)
        patches = grid.reshape(b, ch, k, p, k, p).permute(0, 2, 4, 1, 3, 5).reshape(b * k * k, ch, p, p)
        denoised = self._denoise(patches, sigma.repeat_interleave(k * k), torch.cat(positions))
        out_grid = denoised.reshape(b, k, k, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, span, span)
        # image origin inside image i's grid: (m - a_row, m - a_col); the grid covers the whole centre
        return torch.stack(
            [out_grid[i, :, m - a_row : m - a_row + n_img, m - a_col : m - a_col + n_img] for i, (a_row, a_col) in enumerate(shifts)]
        )

    def _denoise(self, patches: Tensor, sigma: Tensor, pos: Tensor) -> Tensor:
        chunk = self.max_patches_per_call or patches.shape[0]
        if self.per_sample_calls:  # the patches of one image per call (at most max_patches_per_call)
            chunk = min(chunk, self.patches_per_side**2)
        outs = [
            self.patch_denoiser(patches[i : i + chunk], sigma[i : i + chunk], pos=pos[i : i + chunk])
            for i in range(0, patches.shape[0], chunk)
        ]
        return torch.cat(outs)
