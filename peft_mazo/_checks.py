"""The number checks shared by every module that validates user input (a `bool` is never a number here)."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """True for an `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for an `int` or `float` that is not a `bool` (NaN and inf included: see `is_finite_number`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a finite `int` or `float` that is not a `bool`."""
    return is_number(value) and math.isfinite(value)
