"""Classical baselines on the solver contract: pseudo-inverse / FBP and TV-regularised least squares."""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.data.phantoms import random_ellipses_phantom
from diffinv_pl.operators import build_operator
from diffinv_pl.solvers import InverseProblem, get_solver, pseudo_inverse, tv_least_squares
from diffinv_pl.solvers.classical import _div, _grad

F64 = torch.float64


def _psnr(a, b):
    return (-10 * torch.log10(((a.clamp(0, 1) - b) ** 2).mean((1, 2, 3)))).min().item()


def test_tv_beats_fbp_on_sparse_view_ct():
    op = build_operator("ct_parallel", image_size=64, num_views=20, num_detectors=96)
    x = torch.stack([random_ellipses_phantom(i, 0, size=64) for i in range(2)])
    y = op.measure(x, 0.01, torch.Generator().manual_seed(0))
    problem = InverseProblem(y, op, 0.01)
    fbp = pseudo_inverse(problem, None)
    tv = tv_least_squares(problem, None, lam=0.01, num_iterations=300)
    assert torch.allclose(fbp.samples, op.pinv(y))
    assert _psnr(tv.samples, x) > _psnr(fbp.samples, x) + 10  # measured: ~32-37 dB vs ~17 dB
    assert tv.cost.operator_adjoint_calls == 300 and tv.cost.denoiser_calls == 0


def test_gradient_and_divergence_are_negative_adjoints():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g, dtype=F64)
    q = torch.randn(2, 3, 2, 7, 9, generator=g, dtype=F64)
    assert torch.allclose((_grad(x) * q).sum(), -(x * _div(q)).sum(), rtol=1e-12)


def test_tv_without_regularisation_solves_least_squares_and_respects_the_box():
    op = build_operator("inpainting_random", image_size=16, channels=1, input_range=(0.0, 1.0)).to(F64)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = op(x)
    out = tv_least_squares(InverseProblem(y, op, 0.0), None, lam=0.0, num_iterations=500).samples
    assert torch.allclose(op(out), y, atol=1e-4)  # the observed pixels are fitted
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_baselines_refuse_nonlinear_operators_and_are_registered():
    op = build_operator("phase_retrieval", image_size=8)
    problem = InverseProblem(op(torch.rand(1, 3, 8, 8)), op, 0.0)
    with pytest.raises(TypeError, match="needs a linear operator"):
        pseudo_inverse(problem, None)
    with pytest.raises(ValueError, match="lam >= 0"):
        tv_least_squares(InverseProblem(torch.zeros(1, 3, 8, 8), build_operator("identity", image_size=8), 0.0),
                         None, lam=-1.0)
    assert get_solver("pinv") is pseudo_inverse and get_solver("tv") is tv_least_squares


def test_bicubic_upsampling_equals_torch_bicubic_and_beats_nothing_on_smooth_images():
    from diffinv_pl.solvers.classical import bicubic_upsampling

    op = build_operator("sr_bicubic", factor=4, channels=1, image_size=32, input_range=(0.0, 1.0))
    u = torch.linspace(0, 1, 32, dtype=torch.float64)
    x = (0.5 + 0.4 * torch.sin(3 * u)[:, None] * torch.cos(2 * u)[None, :]).expand(2, 1, 32, 32)
    y = op(x)
    out = bicubic_upsampling(InverseProblem(y, op, 0.0)).samples
    ref = torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.shape == x.shape
    # a smooth image is recovered far better than by the zero-order hold (nearest) up-sampling
    nearest = torch.nn.functional.interpolate(y, scale_factor=4, mode="nearest")
    assert ((out - x) ** 2).mean() < 0.5 * ((nearest - x) ** 2).mean()


def test_bicubic_upsampling_refuses_an_operator_that_does_not_down_sample():
    from diffinv_pl.errors import UserError
    from diffinv_pl.solvers.classical import bicubic_upsampling

    op = build_operator("gaussian_blur_circular", kernel_size=3, std=1.0, channels=1, image_size=8, input_range=(0.0, 1.0))
    with pytest.raises(UserError, match="super-resolution operator"):
        bicubic_upsampling.check_hyperparameters(op)
