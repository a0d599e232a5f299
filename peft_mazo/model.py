"""`MaZOModel`: walks a model, wraps the targeted linear layers in MaZO layers, and exposes the masks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._inputs import install_input_check, remove_input_check
from .checkpoint import check_adapter_state, check_saved_adapter
from .config import MaZOConfig
from .layer import (
    MIXED_BATCH_ERROR,
    Linear,
    MaZOLayer,
    adapter_layers,
    mazo_layers,
    resolve_adapter,
)
from .quantized import quantization_kind


class MaZOModel(BaseTuner):
    """The MaZO tuner (Zhang et al., EMNLP 2025, arXiv 2502.11513). Build it through `peft.get_peft_model`.

    Example:

        ```py
        >>> import peft_mazo
        >>> from peft import get_peft_model

        >>> model = get_peft_model(base, peft_mazo.MaZOConfig(sparsity=0.8, r=64))
        >>> masks = model.get_masks()  # {module name: (out, in) bool mask}
        ```
    """

    prefix: str = "mazo_"
    tuner_layer_cls = MaZOLayer
    target_module_mapping: dict = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        _refuse_existing_adapter(model, adapter_name)  # before peft records the new config under that name
        super().__init__(model, peft_config, adapter_name, *args, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's `inject_adapter`, refused (`ValueError`, the model unchanged) when `model` already holds a MaZO
        adapter of that name (wrapping its layers again would overwrite that adapter's delta and mask); then a check of
        the token inputs of every forward of the base model (`_inputs.install_input_check`: no `input_ids`,
        non-integer ids, or, for CPU tensors, ids outside the vocabulary raise a `ValueError` naming the fix instead
        of failing inside the embedding)."""
        _refuse_existing_adapter(model, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        install_input_check(model)

    def _prepare_adapter_config(self, peft_config: MaZOConfig, model_config: dict) -> MaZOConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _prepare_model(self, peft_config: MaZOConfig, model: nn.Module) -> None:
        """Check every targeted module (and, when loading, the saved weights) before any is replaced, so that a bad
        config or an adapter saved for another base model leaves the model untouched."""
        check_saved_adapter(peft_config, model)
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
            return
        adapted = [key + "." for key, module in model.named_modules() if isinstance(module, MaZOLayer)]
        matched_any = False
        for key, module in model.named_modules():
            if not key or key.startswith(tuple(adapted)):
                continue
            matched = self._check_target_module_exists(peft_config, key)
            if not matched or isinstance(matched, _ExcludedModule):
                continue
            matched_any = True
            if isinstance(module, MaZOLayer):
                continue
            if isinstance(module, Conv1D):
                raise ValueError(
                    f"MaZOConfig.target_modules matched '{key}', a transformers Conv1D (GPT-2 style) layer, which "
                    "MaZO does not support yet. Target nn.Linear layers only, or use a model with nn.Linear "
                    "projections."
                )
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"MaZOConfig.target_modules matched '{key}' of type {type(module).__name__}, but MaZO adapts "
                    "only linear layers (torch.nn.Linear, bitsandbytes Linear4bit / Linear8bitLt). Narrow "
                    "target_modules to linear layers, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
                )
        if not matched_any and not getattr(peft_config, "_mazo_source_dir", None):
            from peft.utils.error import NoMatchingPeftModuleError

            names = sorted(
                {key.rsplit(".", 1)[-1] for key, module in model.named_modules() if isinstance(module, nn.Linear)}
            )
            raise NoMatchingPeftModuleError(
                f"Target modules {peft_config.target_modules!r} (MaZOConfig.target_modules) match no module of "
                f"{type(model).__name__}. Its linear layers are named {names[:12]}; use some of these names, or "
                "target_modules='all-linear'."
            )

    def _create_and_replace(
        self,
        peft_config: MaZOConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, MaZOLayer):
            target.update_layer(adapter_name, peft_config, module_key=current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"MaZO adapts only linear layers, but '{current_key}' is a {type(base).__name__}; narrow "
                "MaZOConfig.target_modules."
            )
        new_module = Linear(target, adapter_name, peft_config, module_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """peft enters this around every forward and `generate` of a `PeftModel`, with the call's arguments, then
        drops its routing arguments. MaZO routes no example to another adapter: refuse them instead of running every
        example with the active adapter(s) while the caller believes otherwise."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(MIXED_BATCH_ERROR)
        if kwargs.get("alora_offsets") is not None:
            raise ValueError(
                "`alora_offsets` belongs to peft's activated LoRA (aLoRA), which MaZO is not: a MaZO adapter applies "
                "to every token. Remove the argument."
            )
        yield

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """Refused: see the error."""
        raise NotImplementedError(
            "MaZO does not combine adapters into a new weighted adapter (peft's add_weighted_adapter is LoRA's and "
            "IA3's): each MaZO adapter has its own mask, and a weighted sum of deltas under different masks is in "
            "general not a MaZO delta (k kept entries per row under one mask). Activate several adapters at once "
            "instead (model.base_model.set_adapter([...]) sums their deltas), or merge them "
            "(model.merge_and_unload(adapter_names=[...]))."
        )

    # ----------------------------------------------------------------------------------------------------------------
    # saving and loading (peft's hooks, called by get_peft_model_state_dict / set_peft_model_state_dict)
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The adapter's entries of `state_dict` as peft selects them (everything on the MaZO layers: the delta, the
        mask, the shape record; `peft_mazo.checkpoint` has the layout), and the mask and shape record of every layer
        from the layer itself where `state_dict` lacks them (a state dict of parameters only): a saved adapter
        always holds its mask. Keys still carry the adapter name; peft removes it."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in adapter_layers(model, adapter_name).items():
            for kind, buffer in layer.saved_buffers(adapter_name).items():
                selected.setdefault(f"{name}.{kind}.{adapter_name}", buffer.detach())
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key mapping (saved keys to the model's, adapter name inserted), then the whole checkpoint checked
        against the adapter before anything is written (`peft_mazo.checkpoint.check_adapter_state`): every layer gets
        a delta and mask of the right kind and shapes, with a valid mask. So `load_adapter` under the name of an
        existing adapter that the saved one does not fit fails at once, naming the name clash, and leaves the model
        as it was."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        specs = {name: layer.saved_spec(adapter_name) for name, layer in adapter_layers(model, adapter_name).items()}
        check_adapter_state(remapped, adapter_name, specs)
        return remapped

    # ----------------------------------------------------------------------------------------------------------------
    # masks
    # ----------------------------------------------------------------------------------------------------------------
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's dtype convention for adapter weights. MaZO creates its trainable state in `delta_dtype` (fp32 by
        default, so `autocast_adapter_dtype=True` has nothing to upcast). `autocast_adapter_dtype=False` asks for the
        adapter in the base layer's own dtype, as peft's LoRA keeps it: on a bf16/fp16 base the trainable tensors
        become bf16/fp16 (quantized bases keep fp32: their weight has no float dtype to follow). A ZO step on such an
        adapter loses every update smaller than half a unit in the last place of the bf16/fp16 value."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for layer in self._mazo_layers().values():
            weight = getattr(layer.get_base_layer(), "weight", None)
            if weight is None or quantization_kind(layer.get_base_layer()) or not weight.is_floating_point():
                continue
            for container_name in layer.adapter_layer_names:
                container = getattr(layer, container_name)
                if adapter_name in container and container[adapter_name].dtype != weight.dtype:
                    old = container[adapter_name]
                    container[adapter_name] = nn.Parameter(
                        old.detach().to(weight.dtype), requires_grad=old.requires_grad
                    )

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """peft's unload (with or without merging); the base model it returns no longer has the input check."""
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_input_check(model)
        return model

    def _mazo_layers(self) -> dict[str, MaZOLayer]:
        """Adapted modules by name (names as in the base model, e.g. 'model.layers.0.self_attn.q_proj')."""
        return mazo_layers(self)

    def _resolve_adapter(self, adapter_name: Optional[str]) -> str:
        return resolve_adapter(self, adapter_name)

    def get_masks(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Dense (out, in) bool mask of every adapted module, materialized on demand.

        Args:
            adapter_name (`str`, *optional*): the adapter; defaults to the first active one.

        Returns:
            `dict[str, torch.BoolTensor]` keyed by module name. Each mask costs one byte per weight: use it for
            inspection, not inside a training loop.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        return {
            name: layer.get_mask(adapter_name)
            for name, layer in self._mazo_layers().items()
            if adapter_name in layer.mazo_k
        }

    def set_masks(
        self, masks: dict[str, torch.Tensor], adapter_name: Optional[str] = None, reset: bool = False
    ) -> None:
        """Set the masks of the named modules from dense (out, in) bool tensors with exactly k ones per row.

        Everything is validated before anything is written: unknown module names, shapes, row counts, and (unless
        `reset=True`, which zeroes the delta) adapters whose delta is already non-zero.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"set_masks takes a dict {{module name: (out, in) bool mask}}, got {type(masks).__name__}. Start from "
                "model.get_masks(), which returns that dict."
            )
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor):
                raise TypeError(
                    f"mask of '{name}' must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}; convert "
                    "it with torch.as_tensor(mask, dtype=torch.bool)."
                )
        layers = self._mazo_layers()
        unknown = sorted(set(masks) - {n for n, layer in layers.items() if adapter_name in layer.mazo_k})
        if unknown:
            raise ValueError(
                f"set_masks got modules without a MaZO adapter '{adapter_name}': {[str(n) for n in unknown[:5]]}. Use "
                "the names returned by get_masks()."
            )
        from .mask import check_row_counts, dense_to_indices

        columns = {}
        for name, mask in masks.items():
            layer = layers[name]
            if not layer.is_masked(adapter_name):
                layer.check_mask_columns(adapter_name, mask, reset=reset, name=name)  # raises: no mask to set
            expected = (layer.out_features, layer.in_features)
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"mask of '{name}' must have shape {expected} (the weight's (out, in)), got {tuple(mask.shape)}. "
                    "Start from model.get_masks()[name], which has the right shape."
                )
            if mask.dtype != torch.bool:
                raise ValueError(
                    f"mask of '{name}' must be a bool tensor, got dtype {mask.dtype}; convert it with mask.bool() "
                    "(exactly k True entries per row)."
                )
            check_row_counts(mask, layer.mazo_k[adapter_name], name=f"mask of '{name}'")
            columns[name] = dense_to_indices(mask)
            layer.check_mask_columns(adapter_name, columns[name], reset=reset, name=name)
        for name, cols in columns.items():
            layers[name].set_mask_columns(adapter_name, cols, reset=reset)

    def compute_importance(
        self,
        calib_loaders=None,
        num_batches: Optional[int] = None,
        eta: Optional[float] = None,
        progress: bool = True,
        adapter_name: Optional[str] = None,
        reset: bool = False,
        *,
        damping: float = 0.01,
        max_stats_bytes: Optional[int] = None,
    ):
        """Compute the multi-task mask of the adapter from calibration data (MAZO_SPEC §3) and write it.

        Example:

            ```py
            >>> report = model.compute_importance({"sst2": loader_a, "boolq": loader_b}, num_batches=8)
            >>> print(report)  # per task: tokens, time, overlap of its own top-k set with the final mask
            ```

        See `peft_mazo.importance.compute_importance` for the arguments; returns an `ImportanceReport`.
        """
        from .importance import compute_importance

        return compute_importance(
            self,
            calib_loaders,
            num_batches=num_batches,
            eta=eta,
            progress=progress,
            adapter_name=adapter_name,
            reset=reset,
            damping=damping,
            max_stats_bytes=max_stats_bytes,
        )


def _refuse_existing_adapter(model: nn.Module, adapter_name: str) -> None:
    """`ValueError` when `model` already holds a MaZO adapter named `adapter_name` (checked on its layers)."""
    existing = adapter_layers(model, adapter_name)
    if existing:
        raise ValueError(
            f"Adapter with name '{adapter_name}' already exists: {len(existing)} MaZO layer(s) of this model hold it "
            f"(e.g. '{next(iter(existing))}'). Adding it again would overwrite its delta and mask; choose another "
            f"adapter_name, or delete_adapter('{adapter_name}') first."
        )
