"""The MaZO layer: a frozen linear base plus a masked delta (dense or LoRA), forward, merge and unmerge.

Shapes, for a base weight `W` of shape (out, in) and `k` kept entries per row:

- dense mode (`r = 0`): trainable `mazo_values[a]` (out, k) and buffer `mazo_columns[a]` (out, k) int16/int32, the
  kept columns of each row; the delta is `ΔW ⊙ M`, i.e. `ΔW[i, columns[i, j]] = values[i, j]`.
- LoRA mode (`r > 0`): trainable `mazo_A[a]` (r, in), `mazo_B[a]` (out, r) and buffer `mazo_bits[a]`
  (out, ceil(in / 8)) uint8, the bit-packed mask; the delta is `(lora_alpha / r) · (B A) ⊙ M`.
- with `scorer="none"` there is no mask buffer: the dense delta is (out, in) values, the LoRA delta is unmasked.

Every adapter also stores `mazo_shape[a]` = [out, in], so that loading onto a base of other shapes fails clearly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import kernels
from . import mask as mask_ops
from .backends import dispatch_backend
from .checkpoint import BUFFER_KINDS, LayerSpec, check_saved_layer
from .config import MaZOConfig
from .quantized import keep_standard_4bit_layout
from .scorers import get_scorer


MIXED_BATCH_ERROR = (
    "MaZO does not support mixed adapter batches (`adapter_names=`, one adapter per example): every example runs "
    "with the active adapter(s). Run one forward per adapter instead: model.set_adapter(name) for each sub-batch, "
    "and `with model.disable_adapter():` for the '__base__' examples."
)
_WARNED_RANKS: set[int] = set()  # LoRA ranks already warned about (r larger than a layer's rank): warn once per r


class MaZOLayer(BaseTunerLayer):
    """Adapter state and mask bookkeeping shared by all MaZO layers (see the module docstring for shapes)."""

    adapter_layer_names = ("mazo_values", "mazo_A", "mazo_B")
    other_param_names = ("mazo_columns", "mazo_bits", "mazo_shape", "mazo_k", "mazo_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mazo_values = nn.ParameterDict({})
        self.mazo_A = nn.ParameterDict({})
        self.mazo_B = nn.ParameterDict({})
        self.mazo_columns = BufferDict({}, persistent=True)
        self.mazo_bits = BufferDict({}, persistent=True)
        self.mazo_shape = BufferDict({}, persistent=True)
        self.mazo_k: dict[str, int] = {}
        self.mazo_scaling: dict[str, float] = {}
        self.mazo_mask_pending: set[str] = set()  # adapters whose data-driven mask is not computed yet
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.in_features = base.in_features
        self.out_features = base.out_features
        keep_standard_4bit_layout(base)
        self.base_backend = dispatch_backend(base)  # how to read, run and merge this kind of base layer
        self._register_load_state_dict_pre_hook(self._check_loaded_adapter, with_module=False)

    # ----------------------------------------------------------------------------------------------------------------
    # creation and masks
    # ----------------------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MaZOConfig, module_key: str = "", **kwargs: Any) -> None:
        """Create adapter `adapter_name`: its trainable delta and a data-free mask (see `initial_mask_scores`)."""
        out_features, in_features = self.out_features, self.in_features
        if config.r > min(out_features, in_features) and config.r not in _WARNED_RANKS:
            _WARNED_RANKS.add(config.r)
            warnings.warn(
                f"MaZOConfig r = {config.r} exceeds the rank of layer '{module_key or adapter_name}' ({out_features} "
                f"x {in_features}, rank at most {min(out_features, in_features)}), and maybe of others: B A cannot use "
                "the extra rank, which only adds trainable values (and ZO noise). Use r <= the smallest adapted "
                "layer width, or exclude the narrow layers from target_modules.",
                UserWarning,
                stacklevel=2,
            )
        device = self.get_base_layer().weight.device
        dtype = config.torch_delta_dtype
        scorer = get_scorer(config.scorer)
        masked = scorer.masked
        k = config.kept_per_row(in_features)
        self.mazo_k[adapter_name] = k
        self.mazo_shape[adapter_name] = torch.tensor([out_features, in_features], dtype=torch.int64, device=device)

        if config.r == 0:
            values = torch.zeros(out_features, k, dtype=dtype, device=device)
            if not config.init_weights:
                values.normal_(0.0, 0.02)
            self.mazo_values[adapter_name] = nn.Parameter(values)
        else:
            self.mazo_scaling[adapter_name] = float(config.lora_alpha) / config.r
            lora_a = torch.empty(config.r, in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_b = torch.zeros(out_features, config.r, dtype=dtype, device=device)
            if not config.init_weights:
                nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            self.mazo_A[adapter_name] = nn.Parameter(lora_a)
            self.mazo_B[adapter_name] = nn.Parameter(lora_b)

        if scorer.needs_data:  # until compute_importance runs
            self.mazo_mask_pending.add(adapter_name)
        if masked and device.type != "meta":
            scores = self.initial_mask_scores(config, module_key)
            self._store_columns(adapter_name, mask_ops.topk_columns(scores, k))
        elif masked:  # empty weights (low_cpu_mem_usage): the mask is loaded from the checkpoint
            self._store_columns(adapter_name, torch.zeros(out_features, k, dtype=torch.int64, device=device))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def initial_mask_scores(self, config: MaZOConfig, module_key: str) -> torch.Tensor:
        """Data-free (out, in) scores for a new adapter's mask: its scorer's `initial_scores` (`peft_mazo.scorers`).

        "random": uniform scores seeded by `mask_seed` and the module's name. Every other scorer starts from |W|
        (row-wise magnitude); "mazo" and "wanda" need calibration data and replace it in `compute_importance`.
        """
        return get_scorer(config.scorer).initial_scores(self.get_base_layer(), config, module_key)

    def _store_columns(self, adapter_name: str, columns: torch.Tensor) -> None:
        """Store the (out, k) kept columns in the adapter's compact form."""
        device = self.mazo_shape[adapter_name].device
        if adapter_name in self.mazo_values:
            self.mazo_columns[adapter_name] = columns.to(device=device, dtype=mask_ops.index_dtype(self.in_features))
        else:
            self.mazo_bits[adapter_name] = mask_ops.pack_bits(
                mask_ops.indices_to_dense(columns.to(device), self.in_features)
            )

    def is_masked(self, adapter_name: str) -> bool:
        """False when the adapter has no mask (`scorer="none"`)."""
        return adapter_name in self.mazo_columns or adapter_name in self.mazo_bits

    def get_mask(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) bool mask of `adapter_name`, materialized on demand (all ones without a mask)."""
        if adapter_name in self.mazo_columns:
            return mask_ops.indices_to_dense(self.mazo_columns[adapter_name], self.in_features)
        if adapter_name in self.mazo_bits:
            return mask_ops.unpack_bits(self.mazo_bits[adapter_name], self.in_features)
        device = self.mazo_shape[adapter_name].device
        return torch.ones(self.out_features, self.in_features, dtype=torch.bool, device=device)

    def check_mask_columns(
        self, adapter_name: str, columns: torch.Tensor, reset: bool = False, name: str = ""
    ) -> None:
        """Raise `ValueError` unless `columns` can become the mask of `adapter_name`: the adapter has a mask, the
        (out, k) kept columns are valid, and the delta is zero (or `reset=True`, which will zero it)."""
        where = f" of '{name}'" if name else ""
        if not self.is_masked(adapter_name):
            raise ValueError(
                f"Adapter '{adapter_name}'{where} was created with scorer='none' and has no mask to set; create it "
                "with another scorer."
            )
        expected = (self.out_features, self.mazo_k[adapter_name])
        if tuple(columns.shape) != expected:
            raise ValueError(f"mask columns must have shape (out, k) = {expected}, got {tuple(columns.shape)}.")
        mask_ops.check_columns(columns, self.in_features, name=f"mask{where}")
        if not reset and self.delta_is_nonzero(adapter_name):
            raise ValueError(
                f"Adapter '{adapter_name}'{where} already has a non-zero delta; changing its mask would silently "
                "change the trained adapter. Pass reset=True to zero the delta and set the mask."
            )

    def set_mask_columns(self, adapter_name: str, columns: torch.Tensor, reset: bool = False) -> None:
        """Replace the mask of `adapter_name` by the (out, k) kept `columns` of every row.

        Refuses (ValueError, see `check_mask_columns`) while the adapter's delta is non-zero, since that would silently
        change a trained adapter, unless `reset=True`, which sets the delta back to zero (the identity).
        """
        self.check_mask_columns(adapter_name, columns, reset=reset)
        if self.delta_is_nonzero(adapter_name):
            self.reset_delta(adapter_name)
        self._store_columns(adapter_name, columns)
        self.mazo_mask_pending.discard(adapter_name)

    def delta_is_nonzero(self, adapter_name: str) -> bool:
        """True when the adapter currently changes the layer (dense values or LoRA B not all zero)."""
        trainable = self.mazo_values if adapter_name in self.mazo_values else self.mazo_B
        return bool(trainable[adapter_name].detach().any())

    @torch.no_grad()
    def reset_delta(self, adapter_name: str) -> None:
        """Set the adapter's delta to zero (dense values or LoRA B), so that it is the identity again."""
        trainable = self.mazo_values if adapter_name in self.mazo_values else self.mazo_B
        trainable[adapter_name].zero_()

    # ----------------------------------------------------------------------------------------------------------------
    # the delta
    # ----------------------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) delta `ΔW ⊙ M` of `adapter_name`, in the adapter's dtype (differentiable)."""
        if adapter_name in self.mazo_values:
            values = self.mazo_values[adapter_name]
            if adapter_name not in self.mazo_columns:
                return values
            delta = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
            return delta.scatter(1, self.mazo_columns[adapter_name].long(), values)
        bits = self.mazo_bits[adapter_name] if adapter_name in self.mazo_bits else None
        return kernels.lora_delta_reference(
            self.mazo_B[adapter_name],
            self.mazo_A[adapter_name],
            bits,
            self.mazo_scaling[adapter_name],
            self.in_features,
        )

    def _add_delta(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`weight + ΔW ⊙ M`, summed in the adapter's dtype and rounded once to `weight.dtype`.

        Dense masked mode touches only the k kept entries of each row; LoRA mode forms `B A` tile by tile. On CUDA both
        run as one Triton kernel that reads `weight` once and writes the result once (`peft_mazo.kernels`, same
        semantics as its `*_reference` functions, which run on CPU and as the fallback).
        """
        if adapter_name in self.mazo_columns:
            return kernels.compose_dense_weight(
                weight, self.mazo_columns[adapter_name], self.mazo_values[adapter_name]
            )
        if adapter_name in self.mazo_values:  # unmasked dense delta (scorer="none"): (out, in) values
            return kernels.compose_full_weight_reference(weight, self.mazo_values[adapter_name])
        bits = self.mazo_bits[adapter_name] if adapter_name in self.mazo_bits else None
        return kernels.compose_lora_weight(
            weight, self.mazo_B[adapter_name], self.mazo_A[adapter_name], bits, self.mazo_scaling[adapter_name]
        )

    # ----------------------------------------------------------------------------------------------------------------
    # peft plumbing
    # ----------------------------------------------------------------------------------------------------------------
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: a MaZO delta is additive (`W + ΔW ⊙ M`), so peft's `convert_to_lora` can approximate it by a
        truncated SVD of `get_delta_weight` (exact at full rank; the mask is not kept as such)."""
        return True

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's deletion (the adapter's tensors and records, a new active adapter if needed), plus the adapter's
        pending-mask flag, which would otherwise outlive it (ZOSGD's warning and `shard_base` read that flag)."""
        super().delete_adapter(adapter_name)
        self.mazo_mask_pending.discard(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the adapter to the base layer's device, keeping its own dtype (the delta never becomes bf16)."""
        device = device if device is not None else self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for name in self.adapter_layer_names + ("mazo_columns", "mazo_bits", "mazo_shape"):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)

    def saved_spec(self, adapter_name: str) -> LayerSpec:
        """What a saved `adapter_name` of this layer holds: the weight shape, k, the LoRA rank (0: dense), a mask."""
        r = self.mazo_A[adapter_name].shape[0] if adapter_name in self.mazo_A else 0
        return LayerSpec(
            (self.out_features, self.in_features), self.mazo_k[adapter_name], r, self.is_masked(adapter_name)
        )

    def saved_buffers(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The buffers `adapter_name` saves, by kind: its mask (`mazo_columns` or `mazo_bits`) and `mazo_shape`."""
        return {
            kind: getattr(self, kind)[adapter_name] for kind in BUFFER_KINDS if adapter_name in getattr(self, kind)
        }

    def _check_loaded_adapter(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Before loading: refuse a checkpoint made for another weight shape, another k, or with a broken mask."""
        module = prefix.rstrip(".") or "<root>"
        for adapter_name in list(self.mazo_shape.keys()):
            keys = {kind: f"{prefix}{kind}.{adapter_name}" for kind in ("mazo_shape", "mazo_columns", "mazo_bits")}
            present = {kind: state_dict[key] for kind, key in keys.items() if key in state_dict}
            if "mazo_columns" in present or "mazo_bits" in present:
                self.mazo_mask_pending.discard(adapter_name)  # a saved mask is being loaded
            check_saved_layer(
                f"MaZO adapter '{adapter_name}'",
                module,
                {kind: tuple(tensor.shape) for kind, tensor in present.items()},
                present.__getitem__,
                (self.out_features, self.in_features),
                self.mazo_k[adapter_name],
                fixes=(
                    "Load the adapter onto the base model it was trained on.",
                    "Use the adapter_config.json saved with these weights.",
                    "",
                ),
                mask_name=f"mask of '{module}' (adapter '{adapter_name}')",
            )


class Linear(nn.Module, MaZOLayer):
    """MaZO on a linear base: `torch.nn.Linear`, bitsandbytes `Linear4bit` or `Linear8bitLt`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MaZOConfig, module_key: str = "") -> None:
        super().__init__()
        MaZOLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key=module_key)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`y = x (W + Σ_a ΔW_a ⊙ M_a)ᵀ + bias` for the active adapters; x (..., in) -> y (..., out).

        How depends on the base (`self.base_backend`, see `peft_mazo.backends`): full-precision and 4-bit bases compose
        the effective weight (one layer's worth, transiently) and apply it in one matmul; 8-bit bases add `x ΔWᵀ` to
        bitsandbytes' int8 output.
        """
        if kwargs.get("adapter_names") is not None:
            raise ValueError(MIXED_BATCH_ERROR)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = [name for name in self.active_adapters if name in self.mazo_k]
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)

        return self.base_backend.forward(self, x, adapters, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas of `adapter_names` (default: the active ones) into the base weight.

        Args:
            safe_merge (`bool`): compute the merged weight in a copy and raise if it is not finite.
            adapter_names (`list[str]`, *optional*): adapters to merge.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.mazo_k:
                continue
            with torch.no_grad():
                backend = self.base_backend
                if backend.quantized:  # the dequantized weight in the delta's dtype, requantized after
                    delta = self.get_delta_weight(name)
                    merged = backend.read_weight(base).to(delta.dtype) + delta
                else:
                    merged = self._add_delta(backend.read_weight(base), name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken.")
                backend.write_weight(base, merged)
                self.base_backend = dispatch_backend(base)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again (exact up to rounding)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.mazo_k:
                continue
            with torch.no_grad():
                delta = self.get_delta_weight(name)
                weight = self.base_backend.read_weight(base)
                self.base_backend.write_weight(base, (weight.to(delta.dtype) - delta).to(weight.dtype))
                self.base_backend = dispatch_backend(base)

    def __repr__(self) -> str:
        return "mazo." + super().__repr__()


# ---------------------------------------------------------------------------------------------------------------------
# finding MaZO layers in a model (used by the tuner and by the mask search, which so need not import the tuner)
# ---------------------------------------------------------------------------------------------------------------------
def mazo_tuner(model: nn.Module, caller: str = "This") -> BaseTuner:
    """The MaZO tuner of `model`: `model` itself or its `base_model` (a `PeftModel`'s), recognised as a peft
    `BaseTuner` whose adapters are all `MaZOConfig`s. `TypeError` with the fix otherwise."""
    for candidate in (model, getattr(model, "base_model", None)):
        configs = getattr(candidate, "peft_config", None)
        if isinstance(candidate, BaseTuner) and configs and all(isinstance(c, MaZOConfig) for c in configs.values()):
            return candidate
    raise TypeError(
        f"{caller} needs a model with a MaZO adapter, got {type(model).__name__}. Wrap it first: "
        "model = peft.get_peft_model(model, peft_mazo.MaZOConfig(...))."
    )


def mazo_layers(tuner: BaseTuner) -> dict[str, MaZOLayer]:
    """The tuner's adapted modules by name (names as in the base model, e.g. 'model.layers.0.self_attn.q_proj')."""
    return {name: module for name, module in tuner.model.named_modules() if isinstance(module, MaZOLayer)}


def resolve_adapter(tuner: BaseTuner, adapter_name: Optional[str]) -> str:
    """`adapter_name`, or the tuner's first active adapter when None; `ValueError` naming the existing ones."""
    adapter_name = adapter_name if adapter_name is not None else tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No MaZO adapter named '{adapter_name}'; existing: {sorted(tuner.peft_config)}.")
    return adapter_name


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # not in state-dict keys


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, MaZOLayer]:
    """The MaZO layers of `model` that hold adapter `adapter_name`, by their names in `model.state_dict()` (found by
    visiting the layers, not by matching names; FSDP and activation-checkpointing wrappers left out of the names, as
    `state_dict()` leaves them out)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MaZOLayer) and adapter_name in module.mazo_k:
            for segment in _WRAPPER_SEGMENTS:
                name = name.replace(segment, "")
            layers[name] = module
    return layers
