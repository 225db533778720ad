"""Contract tests inherited by every operator of the registry (deepinv style): a new operator only adds its tiny
variant to TINY below and gets adjointness, VJP = adjoint, norm, pinv, Gram inverse, batching, seeding and dtype checks.
"""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.operators import OPERATORS, LinearOperator, build_operator

F64 = torch.float64

# name -> constructor overrides giving a tiny CPU variant of the registered operator
TINY: dict[str, dict] = {
    "identity": dict(channels=2, image_size=8),
    "gaussian_blur": dict(kernel_size=5, std=1.0, channels=2, image_size=12),
    "gaussian_blur_circular": dict(kernel_size=5, std=1.0, channels=2, image_size=12),
    "uniform_blur": dict(kernel_size=3, channels=2, image_size=12),
    "motion_blur": dict(kernel_size=7, channels=2, image_size=12),
    "sr_bicubic": dict(factor=4, channels=2, image_size=16),
    "sr_blur_stride": dict(factor=4, kernel_size=5, channels=2, image_size=16),
    "inpainting_random": dict(channels=2, image_size=12),
    "inpainting_box": dict(box_size=4, margin=2, channels=2, image_size=12),
    "phase_retrieval": dict(channels=2, image_size=8),
    "hdr": dict(channels=2, image_size=8),
    "ct_parallel": dict(image_size=16, num_views=8, num_detectors=24),
    "ct_fan": dict(image_size=16, num_views=8, num_detectors=24),
    "ct_limited_angle": dict(image_size=16, num_views=8, num_detectors=24),
}
# relative adjointness tolerance: float64 operators 1e-6; CT computes in float32 through astra (spec: 1e-5)
ADJOINT_TOL = {"ct_parallel": 1e-5, "ct_fan": 1e-5, "ct_limited_angle": 1e-5}
LINEAR = [n for n in TINY if issubclass(type(build_operator(n, **TINY[n])), LinearOperator)]
# operators whose pseudo-inverse is exact (A pinv(A x) = A x)
EXACT_PINV = ["identity", "gaussian_blur_circular", "sr_bicubic", "sr_blur_stride", "inpainting_random", "inpainting_box"]
# operators with an exact (sigma^2 I + v A A^T)^-1
EXACT_GRAM = ["identity", "gaussian_blur_circular", "sr_bicubic", "sr_blur_stride", "inpainting_random", "inpainting_box"]


def _op(name: str):
    return build_operator(name, **TINY[name]).to(F64)


def _x(op, batch=3, seed=0):
    return torch.randn(batch, *op.in_shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dense(op) -> torch.Tensor:
    n = int(torch.tensor(op.in_shape).prod())
    basis = torch.eye(n, dtype=F64).reshape(n, *op.in_shape)
    return op(basis).reshape(n, -1).T  # (m, n)


def test_every_registered_operator_has_a_tiny_variant():
    missing = sorted(set(OPERATORS) - set(TINY) - {"nonlinear_blur"})  # needs user weights: tests/test_kernels_nonlinear_blur.py
    assert not missing, f"add tiny variants for {missing} so they inherit the contract tests"


@pytest.mark.parametrize("name", LINEAR)
def test_adjointness_and_vjp(name):
    op = _op(name)
    x = _x(op)
    y = torch.randn(3, *op.out_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    lhs, rhs = float((op(x) * y).sum()), float((x * op.adjoint(y)).sum())
    assert abs(lhs - rhs) <= ADJOINT_TOL.get(name, 1e-6) * max(abs(lhs), 1e-12)
    x.requires_grad_(True)
    (vjp,) = torch.autograd.grad(op(x), x, y)
    assert torch.allclose(vjp, op.adjoint(y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LINEAR)
def test_power_method_norm_matches_the_largest_singular_value(name):
    op = _op(name)
    assert op.norm() == pytest.approx(float(torch.linalg.matrix_norm(_dense(op), 2)), rel=1e-5)


@pytest.mark.parametrize("name", EXACT_PINV)
def test_pinv_recovers_range_elements(name):
    op = _op(name)
    y = op(_x(op))
    assert torch.allclose(op(op.pinv(y)), y, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", EXACT_GRAM)
def test_gram_inverse_matches_a_dense_solve(name):
    op = _op(name)
    A = _dense(op)
    y = torch.randn(1, *op.out_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    sigma_y, v = 0.3, 0.7
    expected = torch.linalg.solve(sigma_y**2 * torch.eye(A.shape[0], dtype=F64) + v * A @ A.T, y.reshape(-1))
    assert torch.allclose(op.gram_inverse(y, sigma_y, v).reshape(-1), expected, rtol=1e-8, atol=1e-10)
    # one v per sample (CoDPS with a per-sample noise level): row b uses v_b
    ys = torch.randn(3, *op.out_shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    vs = torch.tensor([0.2, 0.7, 1.5], dtype=F64)
    per_sample = op.gram_inverse(ys, sigma_y, vs)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], op.gram_inverse(ys[b : b + 1], sigma_y, float(vs[b]))[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(TINY))
def test_batched_equals_a_loop_and_dtypes_agree(name):
    op = _op(name)
    x = _x(op, batch=4)
    batched = op(x)
    assert torch.allclose(batched, torch.cat([op(x[i : i + 1]) for i in range(4)]), rtol=1e-12, atol=1e-12)
    single = build_operator(name, **TINY[name])
    assert torch.allclose(single(x.float()).double(), batched, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        op(torch.zeros(2, op.in_shape[0] + 1, *op.in_shape[1:], dtype=F64))


@pytest.mark.parametrize("name", [n for n in TINY if hasattr(build_operator(n, **TINY[n]), "sample_params")])
def test_random_parameters_come_from_the_generator_and_apply_per_sample(name):
    op = _op(name)
    p1 = op.sample_params(3, torch.Generator().manual_seed(7))
    p2 = op.sample_params(3, torch.Generator().manual_seed(7))
    assert torch.equal(p1, p2) and not torch.equal(p1[0], p1[1])
    op.set_params(p1)
    x = _x(op)
    out = op(x)
    for i in range(3):
        single = _op(name)
        single.set_params(p1[i : i + 1])
        assert torch.allclose(out[i], single(x[i : i + 1])[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        op(_x(op, batch=2))  # 3 parameter sets for 2 images


@pytest.mark.parametrize("name", LINEAR)
def test_non_finite_inputs_are_refused_at_the_entry_points(name):
    op = _op(name)
    x = _x(op, batch=1)
    x.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        op.measure(x, 0.1, torch.Generator().manual_seed(0))
    y = torch.full((1, *op.out_shape), float("inf"), dtype=F64)
    with pytest.raises(ValueError, match="NaN or Inf"):
        op.pinv(y)
