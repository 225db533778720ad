"""Whole-image prior assembled from a patch denoiser (PaDIS ``denoisedFromPatches``, methods.md §3.3).

Given a patch denoiser ``D_patch(x, sigma, pos=...)`` trained on P x P patches of zero-padded N x N images with a
:class:`PositionalConvention` (pad M, canvas side R = N + 2M), one call ``D(x, sigma)`` on (B, C, N, N) images:

1. zero-pads x by M on every side (the canvas) and draws one shift (a, b) per image uniformly from {0, ..., M-1}^2
   (a = b = 0 when M = 0) from the ``generator`` the solver passes (one per image, or one for the batch): a new
   shift at every call removes seams on average, and an image's shifts depend only on its own generator, so it gets
   the same result in any batch, on any rank and after a resume;
2. tiles each canvas with a non-overlapping grid of n x n patches with top-left corners (a + iP, b + jP), i, j in
   0..n-1, n = ceil((N + M) / P), which covers the image region [M, M + N) for every shift; where the grid runs past
   the canvas, the canvas is extended with zeros and the positional coordinates continue linearly;
3. denoises all B n^2 patches (with their positional channels, cut from the canvas-wide coordinate map) in one
   network call (or in chunks of ``max_patches_per_call``);
4. writes each denoised patch back (no overlap) and returns the central N x N region.

With PaDIS's inference setting N = 256, M = 24, P = 56 this is the 5 x 5 = 25-patch grid of the paper's code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import broadcast_sigma
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.patches import PositionalConvention
from diffinv_pl.utils.random import GeneratorLike


class PatchAssembledPrior(nn.Module, Prior):
    """Whole-image prior on (B, C, N, N) images from a patch denoiser (module docstring).

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
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if max_patches_per_call is not None and max_patches_per_call < 1:
            raise ValueError(f"max_patches_per_call must be >= 1 or None, got {max_patches_per_call}")
        self.patch_denoiser = patch_denoiser
        self.convention = convention
        self.patch_size = patch_size
        self.max_patches_per_call = max_patches_per_call
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.image_channels = image_channels
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.per_sample_calls = per_sample_calls

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
        """D(x, sigma) with shifts drawn from ``generator`` (module docstring), or one given ``shift`` for every image."""
        c = self.convention
        n_img, m, p = c.image_size, c.pad_width, self.patch_size
        if x.ndim != 4 or x.shape[-2:] != (n_img, n_img):
            raise ValueError(
                f"expected (B, C, {n_img}, {n_img}) images (the checkpoint's image_size), got {tuple(x.shape)}"
            )
        b, ch = x.shape[:2]
        sigma_b = broadcast_sigma(sigma, x).reshape(-1).expand(b)
        shifts = self.draw_shifts(b, generator) if shift is None else [tuple(shift)] * b
        for a_row, a_col in shifts:
            if not (0 <= a_row <= max(m - 1, 0) and 0 <= a_col <= max(m - 1, 0)):
                raise ValueError(f"shift {(a_row, a_col)} must lie in [0, {max(m - 1, 0)}]")
        k = self.patches_per_side
        span = k * p  # grid side, starting at the shift
        # canvas: image at [m, m + n_img); each image's grid covers [a, a + span) on each axis
        size = max(max(a, c_) for a, c_ in shifts) + span
        canvas = x.new_zeros(b, ch, size, size)
        canvas[..., m : m + n_img, m : m + n_img] = x
        coords = c.coordinate(torch.arange(size, dtype=torch.float64, device=x.device)).to(x.dtype)
        grids, positions = [], []
        for i, (a_row, a_col) in enumerate(shifts):
            grids.append(canvas[i, :, a_row : a_row + span, a_col : a_col + span])
            ys = coords[a_row : a_row + span].reshape(k, p)  # y varies with the row
            xs = coords[a_col : a_col + span].reshape(k, p)
            pos_y = ys[:, None, :, None].expand(k, k, p, p)
            pos_x = xs[None, :, None, :].expand(k, k, p, p)
            positions.append(torch.stack([pos_x, pos_y], dim=2).reshape(k * k, 2, p, p))
        grid = torch.stack(grids)  # (B, C, span, span)
        patches = grid.reshape(b, ch, k, p, k, p).permute(0, 2, 4, 1, 3, 5).reshape(b * k * k, ch, p, p)
        pos = torch.cat(positions)
        sig = sigma_b.repeat_interleave(k * k)
        denoised = self._denoise(patches, sig, pos)
        out_grid = denoised.reshape(b, k, k, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, span, span)
        # image origin inside image i's grid: (m - a_row, m - a_col)
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
