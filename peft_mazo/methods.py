"""The fine-tuning methods the paper compares, as data: adapter, mask scorer, task weighting, defaults.

Every method runs through the same training loop (`peft_mazo.runner`); a method only chooses what to build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .scorers import get_scorer


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name (`str`): the `--method` value.
        description (`str`): one line for `--help` and the results.
        adapter (`dict`, *optional*): `MaZOConfig` keyword arguments; None = no training (zero-shot).
        weighting (`str`): task weighting of the ZO step: "equal", "famo" or "coba".
        per_task (`bool`): one model per task (STL-ZO) instead of one multi-task model.
        lr (`float`): default learning rate; eps is 1e-3 for all (MAZO_SPEC §1).
    """

    name: str
    description: str
    adapter: Optional[dict[str, Any]] = field(default=None)
    weighting: str = "equal"
    per_task: bool = False
    lr: float = 1e-6

    @property
    def trains(self) -> bool:
        return self.adapter is not None

    @property
    def needs_calibration(self) -> bool:
        """True when the mask needs calibration data (a data-driven scorer: "mazo" or "wanda")."""
        scorer = self.adapter.get("scorer", "mazo") if self.adapter is not None else None  # MaZOConfig's default
        return scorer is not None and get_scorer(scorer).needs_data

    def adapter_config(self, **overrides: Any) -> dict[str, Any]:
        """The adapter's `MaZOConfig` keyword arguments with `overrides` (None values ignored) applied."""
        if self.adapter is None:
            raise ValueError(f"Method '{self.name}' trains no adapter.")
        config = dict(self.adapter)
        config.update({k: v for k, v in overrides.items() if v is not None})
        if config.get("scorer") == "none":
            config["sparsity"] = 0.0
        return config


_DENSE_FULL = {"scorer": "none", "r": 0}
_LORA_FULL = {"scorer": "none", "r": 64}
_LORA_LR = 3e-4

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("zero-shot", "no fine-tuning: evaluate the base model"),
        Method("mtl-zo", "multi-task ZO-SGD on every weight (no mask), equal task weights", _DENSE_FULL),
        Method("mtl-zo-lora", "multi-task ZO-SGD on LoRA r=64 (no mask)", _LORA_FULL, lr=_LORA_LR),
        Method("mazo", "MaZO: dense masked delta, rho=0.9, MaZO scores", {"scorer": "mazo", "r": 0, "sparsity": 0.9}),
        Method(
            "mazo-lora",
            "MaZO LoRA: r=64, rho=0.8, MaZO scores",
            {"scorer": "mazo", "r": 64, "sparsity": 0.8},
            lr=_LORA_LR,
        ),
        Method("stl-zo", "single-task ZO-SGD: one model per task (no mask)", _DENSE_FULL, per_task=True),
        Method("famo", "multi-task ZO-SGD with FAMO task weighting (no mask)", _DENSE_FULL, weighting="famo"),
        Method("coba", "multi-task ZO-SGD with CoBa task weighting (no mask)", _DENSE_FULL, weighting="coba"),
        Method("mask-random", "ZO-SGD with a random mask (ablation)", {"scorer": "random", "r": 0, "sparsity": 0.5}),
        Method(
            "mask-magnitude", "ZO-SGD with a |W| mask (ablation)", {"scorer": "magnitude", "r": 0, "sparsity": 0.5}
        ),
        Method("mask-wanda", "ZO-SGD with a Wanda mask (ablation)", {"scorer": "wanda", "r": 0, "sparsity": 0.5}),
        Method(
            "mask-mazo",
            "ZO-SGD with the MaZO mask at the ablation's rho=0.5",
            {"scorer": "mazo", "r": 0, "sparsity": 0.5},
        ),
    ]
}


def get_method(name: str) -> Method:
    """The method called `name`; the error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"Unknown method '{name}'. Known methods: {', '.join(METHODS)}.")
    return METHODS[name]
