"""Dense-matrix linear operator y = A x on flat vectors, optionally one matrix per problem."""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.operators.base import LinearOperator


class MatrixOperator(LinearOperator):
    """y = A x with A of shape (dy, dx), or (P, dy, dx) for a batch of P problems.

    Inputs are (..., dx); with P problems the leading dimension of the input must be P and row p uses A[p].
    """

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        if matrix.ndim not in (2, 3):
            raise ValueError(f"matrix must be (dy, dx) or (P, dy, dx), got shape {tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix contains non-finite values")
        self.register_buffer("matrix", matrix)
        self.in_shape = (matrix.shape[-1],)
        self.out_shape = (matrix.shape[-2],)

    @property
    def num_problems(self) -> int:
        return 1 if self.matrix.ndim == 2 else self.matrix.shape[0]

    @property
    def param_batch_size(self) -> int:
        """One parameter set (matrix) per problem: ``norm()`` is the largest of the P matrix norms."""
        return self.num_problems

    def _apply(self, mat: Tensor, v: Tensor) -> Tensor:
        if mat.ndim == 2:
            return v @ mat.transpose(-1, -2).to(v.dtype)
        if v.ndim < 2 or v.shape[0] != mat.shape[0]:
            raise ValueError(f"an operator batched over {mat.shape[0]} problems needs inputs (P, ..., d), got {tuple(v.shape)}")
        flat = v.reshape(v.shape[0], -1, v.shape[-1])
        return (flat @ mat.transpose(-1, -2).to(v.dtype)).reshape(*v.shape[:-1], mat.shape[-2])

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(self.matrix, x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(self.matrix.transpose(-1, -2), y)


def random_svd_matrix(dy: int, dx: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """MCGdiff measurement matrix: A0 ~ N(0, 1)^{dy x dx} = U S V^T, singular values replaced by dy sorted U(0, 1)."""
    if not 0 < dy <= dx:
        raise ValueError(f"need 0 < dy <= dx, got dy={dy}, dx={dx}")
    a0 = torch.randn(dy, dx, generator=generator, dtype=dtype)
    u, _, vh = torch.linalg.svd(a0, full_matrices=False)
    s = torch.sort(torch.rand(dy, generator=generator, dtype=dtype), descending=True).values
    return u @ torch.diag(s) @ vh
