"""`MaZOModel`: walks a model, wraps the targeted linear layers in MaZO layers, and exposes the masks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._inputs import install_input_check, remove_input_check
from .config import MaZOConfig
from .layer import MIXED_BATCH_ERROR, Linear, MaZOLayer, check_saved_layer, mazo_layers, resolve_adapter
from .quantized import quantization_kind
from .scorers import get_scorer


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
        """Check every targeted module (and, when loading, the saved weights) before any is replaced, so that a bad
        config or an adapter saved for another base model leaves the model untouched."""
        _check_saved_adapter(peft_config, model)
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

    def inject_adapter(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        """peft's injection, then a check of the token inputs of every forward of the base model
        (`_inputs.install_input_check`: no `input_ids`, non-integer ids, or, for CPU tensors, ids outside the vocabulary
        raise a `ValueError` naming the fix instead of failing inside the embedding)."""
        super().inject_adapter(model, *args, **kwargs)
        install_input_check(model)

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


# ----------------------------------------------------------------------------------------------------------------------
# loading: the saved weights against the base model, before anything is replaced
# ----------------------------------------------------------------------------------------------------------------------
_SAVED_PREFIX = "base_model.model."


def _check_saved_adapter(config: MaZOConfig, model: nn.Module) -> None:
    """Raise `ValueError` when the adapter being loaded (`config._mazo_source_dir`, set by
    `MaZOConfig.from_pretrained`) does not fit `model` or its own `adapter_config.json`.

    Checked from the safetensors file before any layer is replaced: module names (another architecture), weight shapes
    (a model of other sizes), the rank and the kept entries per row against the config (an edited config), and the
    mask's k-entries-per-row invariant (an edited mask). Only tensor headers are read, plus the masks one at a time.
    """
    source = getattr(config, "_mazo_source_dir", None)
    path = Path(source) / "adapter_model.safetensors" if source else None
    if path is None or not path.is_file():
        return
    from safetensors import safe_open

    where = f"The MaZO adapter in {source}"
    fix_base = "Load it onto the base model it was trained on"
    if config.base_model_name_or_path:
        fix_base += f" ({config.base_model_name_or_path})"
    fix_config = "Use the adapter_config.json saved with these weights (or save the adapter again)."
    fix_mask = (
        "The mask file was edited or damaged: restore the adapter from its original save, or recompute the mask "
        "(compute_importance) and save it again."
    )
    modules = dict(model.named_modules())
    try:
        handle_context = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors' SafetensorError: a truncated or corrupted file
        raise ValueError(
            f"Cannot read {path}: {error}. The adapter file is damaged or incomplete (an interrupted copy or save?): "
            "copy it again or save the adapter again."
        ) from None
    with handle_context as handle:
        saved: dict[str, dict[str, str]] = {}
        for key in handle.keys():
            name, _, kind = key.rpartition(".")
            if kind.startswith("mazo_"):
                saved.setdefault(name.removeprefix(_SAVED_PREFIX), {})[kind] = key
        missing = sorted(name for name in saved if name not in modules)
        if missing:
            raise ValueError(
                f"{where} has weights for {len(missing)} module(s) that this {type(model).__name__} does not have "
                f"(e.g. '{missing[0]}'): it was saved for a model of another architecture or depth. {fix_base}."
            )
        targeted = [
            n
            for n, m in modules.items()
            if isinstance(m, (nn.Linear, BaseTunerLayer)) and n not in saved and check_target_module_exists(config, n)
        ]
        if targeted and saved:
            raise ValueError(
                f"{where} has no weights for {len(targeted)} layer(s) that its adapter_config.json targets (e.g. "
                f"'{targeted[0]}'): loading it would leave their delta at zero. The file is incomplete; save the "
                "adapter again."
            )
        masked = get_scorer(config.scorer).masked
        needed = (("mazo_values",) if config.r == 0 else ("mazo_A", "mazo_B")) + (
            (("mazo_columns",) if config.r == 0 else ("mazo_bits",)) if masked else ()
        )
        for name in [n for n in modules if n in saved]:  # in the model's order
            kinds = saved[name]
            module = modules[name]
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"{where} adapts '{name}' as a linear layer, but this model's '{name}' is a "
                    f"{type(base).__name__}: the adapter was saved for another architecture. {fix_base}."
                )
            out_features, in_features = base.out_features, base.in_features
            k = config.kept_per_row(in_features)
            shapes = {kind: tuple(handle.get_slice(key).get_shape()) for kind, key in kinds.items()}
            check_saved_layer(
                where,
                name,
                shapes,
                lambda kind, kinds=kinds: handle.get_tensor(kinds[kind]),
                (out_features, in_features),
                k,
                fixes=(f"{fix_base}.", fix_config, fix_mask),
                mask_name=f"mask of '{name}' in {path}",
            )
            if config.r == 0 and ("mazo_A" in shapes or "mazo_B" in shapes):
                raise ValueError(
                    f"{where} holds LoRA weights (mazo_A, mazo_B) for '{name}', but its adapter_config.json says "
                    f"r = 0 (dense). {fix_config}"
                )
            if config.r > 0 and "mazo_values" in shapes:
                raise ValueError(
                    f"{where} holds a dense delta (mazo_values) for '{name}', but its adapter_config.json says "
                    f"r = {config.r} (LoRA). {fix_config}"
                )
            if "mazo_A" in shapes and shapes["mazo_A"] != (config.r, in_features):
                raise ValueError(
                    f"{where} was saved with LoRA rank r = {shapes['mazo_A'][0]} ('{name}'.mazo_A has shape "
                    f"{shapes['mazo_A']}), but its adapter_config.json says r = {config.r}. {fix_config}"
                )
            if "mazo_B" in shapes and shapes["mazo_B"] != (out_features, config.r):
                raise ValueError(
                    f"{where} was saved with '{name}'.mazo_B of shape {shapes['mazo_B']}, but r = {config.r} and the "
                    f"layer's out_features = {out_features} need {(out_features, config.r)}. {fix_config}"
                )
            absent = [kind for kind in needed if kind not in kinds]
            if absent:
                raise ValueError(
                    f"{where} lacks {', '.join(absent)} of '{name}': loading it would leave that layer's delta or "
                    "mask undefined. The file is incomplete; save the adapter again."
                )
