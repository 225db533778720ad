"""Whole-image denoiser assembled from a patch denoiser (PaDIS ``denoisedFromPatches``, methods.md §3.3).

Given a patch denoiser ``D_patch(x, sigma, pos=...)`` trained on P x P patches of zero-padded N x N images with a
:class:`PositionalConvention` (pad M, canvas side R = N + 2M), one call ``D(x, sigma)`` on (B, C, N, N) images:

1. zero-pads x by M on every side (the canvas) and draws one shift (a, b) uniformly from {0, ..., M-1}^2 (a = b = 0
   when M = 0) from the generator: a new shift at every call removes seams on average;
2. tiles the canvas with a non-overlapping grid of n x n patches with top-left corners (a + iP, b + jP), i, j in
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
from diffinv_pl.priors.patches import PositionalConvention


class PatchAssembledDenoiser(nn.Module):
    """D(x, sigma) on whole (B, C, N, N) images from a patch denoiser (module docstring).

    Args:
        patch_denoiser: called as ``patch_denoiser(patches, sigma, pos=pos)`` with patches (K, C, P, P), sigma (K,)
            and pos (K, 2, P, P); typically an EDM-preconditioned patch network.
        convention: the positional convention the patch network was trained with (from its checkpoint).
        patch_size: P, the side of the inference patches.
        generator: source of the random shifts (one draw per call); a CPU ``torch.Generator``.
        max_patches_per_call: split the network evaluation into chunks of at most this many patches (None: one call).
    """

    def __init__(
        self,
        patch_denoiser: nn.Module,
        convention: PositionalConvention,
        patch_size: int,
        generator: torch.Generator | None = None,
        max_patches_per_call: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if max_patches_per_call is not None and max_patches_per_call < 1:
            raise ValueError(f"max_patches_per_call must be >= 1 or None, got {max_patches_per_call}")
        self.patch_denoiser = patch_denoiser
        self.convention = convention
        self.patch_size = patch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_patches_per_call = max_patches_per_call

    @property
    def patches_per_side(self) -> int:
        c = self.convention
        return math.ceil((c.canvas_size + c.pad_width) / self.patch_size)

    def draw_shift(self) -> tuple[int, int]:
        m = self.convention.pad_width
        if m == 0:
            return 0, 0
        a, b = torch.randint(0, m, (2,), generator=self.generator).tolist()
        return int(a), int(b)

    def forward(self, x: Tensor, sigma: Tensor | float, shift: tuple[int, int] | None = None) -> Tensor:
        c = self.convention
        n_img, m, p = c.canvas_size, c.pad_width, self.patch_size
        if x.ndim != 4 or x.shape[-2:] != (n_img, n_img):
            raise ValueError(
                f"expected (B, C, {n_img}, {n_img}) images (the checkpoint's canvas_size), got {tuple(x.shape)}"
            )
        b, ch = x.shape[:2]
        sigma_b = broadcast_sigma(sigma, x).reshape(-1).expand(b)
        a_row, a_col = self.draw_shift() if shift is None else shift
        if not (0 <= a_row <= max(m - 1, 0) and 0 <= a_col <= max(m - 1, 0)):
            raise ValueError(f"shift {(a_row, a_col)} must lie in [0, {max(m - 1, 0)}]")
        k = self.patches_per_side
        span = k * p  # grid side, starting at the shift
        # canvas: image at [m, m + n_img); the grid covers [a, a + span) on each axis
        size = max(a_row, a_col) + span
        canvas = x.new_zeros(b, ch, size, size)
        canvas[..., m : m + n_img, m : m + n_img] = x
        coords = c.coordinate(torch.arange(size, dtype=torch.float64, device=x.device)).to(x.dtype)
        rows = canvas[..., a_row : a_row + span, :]
        grid = rows[..., :, a_col : a_col + span]  # (B, C, span, span)
        patches = grid.reshape(b, ch, k, p, k, p).permute(0, 2, 4, 1, 3, 5).reshape(b * k * k, ch, p, p)
        ys = coords[a_row : a_row + span].reshape(k, p)  # y varies with the row
        xs = coords[a_col : a_col + span].reshape(k, p)
        pos_y = ys[:, None, :, None].expand(k, k, p, p)
        pos_x = xs[None, :, None, :].expand(k, k, p, p)
        pos = torch.stack([pos_x, pos_y], dim=2).reshape(1, k * k, 2, p, p).expand(b, -1, -1, -1, -1)
        pos = pos.reshape(b * k * k, 2, p, p)
        sig = sigma_b.repeat_interleave(k * k)
        denoised = self._denoise(patches, sig, pos)
        out_grid = denoised.reshape(b, k, k, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, span, span)
        top, left = m - a_row, m - a_col  # image origin inside the grid
        return out_grid[..., top : top + n_img, left : left + n_img]

    def _denoise(self, patches: Tensor, sigma: Tensor, pos: Tensor) -> Tensor:
        chunk = self.max_patches_per_call or patches.shape[0]
        outs = [
            self.patch_denoiser(patches[i : i + chunk], sigma[i : i + chunk], pos=pos[i : i + chunk])
            for i in range(0, patches.shape[0], chunk)
        ]
        return torch.cat(outs)
