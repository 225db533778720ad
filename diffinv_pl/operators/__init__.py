"""Forward operators: the interface (forward, adjoint with autograd, measure) and the dense matrix operator."""

from diffinv_pl.operators.base import ForwardOperator, LinearOperator
from diffinv_pl.operators.matrix import MatrixOperator, random_svd_matrix

__all__ = ["ForwardOperator", "LinearOperator", "MatrixOperator", "random_svd_matrix"]
