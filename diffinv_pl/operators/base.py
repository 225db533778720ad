"""Forward-operator interface.

A forward operator maps a batch of signals of event shape ``in_shape`` to measurements of event shape ``out_shape``;
leading (batch) dimensions pass through. Linear operators also give ``adjoint``; their ``forward`` is wrapped in an
autograd function whose backward *is* ``adjoint``, so a vector-Jacobian product through the operator is an adjoint
call and is counted as one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


def _has_event_shape(t: Tensor, event_shape: tuple[int, ...]) -> bool:
    """True when the trailing dimensions of t are exactly event_shape."""
    n = len(event_shape)
    return t.ndim >= n and tuple(t.shape[t.ndim - n:]) == tuple(event_shape)


class ForwardOperator(nn.Module, ABC):
    """Base class: subclasses set ``in_shape``/``out_shape`` and implement ``_forward``."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __init__(self) -> None:
        super().__init__()
        self.forward_calls = 0
        self.adjoint_calls = 0

    def reset_counters(self) -> None:
        self.forward_calls = 0
        self.adjoint_calls = 0

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for a signal of the wrong event shape."""
        if not _has_event_shape(x, self.in_shape):
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., {', '.join(map(str, self.in_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def check_measurement(self, y: Tensor) -> None:
        """Raise a clear error for a measurement of the wrong event shape or with non-finite values."""
        if not _has_event_shape(y, self.out_shape):
            raise ValueError(
                f"measurement has shape {tuple(y.shape)} but {type(self).__name__} produces (..., "
                f"{', '.join(map(str, self.out_shape))}); check the operator and data configuration"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError("measurement contains NaN or Inf values; clean the data or check the noise model")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        self.forward_calls += 1
        return self._forward(x)

    @abstractmethod
    def _forward(self, x: Tensor) -> Tensor:
        """A(x) for x of shape (..., *in_shape)."""

    def measure(self, x: Tensor, sigma_y: float, generator: torch.Generator | None = None) -> Tensor:
        """y = A(x) + sigma_y n with n ~ N(0, I) drawn from ``generator``."""
        if sigma_y < 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        clean = self.forward(x).detach()
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(clean.device)
        return clean + sigma_y * noise

    def residual_norm(self, residual: Tensor) -> Tensor:
        """Euclidean norm over the measurement's event dimensions: shape residual.shape[:-len(out_shape)]."""
        dims = tuple(range(residual.ndim - len(self.out_shape), residual.ndim))
        return residual.pow(2).sum(dim=dims).sqrt()


class _LinearApply(torch.autograd.Function):
    """y = A x whose backward is A^T (the operator's own adjoint)."""

    @staticmethod
    def forward(ctx, x: Tensor, operator: LinearOperator) -> Tensor:  # type: ignore[override]
        ctx.operator = operator
        return operator._forward(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return ctx.operator.adjoint(grad_out), None


class LinearOperator(ForwardOperator):
    """Linear forward operator with an adjoint; subclasses implement ``_forward`` and ``_adjoint``."""

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        self.forward_calls += 1
        return _LinearApply.apply(x, self)

    def adjoint(self, y: Tensor) -> Tensor:
        if not _has_event_shape(y, self.out_shape):
            raise ValueError(f"{type(self).__name__}.adjoint expects (..., {self.out_shape}), got {tuple(y.shape)}")
        self.adjoint_calls += 1
        return self._adjoint(y)

    @abstractmethod
    def _adjoint(self, y: Tensor) -> Tensor:
        """A^T(y) for y of shape (..., *out_shape)."""
