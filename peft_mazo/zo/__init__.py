"""Zeroth-order optimization: the `ZOSGD` optimizer and the multi-task weightings it combines task losses with."""

from .optimizer import ZOSGD, ZOStepResult, tensor_seed
from .weighting import CoBaWeighting, EqualWeighting, FAMOWeighting, StaticWeighting, TaskWeighting, make_weighting


__all__ = [
    "ZOSGD",
    "CoBaWeighting",
    "EqualWeighting",
    "FAMOWeighting",
    "StaticWeighting",
    "TaskWeighting",
    "ZOStepResult",
    "make_weighting",
    "tensor_seed",
]
