"""The pixel grid every CT phantom family is rendered on, and the checks shared by the phantom generators.

A phantom is a function on the square [-1, 1]^2 (axis 0 = rows, axis 1 = columns) sampled at the ``size`` pixel
centres ``-1 + (i + 0.5) * 2 / size``, i = 0 .. size-1, so a family's continuous parameters give the same object at
every resolution and it fits the inscribed disc that every CT geometry sees.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from diffinv_pl.errors import UserError


def pixel_centres(size: int) -> Tensor:
    """The ``size`` pixel-centre coordinates on [-1, 1] (float64), the same along rows and columns."""
    return (torch.arange(size, dtype=torch.float64) + 0.5) * (2.0 / size) - 1.0


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # int, numpy and 0-d torch integers
    except TypeError:
        return None


def check_phantom_request(index: object, size: object) -> None:
    """Raise a UserError for a phantom index that is not an integer >= 0 or an image side below 2 pixels."""
    i = _integer(index)
    if i is None or i < 0:
        raise UserError(f"phantom index must be an integer >= 0, got {index!r}; phantoms are numbered 0, 1, 2, ...")
    s = _integer(size)
    if s is None or s < 2:
        raise UserError(f"phantom size must be an integer >= 2 pixels, got {size!r}; set data.size (e.g. 256)")
