"""Dense matrix operator: adjointness, autograd VJP = adjoint, problem batching, seeded measurements."""

from __future__ import annotations

import pytest
import torch

from diffinv_pl.operators import MatrixOperator, random_svd_matrix

F64 = torch.float64


def test_adjoint_and_vjp_and_batching():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 7, generator=g, dtype=F64)
    op = MatrixOperator(A)
    x = torch.randn(3, 4, 7, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(3, 4, 5, generator=g, dtype=F64)
    y = op(x)
    assert torch.allclose(y, torch.einsum("ped,pnd->pne", A, x))
    lhs, rhs = (y * v).sum().item(), (x * op.adjoint(v)).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    calls = op.adjoint_calls
    (vjp,) = torch.autograd.grad(y, x, v)
    assert op.forward_calls == 1 and op.adjoint_calls == calls + 1  # the VJP went through adjoint()
    assert torch.allclose(vjp, op.adjoint(v), rtol=1e-14)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 7\)"):
        op(torch.zeros(3, 4, 6, dtype=F64))
    with pytest.raises(ValueError, match="batched over 3 problems"):
        op(torch.zeros(2, 7, dtype=F64))


def test_random_svd_matrix_and_seeded_measurement():
    A = random_svd_matrix(3, 10, torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(A)
    assert bool((s <= 1).all()) and bool((s[:-1] >= s[1:]).all())
    op = MatrixOperator(A)
    x = torch.randn(2, 10, dtype=F64)
    y1 = op.measure(x, 0.1, torch.Generator().manual_seed(5))
    y2 = op.measure(x, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and not torch.equal(y1, op(x))
    with pytest.raises(ValueError, match="sigma_y must be >= 0"):
        op.measure(x, -0.1)
    with pytest.raises(ValueError, match="non-finite"):
        MatrixOperator(torch.tensor([[float("inf")]]))
