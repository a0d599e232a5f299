"""`MaZOModel`: walks a model, wraps the targeted linear layers in MaZO layers, and exposes the masks."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MaZOConfig
from .layer import Linear, MaZOLayer


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

    def _prepare_adapter_config(self, peft_config: MaZOConfig, model_config: dict) -> MaZOConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _prepare_model(self, peft_config: MaZOConfig, model: nn.Module) -> None:
        """Check every targeted module before any is replaced, so a bad config leaves the model untouched."""
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
            return
        adapted = [key + "." for key, module in model.named_modules() if isinstance(module, MaZOLayer)]
        for key, module in model.named_modules():
            if not key or isinstance(module, MaZOLayer) or key.startswith(tuple(adapted)):
                continue
            matched = self._check_target_module_exists(peft_config, key)
            if not matched or isinstance(matched, _ExcludedModule):
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

    # ----------------------------------------------------------------------------------------------------------------
    # masks
    # ----------------------------------------------------------------------------------------------------------------
    def _mazo_layers(self) -> dict[str, MaZOLayer]:
        """Adapted modules by name (names as in the base model, e.g. 'model.layers.0.self_attn.q_proj')."""
        return {name: module for name, module in self.model.named_modules() if isinstance(module, MaZOLayer)}

    def _resolve_adapter(self, adapter_name: Optional[str]) -> str:
        adapter_name = adapter_name if adapter_name is not None else self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No MaZO adapter named '{adapter_name}'; existing: {sorted(self.peft_config)}.")
        return adapter_name

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
        layers = self._mazo_layers()
        unknown = sorted(set(masks) - {n for n, layer in layers.items() if adapter_name in layer.mazo_k})
        if unknown:
            raise ValueError(
                f"set_masks got modules without a MaZO adapter '{adapter_name}': {unknown[:5]}. Use the names "
                "returned by get_masks()."
            )
        from .mask import check_row_counts, dense_to_indices

        columns = {}
        for name, mask in masks.items():
            layer = layers[name]
            if not layer.is_masked(adapter_name):
                raise ValueError(
                    f"Adapter '{adapter_name}' of '{name}' was created with scorer='none' and has no mask to set; "
                    "create the adapter with another scorer."
                )
            expected = (layer.out_features, layer.in_features)
            if tuple(mask.shape) != expected:
                raise ValueError(f"mask of '{name}' must have shape {expected}, got {tuple(mask.shape)}.")
            check_row_counts(mask, layer.mazo_k[adapter_name], name=f"mask of '{name}'")
            if not reset and layer.delta_is_nonzero(adapter_name):
                raise ValueError(
                    f"Adapter '{adapter_name}' of '{name}' already has a non-zero delta; changing its mask would "
                    "silently change the trained adapter. Pass reset=True to zero the delta and set the masks."
                )
            columns[name] = dense_to_indices(mask)
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
