"""Forward-operator interface.

A forward operator maps a batch of signals of event shape ``in_shape`` to measurements of event shape ``out_shape``;
leading (batch) dimensions pass through. Linear operators also give ``adjoint``; their ``forward`` is wrapped in an
autograd function whose backward *is* ``adjoint``, so a vector-Jacobian product through the operator is an adjoint
call and is counted as one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffinv_pl.utils.random import GeneratorLike, randn


def _check_finite_input(t: Tensor, where: str) -> None:
    """User-facing entry points refuse NaN/Inf (one reduction pass; solvers check their own state with step context)."""
    if not bool(torch.isfinite(t.sum())):
        raise ValueError(f"{where}: input contains NaN or Inf values; check the data or the previous step")


def _has_event_shape(t: Tensor, event_shape: tuple[int, ...]) -> bool:
    """True when the trailing dimensions of t are exactly event_shape."""
    n = len(event_shape)
    return t.ndim >= n and tuple(t.shape[t.ndim - n:]) == tuple(event_shape)


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor], b: Tensor, event_ndim: int, tol: float, max_iter: int
) -> tuple[Tensor, bool]:
    """Solve G x = b for a symmetric positive (semi-)definite G (``apply``), one system per batch row (the trailing
    ``event_ndim`` dimensions are the vector), by conjugate gradients from x = 0; stops when every row's residual falls
    below ``tol`` relative to its ||b||. Returns (x, converged). From 0, CG stays in range(G): for the normal equations
    A^T A x = A^T y it converges to the minimum-norm least-squares solution."""
    dims = tuple(range(b.ndim - event_ndim, b.ndim))
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(dims, keepdim=True)
    target = tol**2 * rs.clamp(min=tiny)
    if bool((rs <= target).all()):
        return x, True
    for _ in range(max_iter):
        Gp = apply(p)
        alpha = rs / (p * Gp).sum(dims, keepdim=True).clamp(min=tiny)
        x = x + alpha * p
        r = r - alpha * Gp
        rs_new = (r * r).sum(dims, keepdim=True)
        if bool((rs_new <= target).all()):
            return x, True
        p = r + (rs_new / rs.clamp(min=tiny)) * p
        rs = rs_new
    return x, False


class ForwardOperator(nn.Module, ABC):
    """Base class: subclasses set ``in_shape``/``out_shape`` and implement ``_forward``.

    ``input_range`` is the signal range the operator is defined on ((0, 1) for PaDIS CT, (-1, 1) for the DPS family,
    None for plain vectors); convert with :func:`diffinv_pl.utils.ranges.convert_range`.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_range: tuple[float, float] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the call counters a solver's cost is read from: A, A^T and Gram-inverse (CoDPS) evaluations."""
        self.forward_calls = 0
        self.adjoint_calls = 0
        self.gram_calls = 0

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

    def measure(self, x: Tensor, sigma_y: float, generator: GeneratorLike = None) -> Tensor:
        """y = A(x) + sigma_y n with n ~ N(0, I) drawn from ``generator`` (one, or one per sample)."""
        if sigma_y < 0:
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
        _check_finite_input(x, f"{type(self).__name__}.measure")
        clean = self.forward(x).detach()
        noise = randn(clean.shape, generator, clean.dtype, clean.device)
        return clean + sigma_y * noise

    def residual_norm(self, residual: Tensor) -> Tensor:
        """Euclidean norm over the measurement's event dimensions: shape residual.shape[:-len(out_shape)]."""
        dims = tuple(range(residual.ndim - len(self.out_shape), residual.ndim))
        # vector_norm's gradient at a zero residual is 0; sqrt(sum(r^2)) would give NaN there (and r^2 underflows
        # to 0 in float32 for |r| < 1e-19).
        return torch.linalg.vector_norm(residual, dim=dims)


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

    @property
    def param_batch_size(self) -> int:
        """Number of per-sample parameter sets installed (1 for operators without random parameters)."""
        return 1

    def norm(self, num_iterations: int = 1000, tol: float = 1e-10, generator: torch.Generator | None = None) -> float:
        """Operator 2-norm ||A|| by the power method on A^T A (cached after the first call).

        Stops when successive estimates agree to ``tol`` relative; convergence is slow when the two largest singular
        values are close, hence the large default iteration budget (cheap operators) - pass fewer for expensive ones.
        """
        cached = getattr(self, "_norm_cache", None)
        if cached is not None:
            return cached
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float64)
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        # operators with per-sample parameters are block diagonal over the batch: ||A|| is the largest block norm
        v = torch.randn((self.param_batch_size, *self.in_shape), generator=gen, dtype=dtype).to(device)
        v = v / v.norm()
        estimate = 0.0
        with torch.no_grad():
            for _ in range(num_iterations):
                w = self._adjoint(self._forward(v))
                new = float(w.norm()) ** 0.5
                v = w / w.norm()
                if abs(new - estimate) <= tol * new:
                    estimate = new
                    break
                estimate = new
        self._norm_cache = estimate
        return estimate

    def pinv(self, y: Tensor, **options) -> Tensor:
        """Pseudo-inverse A^+ y (refuses NaN/Inf); ``options`` go to the operator's ``_pinv``."""
        _check_finite_input(y, f"{type(self).__name__}.pinv")
        return self._pinv(y, **options)

    def _pinv(self, y: Tensor, num_iterations: int = 200, tol: float = 1e-10) -> Tensor:
        """Least-squares solution argmin ||A x - y|| of minimum norm, by conjugate gradients on A^T A x = A^T y.

        Started from 0, CG stays in range(A^T) and so converges to the minimum-norm solution; it stops when the
        normal-equation residual falls below ``tol`` relative to ||A^T y||. Operators with a cheap exact inverse
        (masks, FFT diagonalisable ones) or a better approximate one (FBP for CT) override this. Every A and A^T
        evaluation is counted in ``forward_calls`` / ``adjoint_calls`` (solver cost).
        """

        def normal_operator(p: Tensor) -> Tensor:
            self.forward_calls += 1
            self.adjoint_calls += 1
            return self._adjoint(self._forward(p))

        with torch.no_grad():
            self.adjoint_calls += 1
            b = self._adjoint(y)
            x, _ = conjugate_gradient(normal_operator, b, len(self.in_shape), tol, num_iterations)
        return x

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        """(sigma_y^2 I + v A A^T)^-1 y, exact for operators whose A A^T is diagonalisable (CoDPS).

        Operators without such a structure raise a TypeError naming themselves.
        """
        raise TypeError(
            f"{type(self).__name__} has no exact (sigma_y^2 I + v A A^T)^-1; CoDPS needs an operator whose A A^T is "
            "diagonalisable (identity, masks, FFT convolutions, blur + stride subsampling)"
        )

    def adjoint(self, y: Tensor) -> Tensor:
        if not _has_event_shape(y, self.out_shape):
            raise ValueError(f"{type(self).__name__}.adjoint expects (..., {self.out_shape}), got {tuple(y.shape)}")
        self.adjoint_calls += 1
        return self._adjoint(y)

    @abstractmethod
    def _adjoint(self, y: Tensor) -> Tensor:
        """A^T(y) for y of shape (..., *out_shape)."""
