"""The number checks shared by every module that validates user input (a `bool` is never a number here)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """True for an integer (`int`, NumPy integers, ...) that is not a `bool`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a real number (`int`, `float`, NumPy scalars, ...) that is not a `bool` (NaN and inf included: see
    `is_finite_number`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a finite real number that is not a `bool`."""
    return is_number(value) and math.isfinite(value)
