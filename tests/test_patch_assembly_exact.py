"""Acceptance (issue 12): the patch-assembled denoiser is exact for a prior whose patches are independent.

The analytic prior lives on the padded canvas (side R = N + 2M): the pad pixels are known (the data-unit zero, here
-1 in model units: variance 0), the image pixels are Gaussian with mean mu(row, col) and a block-diagonal covariance
whose P x P blocks sit on the canvas grid {iP} x {jP}, each block K scaled by a position-dependent standard deviation
s(block) (pad pixels masked to 0). Its exact denoiser is D(x) = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu). The
"patch network" receives a patch and its positional channels only, recovers the canvas indices from the positions
(x = (j / (R - 1) - 0.5) 2, channel 0 = column) and returns the exact Gaussian denoiser of that block. For grids
aligned with the blocks (shift 0 or a multiple of P) the assembled whole-image denoiser must equal the exact one to
float64 round-off; a misaligned shift must not (so the test can fail).
"""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.checkpoints import DiffusionPrior
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior, RangeAdaptedStatePrior
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
from diffinv_pl.priors.patches import PositionalConvention

N, M, P = 16, 6, 4  # canvas 28 = 7 blocks of 4; shifts 0 and 4 are aligned with the blocks
PAD = -1.0  # model-unit image of the data-unit zero for [0, 1] data trained in [-1, 1]
CONV = PositionalConvention(N, M)
R = CONV.padded_size
DT = torch.float64


def _kernel() -> torch.Tensor:
    """(P^2, P^2) exponential correlation exp(-|d| / 1.5) between the pixels of one block."""
    r, c = torch.meshgrid(torch.arange(P, dtype=DT), torch.arange(P, dtype=DT), indexing="ij")
    pts = torch.stack([r.reshape(-1), c.reshape(-1)], 1)
    return torch.exp(-torch.cdist(pts, pts) / 1.5)


def _mean(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """mu at canvas indices: a smooth image inside the centre, the pad value outside."""
    inside = (rows >= M) & (rows < M + N) & (cols >= M) & (cols < M + N)
    smooth = 0.4 * torch.sin(rows / 3.0) + 0.3 * torch.cos(cols / 5.0) - 0.1
    return torch.where(inside, smooth, torch.full_like(rows, PAD))


def _block_std(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-pixel standard deviation: s(block) = 0.3 + 0.05 (block row) + 0.08 (block column), 0 in the pad."""
    inside = (rows >= M) & (rows < M + N) & (cols >= M) & (cols < M + N)
    s = 0.3 + 0.05 * torch.div(rows, P, rounding_mode="floor") + 0.08 * torch.div(cols, P, rounding_mode="floor")
    return torch.where(inside, s, torch.zeros_like(s))


def _gaussian_denoise(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact D for x, mu, std of shape (K, d) with Sigma_k = diag(std_k) K diag(std_k) (d = P^2) and sigma (K,)."""
    cov = std[:, :, None] * _kernel() * std[:, None, :]
    eye = torch.eye(cov.shape[-1], dtype=DT)
    gain = cov @ torch.linalg.inv(cov + sigma[:, None, None] ** 2 * eye)
    return mu + (gain @ (x - mu)[..., None])[..., 0]


def patch_network(patches: torch.Tensor, sigma: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The exact per-block denoiser from the patch and its positional channels only."""
    cols = torch.round((pos[:, 0] / 2 + 0.5) * (R - 1))  # (K, P, P) canvas column indices
    rows = torch.round((pos[:, 1] / 2 + 0.5) * (R - 1))
    k = patches.shape[0]
    flat = _gaussian_denoise(
        patches.reshape(k, -1), _mean(rows, cols).reshape(k, -1), _block_std(rows, cols).reshape(k, -1), sigma
    )
    return flat.reshape(patches.shape)


def exact_canvas_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The whole-canvas exact denoiser (one Gaussian over all R^2 pixels, block-diagonal covariance)."""
    idx = torch.arange(R, dtype=DT)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    block = (torch.div(rows, P, rounding_mode="floor") * (R // P) + torch.div(cols, P, rounding_mode="floor"))
    block = block.reshape(-1)
    same_block = block[:, None] == block[None, :]
    # within-block offsets for the kernel: the pixel's position inside its block
    r_in, c_in = (rows % P).reshape(-1), (cols % P).reshape(-1)
    d = torch.sqrt((r_in[:, None] - r_in[None, :]) ** 2 + (c_in[:, None] - c_in[None, :]) ** 2)
    std = _block_std(rows, cols).reshape(-1)
    cov = torch.where(same_block, std[:, None] * torch.exp(-d / 1.5) * std[None, :], torch.zeros_like(d))
    mu = _mean(rows, cols).reshape(-1)
    gain = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(R * R, dtype=DT))
    flat = x.reshape(x.shape[0], -1)
    return (mu + (flat - mu) @ gain.T).reshape(x.shape)


def _prior(canvas_state: bool = True) -> PatchAssembledPrior:
    return PatchAssembledPrior(patch_network, CONV, P, pad_value=PAD, canvas_state=canvas_state)


def _noisy_canvas(batch: int = 2, sigma: float = 0.3, seed: int = 0) -> torch.Tensor:
    """A draw of the prior plus noise over the whole canvas (the border carries noise, as in the sampler)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(R, dtype=DT)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    x0 = _mean(rows, cols) + _block_std(rows, cols) * torch.randn(batch, 1, R, R, generator=g, dtype=DT)
    return x0 + sigma * torch.randn(batch, 1, R, R, generator=g, dtype=DT)


@pytest.mark.parametrize("shift", [(0, 0), (4, 4), (0, 4), (4, 0)])
def test_assembled_denoiser_equals_exact_whole_image_denoiser_for_aligned_grids(shift):
    prior = _prior()
    x = _noisy_canvas()
    exact = exact_canvas_denoiser(x, 0.3)
    assembled = prior(x, 0.3, shift=shift)
    assert assembled.shape == (2, 1, R, R) == tuple(prior.initial_state((2,), (1, N, N), 1.0).shape)
    torch.testing.assert_close(assembled, exact, rtol=0, atol=1e-10)
    # D is the pad value (data-unit zero) outside the centre, exactly
    border = torch.ones(R, R, dtype=torch.bool)
    border[M : M + N, M : M + N] = False
    assert torch.all(assembled[..., border] == PAD)


def test_misaligned_grid_is_not_exact():
    """The check can fail: a grid shifted by 1 cuts across the independent blocks (measured max error 0.23;
    aligned grids: 1e-15)."""
    x = _noisy_canvas()
    err = (_prior()(x, 0.3, shift=(1, 2)) - exact_canvas_denoiser(x, 0.3)).abs().max().item()
    assert err > 1e-2


def test_image_state_mode_is_exact_too():
    """canvas_state=False: the state is the N x N image, padded inside the prior with the known pad (no noise)."""
    prior = _prior(canvas_state=False)
    assert prior.state_shape((1, N, N)) == (1, N, N)
    image = _noisy_canvas()[..., M : M + N, M : M + N]
    canvas = torch.nn.functional.pad(image, (M, M, M, M), value=PAD)
    exact = exact_canvas_denoiser(canvas, 0.3)[..., M : M + N, M : M + N]
    torch.testing.assert_close(prior(image, 0.3, shift=(4, 0)), exact, rtol=0, atol=1e-10)


def test_shift_is_reproducible_from_the_generator():
    prior = _prior()
    x = _noisy_canvas(batch=1)
    outputs, shifts = {}, {}
    for seed in range(8):
        shifts[seed] = prior.draw_shifts(1, torch.Generator().manual_seed(seed))[0]
        outputs[seed] = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(seed))
        again = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(outputs[seed], again)  # same seed: same shift, bitwise the same output
        assert torch.equal(outputs[seed], prior(x, 0.3, shift=shifts[seed]))  # the output is that shift's
        assert all(0 <= v <= M - 1 for v in shifts[seed])
    assert len(set(shifts.values())) >= 4  # different seeds draw different shifts ...
    a, b = next((s, t) for s in shifts for t in shifts if shifts[s] != shifts[t])
    assert not torch.equal(outputs[a], outputs[b])  # ... and different shifts give different outputs


def test_canvas_state_encode_decode_and_pad_value_from_the_data_range():
    """encode pads with the model-unit image of the data-unit zero (air), decode crops the centre; DiffusionPrior
    derives the pad from the data/model ranges ([0, 1] -> [-1, 1]: -1, not the mid-grey 0)."""
    prior = DiffusionPrior(patch_network, 1, CONV, (0.0, 1.0), (-1.0, 1.0), P).whole_image()
    assert prior.pad_value == -1.0 and prior.canvas_state
    assert prior.state_shape((1, N, N)) == (1, R, R)
    image = torch.rand(3, 2, 1, N, N, dtype=DT)  # any leading batch shape
    canvas = prior.encode(image)
    assert canvas.shape == (3, 2, 1, R, R)
    assert torch.equal(prior.decode(canvas), image)
    assert torch.all(canvas[..., :M, :] == -1.0) and torch.all(canvas[..., :, -M:] == -1.0)
    same_range = DiffusionPrior(patch_network, 1, CONV, (0.0, 1.0), (0.0, 1.0), P).whole_image()
    assert same_range.pad_value == 0.0  # official PaDIS: [0, 1] data padded with 0
    with pytest.raises(ValueError, match=r"padded-canvas states .*prior.encode\(x\).*canvas_state=False"):
        prior(torch.zeros(1, 1, N, N, dtype=DT), 0.3)
    # seen on [0, 1] data (what trained_prior gives a solver): the canvas is padded with the data-unit 0 there
    data_prior = RangeAdaptedPrior(prior, (0.0, 1.0), (-1.0, 1.0))
    assert isinstance(data_prior, RangeAdaptedStatePrior) and data_prior.state_shape((1, N, N)) == (1, R, R)
    data_canvas = data_prior.encode(image)
    torch.testing.assert_close(data_canvas, (prior.encode(2 * image - 1) + 1) / 2, rtol=0, atol=1e-15)
    assert torch.all(data_canvas[..., :M, :] == 0.0) and torch.equal(data_prior.decode(data_canvas), image)
    # a whole-image prior keeps the identity encode/decode (solvers' closed-form paths test the class)
    whole = RangeAdaptedPrior(NetworkPrior(torch.nn.Identity(), (-1.0, 1.0)), (0.0, 1.0))
    assert type(whole) is RangeAdaptedPrior and type(whole).decode is Prior.decode
