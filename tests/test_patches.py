"""Patch sampling and positional channels (diffinv_pl/priors/patches.py)."""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.errors import UserError
from diffinv_pl.priors.patches import (
    PatchTraining,
    PositionalConvention,
    batch_multipliers,
    canvas_positional_channels,
    check_probabilities,
    data_zero,
    draw_patch_size,
    patch_diffusion_sizes,
    patch_size_probabilities,
    positional_channels,
    sample_patches,
)


def _canvas_grid(n: int, m: int, normalization: str = "canvas") -> torch.Tensor:
    """(2, R, R) reference coordinates built independently with a Python loop (x from the column, y from the row)."""
    r = n + 2 * m
    grid = torch.empty(2, r, r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            if normalization == "canvas":
                grid[0, i, j] = 2.0 * j / (r - 1) - 1.0
                grid[1, i, j] = 2.0 * i / (r - 1) - 1.0
            else:
                grid[0, i, j] = 2.0 * (j - m) / (n - 1) - 1.0
                grid[1, i, j] = 2.0 * (i - m) / (n - 1) - 1.0
    return grid


def _images(b=5, c=2, n=12, seed=0):
    return torch.rand(b, c, n, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("normalization", ["canvas", "image"])
@pytest.mark.parametrize("patch_size", [1, 4, 7, 20])
def test_patch_and_positions_match_canvas(normalization, patch_size):
    n, m = 12, 4
    conv = PositionalConvention(image_size=n, pad_width=m, normalization=normalization)
    images = _images(n=n)
    padded = torch.zeros(5, 2, n + 2 * m, n + 2 * m)
    padded[:, :, m : m + n, m : m + n] = images
    grid = _canvas_grid(n, m, normalization)
    patches, pos, (top, left) = sample_patches(images, conv, patch_size, torch.Generator().manual_seed(3))
    assert patches.shape == (5, 2, patch_size, patch_size) and pos.shape == (5, 2, patch_size, patch_size)
    assert pos.dtype == images.dtype
    for b in range(5):
        t, lft = int(top[b]), int(left[b])
        assert 0 <= t <= n + 2 * m - patch_size and 0 <= lft <= n + 2 * m - patch_size
        assert torch.equal(patches[b], padded[b, :, t : t + patch_size, lft : lft + patch_size])
        ref = grid[:, t : t + patch_size, lft : lft + patch_size].to(torch.float32)
        torch.testing.assert_close(pos[b], ref, rtol=0, atol=1e-6)


def test_canvas_endpoints_and_axes():
    conv = PositionalConvention(image_size=8, pad_width=3)
    g = canvas_positional_channels(conv, dtype=torch.float64)
    assert g.shape == (2, 14, 14)
    # centre of the first padded pixel -> -1, of the last -> +1; x varies along the width, y along the height
    assert g[0, 5, 0] == -1.0 and g[0, 5, -1] == 1.0 and g[1, 0, 5] == -1.0 and g[1, -1, 5] == 1.0
    assert torch.all(g[0] == g[0, :1]) and torch.all(g[1] == g[1, :, :1])
    img = canvas_positional_channels(PositionalConvention(8, 3, "image"), dtype=torch.float64)
    assert img[0, 0, 3] == -1.0 and img[0, 0, 10] == 1.0 and img[0, 0, 0] < -1.0


def test_positional_channels_int_and_tensor_positions():
    conv = PositionalConvention(image_size=10, pad_width=2)
    a = positional_channels(conv, 3, 5, 4, batch=2)
    b = positional_channels(conv, torch.tensor([3, 3]), torch.tensor([5, 5]), 4)
    assert a.shape == (2, 2, 4, 4) and torch.equal(a, b)
    with pytest.raises(ValueError, match="batch"):
        positional_channels(conv, 3, 5, 4)
    with pytest.raises(ValueError, match="positions"):
        positional_channels(conv, 11, 0, 4, batch=1)


def test_determinism_with_same_generator():
    conv = PositionalConvention(image_size=12, pad_width=4)
    images = _images()
    a = sample_patches(images, conv, 6, torch.Generator().manual_seed(11))
    b = sample_patches(images, conv, 6, torch.Generator().manual_seed(11))
    c = sample_patches(images, conv, 6, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2][0], b[2][0]) and torch.equal(a[2][1], b[2][1])
    assert not (torch.equal(a[2][0], c[2][0]) and torch.equal(a[2][1], c[2][1]))


def test_positions_cover_the_padded_canvas_uniformly():
    conv = PositionalConvention(image_size=4, pad_width=1)  # R = 6, p = 3 -> 4 positions per axis
    images = torch.zeros(4000, 1, 4, 4)
    _, _, (top, left) = sample_patches(images, conv, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(top * 4 + left, minlength=16).double()
    assert counts.min() > 0 and int(top.max()) == 3 and int(left.max()) == 3
    assert torch.allclose(counts / counts.sum(), torch.full((16,), 1 / 16, dtype=torch.float64), atol=0.025)


def test_full_padded_image_variant():
    conv = PositionalConvention(image_size=16, pad_width=4)
    sizes = patch_diffusion_sizes(conv)
    assert sizes == (6, 12, 24)
    images = _images(b=3, c=1, n=16)
    patches, pos, (top, left) = sample_patches(images, conv, sizes[-1], torch.Generator().manual_seed(0))
    assert torch.all(top == 0) and torch.all(left == 0)
    assert torch.equal(patches, torch.nn.functional.pad(images, (4, 4, 4, 4)))
    torch.testing.assert_close(pos[0], _canvas_grid(16, 4).float(), rtol=0, atol=1e-6)


def test_errors():
    conv = PositionalConvention(image_size=12, pad_width=4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="larger than the padded canvas"):
        sample_patches(_images(), conv, 21, g)
    with pytest.raises(ValueError, match="image_size is 12"):
        sample_patches(_images(n=10), conv, 4, g)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sample_patches(torch.zeros(1, 12, 12), conv, 4, g)
    with pytest.raises(ValueError):
        PositionalConvention(image_size=12, pad_width=-1)
    with pytest.raises(ValueError, match="normalization"):
        PositionalConvention(image_size=12, pad_width=1, normalization="pixels")


def test_probabilities_follow_real_p():
    p = patch_size_probabilities(0.5)
    assert p == pytest.approx({16: 0.2, 32: 0.3, 64: 0.5})
    assert list(p) == [16, 32, 64]
    for real_p in (0.0, 0.3, 0.9, 1.0):
        q = patch_size_probabilities(real_p, (64, 16, 32))
        assert sum(q.values()) == pytest.approx(1.0)
        assert q[64] == pytest.approx(real_p)
        assert q[16] == pytest.approx(0.4 * (1 - real_p)) and q[32] == pytest.approx(0.6 * (1 - real_p))
    assert patch_size_probabilities(0.5, (16, 32, 56)) == pytest.approx({16: 0.2, 32: 0.3, 56: 0.5})  # LION P=56
    assert patch_size_probabilities(0.7, (8, 16)) == pytest.approx({8: 0.3, 16: 0.7})  # LION P=16
    assert patch_size_probabilities(1.0, (8,)) == {8: 1.0}
    four = patch_size_probabilities(0.4, (8, 16, 32, 64), small_weights=(1, 1, 1))
    assert sum(four.values()) == pytest.approx(1.0) and four[8] == pytest.approx(0.2)


def test_bad_probabilities():
    with pytest.raises(ValueError, match="real_p"):
        patch_size_probabilities(1.5)
    with pytest.raises(ValueError, match="small_weights"):
        patch_size_probabilities(0.5, (8, 16, 32, 64))
    with pytest.raises(ValueError, match="small_weights"):
        patch_size_probabilities(0.5, (16, 32, 64), small_weights=(1.0,))
    with pytest.raises(ValueError, match="distinct"):
        patch_size_probabilities(0.5, (16, 16, 64))
    with pytest.raises(ValueError, match="real_p must be 1"):
        patch_size_probabilities(0.5, (16,))
    with pytest.raises(ValueError, match="sum to 1"):
        check_probabilities({16: 0.5, 32: 0.4})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_probabilities({16: 1.5, 32: -0.5})


def test_draw_patch_size_frequencies():
    probs = patch_size_probabilities(0.5)
    g = torch.Generator().manual_seed(0)
    draws = [draw_patch_size(probs, g) for _ in range(3000)]
    for s, p in probs.items():
        assert abs(draws.count(s) / len(draws) - p) < 0.04


def test_batch_multipliers():
    assert batch_multipliers() == {16: 64, 32: 32, 64: 16}
    assert batch_multipliers((16, 32, 56)) == {16: 64, 32: 32, 56: 16}
    assert batch_multipliers((8, 1024)) == {8: 64, 1024: 1}
    # PaDIS's table (default) vs Patch-Diffusion's: they differ at 96 (8 vs 4) and above the table (full image)
    padis = batch_multipliers((16, 24, 32, 48, 56, 64, 96, 256))
    assert padis == {16: 64, 24: 32, 32: 32, 48: 16, 56: 16, 64: 16, 96: 8, 256: 1}
    assert batch_multipliers((96, 256), "patch_diffusion") == {96: 4, 256: 2}
    with pytest.raises(UserError, match="unknown batch-multiplier table 'edm'.*padis, patch_diffusion"):
        batch_multipliers((16,), "edm")


def test_patch_training_table_counted_images_and_pad_value():
    """PaDIS's config: m 64/32/16, batch_mul_avg = 0.2 * 4 + 0.3 * 2 + 0.5 * 1 = 1.9; the pad is the data-unit zero."""
    padis = PatchTraining.build(256, 64, pad_value=data_zero((0.0, 1.0), (-1.0, 1.0)))
    assert padis.multipliers == {16: 64, 32: 32, 64: 16}
    assert padis.counted_images_factor == pytest.approx(1.9, abs=1e-12)
    pd = PatchTraining.build(256, 0, patch_sizes=(16, 96), real_p=0.5, batch_multipliers="patch_diffusion")
    assert pd.multipliers == {16: 64, 96: 4} and pd.counted_images_factor == pytest.approx(0.5 * 16 + 0.5)
    assert data_zero((0.0, 1.0), (-1.0, 1.0)) == -1.0 and data_zero(None, None) == 0.0
    images = torch.rand(2, 1, 8, 8) * 2 - 1  # model range [-1, 1]
    small = PatchTraining.build(8, 4, patch_sizes=[16], real_p=1.0, multipliers={16: 1}, pad_value=-1.0)
    patches, _, size = small.cut(images, torch.Generator().manual_seed(0))  # P = R: the whole padded canvas
    assert size == 16 and torch.equal(patches[:, :, 4:12, 4:12], images)
    border = torch.ones(16, 16, dtype=torch.bool)
    border[4:12, 4:12] = False
    assert torch.all(patches[..., border] == -1.0)  # air, not the mid-grey 0


def test_convention_mismatch_names_pad_width():
    train = PositionalConvention(image_size=256, pad_width=64)
    infer = PositionalConvention(image_size=256, pad_width=24)
    with pytest.raises(UserError, match="pad_width: 64 != 24: do this") as e:
        train.assert_compatible(infer, "do this")
    assert "image_size" not in str(e.value)
    with pytest.raises(UserError) as e:
        train.assert_compatible(PositionalConvention(128, 24, "image"), "fix")
    assert all(name in str(e.value) for name in ("image_size", "pad_width", "normalization"))
    train.assert_compatible(PositionalConvention(256, 64), "fix")
    train.assert_compatible(train.to_dict(), "fix")


def test_round_trip_dict():
    conv = PositionalConvention(image_size=256, pad_width=24, normalization="image")
    d = conv.to_dict()
    assert d == {"image_size": 256, "pad_width": 24, "normalization": "image"}
    assert PositionalConvention.from_dict(d) == conv
    assert conv.padded_size == 304
    with pytest.raises(ValueError, match="unknown"):
        PositionalConvention.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="lacks"):
        PositionalConvention.from_dict({"image_size": 256})
