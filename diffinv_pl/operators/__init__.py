"""Forward operators and their registry.

``build_operator(name, **overrides)`` builds a registered operator with the seeds' defaults (methods.md §7); the
contract tests in ``tests/test_operator_contracts.py`` run over this registry, and ``conf/operator/<name>.yaml``
selects one from Hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator, LinearOperator
from diffinv_pl.operators.matrix import MatrixOperator, random_svd_matrix


def _lazy(module: str, name: str, **defaults: Any) -> Callable[..., ForwardOperator]:
    """Constructor imported on first use (CT needs astra, the nonlinear blur its weights file)."""

    def build(**kwargs: Any) -> ForwardOperator:
        import importlib
        import inspect

        cls = getattr(importlib.import_module(f"diffinv_pl.operators.{module}"), name)
        params = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise UserError(
                    f"operator {name} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(params))} "
                    "(check the operator.* overrides)"
                )
        return cls(**{**defaults, **kwargs})

    return build


OPERATORS: dict[str, Callable[..., ForwardOperator]] = {
    "identity": _lazy("image", "Identity"),
    "gaussian_blur": _lazy("image", "GaussianBlur"),
    "gaussian_blur_circular": _lazy("image", "GaussianBlur", boundary="circular"),
    "motion_blur": _lazy("image", "MotionBlur"),
    "uniform_blur": _lazy("image", "UniformBlur"),
    "sr_bicubic": _lazy("image", "BicubicSR"),
    "sr_blur_stride": _lazy("image", "BlurStrideSR"),
    "inpainting_random": _lazy("image", "Inpainting", mask_type="random"),
    "inpainting_box": _lazy("image", "Inpainting", mask_type="box"),
    "phase_retrieval": _lazy("image", "PhaseRetrieval"),
    "hdr": _lazy("image", "HighDynamicRange"),
    "nonlinear_blur": _lazy("nonlinear_blur", "NonlinearBlur"),
    "ct_parallel": _lazy("ct", "CTOperator", geometry="parallel", num_views=20),
    "ct_fan": _lazy("ct", "CTOperator", geometry="fan", num_views=180),
    "ct_limited_angle": _lazy("ct", "CTOperator", geometry="limited_angle", num_views=60),
}


def build_operator(name: str, **overrides: Any) -> ForwardOperator:
    """Registered operator by name; unknown names raise with the list of valid ones."""
    if name not in OPERATORS:
        raise UserError(f"unknown operator {name!r}; valid operators: {', '.join(sorted(OPERATORS))}")
    return OPERATORS[name](**overrides)


__all__ = ["OPERATORS", "ForwardOperator", "LinearOperator", "MatrixOperator", "build_operator", "random_svd_matrix"]
