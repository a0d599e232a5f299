"""`MaZOConfig`: the fields of a MaZO adapter and their validation."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from peft.config import PeftConfig

from ._checks import is_finite_number, is_int, is_number
from ._peft_type import ensure_mazo_peft_type
from .scorers import SCORERS, get_scorer


DELTA_DTYPES = ("float32", "float64")


@dataclass
class MaZOConfig(PeftConfig):
    """Configuration of a MaZO adapter (Zhang et al., EMNLP 2025, arXiv 2502.11513).

    Every targeted weight `W` (out × in) gets a binary mask `M` with exactly `k = ceil((1 - sparsity) * in)` ones per
    row, and a trainable delta restricted to it: `(lora_alpha / r) · (B A) ⊙ M` with `A` (r, in) and `B` (out, r)
    (`r > 0`, LoRA mode, the default) or `ΔW ⊙ M` stored as (out, k) values (`r = 0`, dense mode).

    The default, `MaZOConfig()`, is the paper's MaZO LoRA (r = 64, ρ = 0.8): its best-scoring variant, and the
    default method of `mazo train` (`mazo-lora`). `MaZOConfig(r=0)` is the dense masked delta (ρ = 0.9). A saved
    adapter stores `r` and `sparsity` in its `adapter_config.json`, so it loads the same whatever the defaults.

    Args:
        sparsity (`float`, *optional*): Fraction ρ ∈ [0, 1) of each row that stays frozen. Defaults to the paper's
            value for the mode: 0.8 with LoRA (`r > 0`), 0.9 dense (`r = 0`), 0 with `scorer="none"`.
        r (`int`): LoRA rank of the masked delta (default 64, the paper's); 0 for the dense masked delta.
        lora_alpha (`float`, *optional*): LoRA scaling numerator; the scale is `lora_alpha / r`. Defaults to `r`.
        target_modules (`str` or `list[str]`): Modules to adapt. Defaults to `"all-linear"`: every linear layer except
            the output head.
        alpha (`float`): Weight of the greedy score in the MaZO importance (paper: 10).
        beta (`float`): Weight of the weight-magnitude score in the MaZO importance (paper: 1).
        scorer (`str`): How the mask is chosen: "mazo", "wanda", "magnitude", "random" or "none" (no mask).
        mask_seed (`int`): Seed of the "random" scorer.
        init_weights (`bool`): True: the adapter starts as the identity. False: a random non-zero delta (tests).
        delta_dtype (`str`): dtype of the trainable state, "float32" (default) or "float64"; never half precision.
    """

    sparsity: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction of each weight row that stays frozen, in [0, 1). Default: the paper's value for the "
            "mode, 0.8 with LoRA (r > 0), 0.9 dense (r = 0); 0 with scorer='none'."
        },
    )
    r: int = field(
        default=64, metadata={"help": "LoRA rank of the masked delta (default 64, MaZO LoRA); 0 = dense masked delta."}
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "LoRA scale numerator (scale = lora_alpha / r). Defaults to r (scale 1)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={
            "help": "Module names (list: exact or suffix match) or a regex to adapt. 'all-linear' (default) adapts "
            "every linear layer except the output head."
        },
    )
    alpha: float = field(default=10.0, metadata={"help": "Weight of the greedy score in the MaZO importance."})
    beta: float = field(default=1.0, metadata={"help": "Weight of the |W| score in the MaZO importance."})
    scorer: Literal["mazo", "wanda", "magnitude", "random", "none"] = field(
        default="mazo",
        metadata={
            "help": "Mask scorer: 'mazo' (paper), 'wanda', 'magnitude', 'random' or 'none' (all ones, no mask). "
            "Until compute_importance runs, 'mazo' and 'wanda' adapters hold a data-free magnitude mask."
        },
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of the 'random' scorer."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the adapter starts as the identity. False: random non-zero delta (for tests)."},
    )
    delta_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the trainable state: 'float32' or 'float64'. Never bf16/fp16."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra modules (e.g. a classifier head) to train fully and save with the adapter."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt; None = all layers."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list when layers_to_transform is set, e.g. 'layers' or 'h'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or a regex) not to adapt, as in peft's LoRA; applied after target_modules."},
    )
    # peft LoRA options a LoRA user passes out of habit: accepted where they mean something for MaZO, refused with the
    # reason otherwise (see _check_lora_options)
    init_lora_weights: Optional[bool] = field(
        default=None, metadata={"help": "Alias of init_weights (True or False only), as in peft's LoraConfig."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Must be 0: a ZO step has no dropout."})
    bias: str = field(default="none", metadata={"help": "Must be 'none': MaZO trains no bias."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Must be False: MaZO adapts nn.Linear layers."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "Not supported (per-module ranks)."})
    alpha_pattern: Optional[dict] = field(default=None, metadata={"help": "Not supported (per-module alphas)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_mazo_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._check_lora_options()
        self._validate()

    def _check_lora_options(self) -> None:
        """peft LoRA options: `init_lora_weights` is an alias of `init_weights`; the others are refused unless they
        have their neutral value, with the reason (ValueError, not a bare TypeError)."""
        if self.init_lora_weights is not None:
            if not isinstance(self.init_lora_weights, bool):
                raise ValueError(
                    f"MaZOConfig.init_lora_weights={self.init_lora_weights!r}: MaZO starts from the identity (True) or "
                    "from a random delta (False); LoRA's other initialisations (gaussian, pissa, olora, ...) do not "
                    "apply to a masked delta."
                )
            self.init_weights = self.init_lora_weights
        if self.lora_dropout:
            raise ValueError(
                f"MaZOConfig.lora_dropout={self.lora_dropout}: a zeroth-order step compares two forwards of the same "
                "batch, and dropout would make them differ by noise rather than by the perturbation. Remove it."
            )
        if self.bias != "none":
            raise ValueError(
                f"MaZOConfig.bias={self.bias!r}: MaZO trains masked weight deltas, not biases. Use bias='none' (or "
                "modules_to_save for a module whose bias must train)."
            )
        if self.fan_in_fan_out:
            raise ValueError(
                "MaZOConfig.fan_in_fan_out=True: MaZO adapts torch.nn.Linear layers (weights stored (out, in)); "
                "transformers' Conv1D layers (GPT-2 style, (in, out)) are not supported."
            )
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                raise ValueError(
                    f"MaZOConfig.{name} is not supported: every adapted layer has the same r and lora_alpha. Adapt "
                    "the layers that need another rank in a second adapter, or leave them out with exclude_modules."
                )

    def _validate(self) -> None:
        if not is_int(self.r) or self.r < 0:
            raise ValueError(
                f"MaZOConfig.r must be an integer >= 0 (0 = dense masked delta, > 0 = LoRA rank), got {self.r!r}."
            )
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise ValueError(f"MaZOConfig.scorer must be one of {tuple(SCORERS)}, got {self.scorer!r}.")
        if self.sparsity is None:  # the paper's default for the mode (MAZO_SPEC §2)
            self.sparsity = 0.0 if not get_scorer(self.scorer).masked else 0.9 if self.r == 0 else 0.8
        if not is_number(self.sparsity):
            raise ValueError(f"MaZOConfig.sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"MaZOConfig.sparsity must be in [0, 1) (the fraction of each row that stays frozen), got "
                f"{self.sparsity}. Use e.g. 0.9 for the dense delta or 0.8 with LoRA."
            )
        if self.lora_alpha is None:
            self.lora_alpha = float(self.r) if self.r > 0 else None
        elif self.r == 0:
            raise ValueError(
                "MaZOConfig.lora_alpha is set but r = 0 (dense mode has no LoRA scale); set r > 0 or drop lora_alpha."
            )
        elif not (is_finite_number(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(
                f"MaZOConfig.lora_alpha must be > 0 and finite (the LoRA scale is lora_alpha / r), got "
                f"{self.lora_alpha!r}; leave it unset for lora_alpha = r."
            )
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(
                f"MaZOConfig.delta_dtype must be one of {DELTA_DTYPES}, got {self.delta_dtype!r}: the trainable state "
                "is kept in full precision so that small updates are not rounded away."
            )
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not is_number(value) or not (0 <= value < math.inf):
                raise ValueError(
                    f"MaZOConfig.{name} must be a number >= 0 (finite), got {value!r}. Paper: alpha = 10, beta = 1."
                )
        if not is_int(self.mask_seed):
            raise ValueError(
                f"MaZOConfig.mask_seed must be an integer (the seed of scorer='random'), got {self.mask_seed!r}."
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"MaZOConfig.init_weights must be True or False, got {self.init_weights!r}.")
        targets = self.target_modules
        if targets is not None and not (
            isinstance(targets, str)
            or (isinstance(targets, (set, list, tuple)) and all(isinstance(t, str) for t in targets))
        ):
            raise ValueError(
                f"MaZOConfig.target_modules must be a regex string, a list of module names, or 'all-linear', got "
                f"{targets!r}. Example: target_modules=['q_proj', 'v_proj']."
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("MaZOConfig.layers_pattern only applies with layers_to_transform; set both or neither.")
        if not get_scorer(self.scorer).masked and self.sparsity > 0:
            warnings.warn(
                f"MaZOConfig(scorer='none') trains every entry: sparsity={self.sparsity} is ignored.", stacklevel=3
            )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> MaZOConfig:
        """Load a saved `adapter_config.json` (validated like a new config) and remember a local source directory.

        The directory lets `MaZOModel` check the saved weights against the base model before any layer is replaced,
        so that loading an adapter onto the wrong base model fails with a clear message and leaves the model as it
        was.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(path):
            config._mazo_source_dir = str(path)  # not a dataclass field: never saved
        return config

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        """The `torch.dtype` of the trainable state."""
        return getattr(torch, self.delta_dtype)

    def kept_per_row(self, in_features: int) -> int:
        """k, the trainable entries of each row of an (out, `in_features`) weight: `ceil((1 - sparsity) · in)` with
        a mask, every entry with `scorer="none"`."""
        from .mask import kept_per_row

        return kept_per_row(in_features, self.sparsity) if get_scorer(self.scorer).masked else in_features

    @property
    def effective_sparsity(self) -> float:
        """The sparsity the mask really has: 0 with `scorer="none"`."""
        return self.sparsity if get_scorer(self.scorer).masked else 0.0
