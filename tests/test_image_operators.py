"""Operator-specific checks: parity with independent references and the seeds' parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffinv_pl.operators import MatrixOperator, build_operator
from diffinv_pl.operators.image import bicubic_resize_matrix
from diffinv_pl.utils.ranges import SYMMETRIC, UNIT, convert_range

F64 = torch.float64


def _img(c=3, n=64, seed=0):
    return torch.rand(1, c, n, n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def test_bicubic_matches_torch_antialiased_bicubic_away_from_the_border():
    """In the interior the MATLAB-style resizer and torch's antialiased bicubic (a = -0.5) use identical weights."""
    x = _img(n=64)
    ours = build_operator("sr_bicubic", image_size=64).to(F64)(x)
    ref = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-12)
    assert not torch.allclose(ours, ref, atol=1e-6)  # the borders differ: mirrored taps vs renormalised truncation
    pil = np.asarray(Image.fromarray(((x[0, 0] + 1) * 127.5).numpy().astype(np.float32), mode="F").resize((16, 16), Image.BICUBIC))
    assert np.abs(((ours[0, 0] + 1) * 127.5).numpy()[2:-2, 2:-2] - pil[2:-2, 2:-2]).max() < 1e-3
    assert torch.allclose(bicubic_resize_matrix(64, 16).sum(1), torch.ones(16, dtype=F64))


def test_reflect_and_circular_blur_agree_in_the_interior_and_kernel_defaults():
    x = _img(n=96)
    reflect = build_operator("gaussian_blur", image_size=96).to(F64)
    circular = build_operator("gaussian_blur_circular", image_size=96).to(F64)
    assert reflect.kernel.shape[-2:] == (61, 61)
    a, b = reflect(x), circular(x)
    assert torch.allclose(a[..., 31:-31, 31:-31], b[..., 31:-31, 31:-31], atol=1e-12)
    assert circular.norm() == pytest.approx(1.0, rel=1e-6)  # non-negative kernel summing to 1: max |K^| = K^(0) = 1
    assert build_operator("uniform_blur", image_size=32).kernel.shape[-2:] == (17, 17)


def test_motion_blur_per_sample_kernels_are_reproducible():
    op = build_operator("motion_blur", image_size=64)
    k1 = op.sample_params(2, torch.Generator().manual_seed(3))
    k2 = op.sample_params(2, torch.Generator().manual_seed(3))
    assert k1.shape == (2, 61, 61) and torch.equal(k1, k2) and not torch.equal(k1[0], k1[1])
    assert torch.allclose(k1.sum((-2, -1)), torch.ones(2, dtype=k1.dtype))


def test_inpainting_masks_follow_the_settings():
    rand = build_operator("inpainting_random", image_size=128)
    masks = rand.sample_params(4, torch.Generator().manual_seed(0))
    assert masks.shape == (4, 1, 128, 128)
    assert (1 - masks.mean((1, 2, 3))).sub(0.7).abs().max() < 0.02  # 70 % dropped
    ranged = build_operator("inpainting_random", image_size=64, drop_range=(0.3, 0.7))
    fractions = 1 - ranged.sample_params(50, torch.Generator().manual_seed(1)).mean((1, 2, 3))
    assert 0.28 < float(fractions.min()) and float(fractions.max()) < 0.72 and float(fractions.std()) > 0.05
    box = build_operator("inpainting_box", image_size=256)
    for m in box.sample_params(20, torch.Generator().manual_seed(2)):
        holes = (m[0] == 0).nonzero()
        assert len(holes) == 128 * 128
        assert int(holes.min()) >= 16 and int(holes.max()) <= 255 - 16
    with pytest.raises(ValueError, match="does not fit"):
        build_operator("inpainting_box", image_size=128)


def test_phase_retrieval_pads_and_preserves_energy():
    op = build_operator("phase_retrieval", image_size=256)
    assert op.out_shape == (3, 384, 384)  # oversample 2: 64 px per side
    small = build_operator("phase_retrieval", image_size=32).to(F64)
    x = _img(n=32)
    y = small(x)
    assert torch.allclose(y.pow(2).sum(), x.pow(2).sum(), rtol=1e-12)  # orthonormal FFT (Parseval)
    x[..., -1, :] = 0
    x[..., :, -1] = 0
    shifted = torch.roll(x, shifts=(1, 1), dims=(-2, -1))  # a translation inside the zero padding
    assert torch.allclose(small(shifted), small(x), atol=1e-10)  # the magnitude forgets translations
    assert not torch.allclose(small(2 * x), small(x))


def test_hdr_and_range_conversion():
    op = build_operator("hdr", image_size=8)
    x = torch.tensor([-0.8, -0.2, 0.3, 0.6]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    x = F.pad(x, (0, 6, 0, 6))
    y = op(x)
    assert torch.allclose(y[0, 0, :2, :2].flatten(), torch.tensor([-1.0, -0.4, 0.6, 1.0]))
    u = torch.linspace(0, 1, 5)
    assert torch.allclose(convert_range(u, UNIT, SYMMETRIC), 2 * u - 1)
    assert torch.allclose(convert_range(convert_range(u, UNIT, SYMMETRIC), SYMMETRIC, UNIT), u)
    with pytest.raises(ValueError):
        convert_range(u, (1.0, 0.0), UNIT)


def test_registry_errors_and_bad_inputs():
    with pytest.raises(ValueError, match="valid operators: .*gaussian_blur"):
        build_operator("gausian_blur")
    with pytest.raises(ValueError, match="unknown boundary"):
        build_operator("gaussian_blur", boundary="zero")
    with pytest.raises(ValueError, match="odd-sized and not larger"):
        build_operator("gaussian_blur", image_size=32)  # 61x61 kernel on a 32 px image
    with pytest.raises(ValueError, match="multiple of the factor"):
        build_operator("sr_bicubic", image_size=30)
    op = build_operator("gaussian_blur", kernel_size=5, image_size=16)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        op(torch.zeros(1, 3, 16, 17))
    with pytest.raises(TypeError, match="no exact"):
        MatrixOperator(torch.eye(2)).gram_inverse(torch.zeros(2), 0.1, 1.0)


def test_parameters_fixed_per_sample_key_do_not_depend_on_the_batch():
    from diffinv_pl.utils.seeding import params_for_keys

    op = build_operator("inpainting_random", image_size=16)
    batch = params_for_keys(op, ["img_003", "img_001", "img_002"], seed=5)
    alone = params_for_keys(op, ["img_001"], seed=5)
    assert torch.equal(batch[1], alone[0]) and not torch.equal(batch[0], batch[1])
    assert not torch.equal(params_for_keys(op, ["img_001"], seed=5, run=1), alone)
    with pytest.raises(TypeError, match="no random parameters"):
        params_for_keys(build_operator("identity", image_size=8), ["a"], seed=0)


def test_reflect_blur_equals_conv2d_on_the_reflection_padded_image():
    """Independent reference for the FFT implementation: torch conv2d (correlation) after reflection padding."""
    for name, kwargs in (("gaussian_blur", dict(kernel_size=9, std=2.0)), ("motion_blur", dict(kernel_size=9))):
        op = build_operator(name, image_size=24, **kwargs).to(F64)
        kernels = op.sample_params(2, torch.Generator().manual_seed(0)) if name == "motion_blur" else op.kernel.expand(2, -1, -1)
        if name == "motion_blur":
            op.set_params(kernels)
        x = _img(n=24)[:, :, :, :].expand(2, 3, 24, 24).contiguous()
        ref = torch.stack(
            [F.conv2d(F.pad(x[b : b + 1], (4, 4, 4, 4), mode="reflect"), kernels[b].expand(3, 1, 9, 9), groups=3)[0] for b in range(2)]
        )
        assert torch.allclose(op(x), ref, atol=1e-12)


def test_cached_kernel_spectra_follow_kernel_changes():
    op = build_operator("motion_blur", kernel_size=7, image_size=16).to(F64)
    x = _img(n=16)
    first = op(x)
    op.set_params(op.sample_params(1, torch.Generator().manual_seed(9)))
    assert not torch.allclose(op(x), first)
    op.kernel.copy_(torch.flip(op.kernel, (-1,)))  # an in-place update (e.g. load_state_dict)
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), op.kernel[0].expand(3, 1, 7, 7), groups=3)
    assert torch.allclose(op(x), ref, atol=1e-12)
