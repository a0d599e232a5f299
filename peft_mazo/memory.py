"""Predicted memory per GPU of MaZO ZO training with the base sharded by FSDP2 (`peft_mazo.sharding.shard_base`).

A prediction from the model's shapes, not a measurement (docs/distributed.md has the table for Llama-2-7B and 70B;
`benchmarks/fsdp_memory.py` writes it). Notation: W GPUs, e bytes per base value (2 for bf16), d bytes per adapter value
(4: float32), L decoder layers, hidden h, MLP width I, H query heads and KV key/value heads of width hd, vocabulary V;
b rows of s tokens per GPU, P positions whose logits are computed (`logits_to_keep`; s by default). Terms:

- `base_shard`: every base parameter (embeddings, the seven projections and two norms of every layer, the final norm,
  the LM head unless tied) as FSDP2 stores it: a dim-0 shard of `ceil(dim0 / W)` rows (padded), times e. W = 1 means
  one GPU without FSDP: the whole base.
- `base_gathered`: the all-gathered (unsharded) units during the forward: the root unit (the final norm; the embeddings
  and head too when tied), held for the whole forward, plus two of the largest unit (the one computing and the next
  one being all-gathered), each at its padded full size, times e. 0 for W = 1.
- `adapter`: the trainable tensors of the seven projections of every layer, replicated on every GPU: dense
  `out · k` values (k = `ceil((1 - sparsity) · in)`, or in without a mask), LoRA `r · (in + out)`, times d.
- `masks`: dense: the (out, k) kept columns, int16 (int32 when in ≥ 32768); LoRA: the (out, ceil(in / 8)) packed bits;
  no mask with `scorer="none"`; plus 16 bytes (`mazo_shape`) per adapted layer. Replicated.
- `zo_buffers`: `ZOSGD`'s extra copies. Eager mode: z and θ ± εz of the whole trainable state (2 × adapter). Lazy mode:
  one adapted layer's z / perturbed copy at a time (the largest layer's trainable bytes). "auto" picks eager while
  2 × adapter ≤ `ZOSGD`'s `EAGER_MAX_BYTES` (1 GiB), as the optimizer does.
- `momentum`: one buffer of the trainable state's size when momentum > 0, else 0.
- `composed_weight`: the effective weight `W + ΔW ⊙ M` of one adapted layer, composed transiently in its forward (the
  largest, out · in · e).
- `activations`: the largest live set of one decoder layer's no-grad forward, the larger of the MLP's
  `b·s·(2h + 3I)·e` (residual, normed input, act(gate), up and their product) and the attention's
  `b·s·(2h + 5·H·hd)·e` (residual, normed input, q, k, v (after repeat for GQA), rotated q, output; SDPA/flash, no
  s × s scores).
- `logits`: the head's live set, `b·P·V·(e + 8) + b·s·h·e`: the logits in the base dtype, their float32 copy and the
  float32 log-softmax of the cross-entropy, and the final hidden states.

`total` = base_shard + base_gathered + adapter + masks + zo_buffers + momentum + max(composed_weight + activations,
logits): the decoder layers and the head run one after the other, so their transient sets do not add up. On one H200
(W = 1, Llama-2-7B, bf16, 16 × 512, `benchmarks/results/zo_step_h200_bf16_16x512.json`) this gives 20.07 GB for MaZO
dense ρ = 0.9 and 17.62 GB for LoRA r = 64 ρ = 0.8 against 20.09 and 17.68 GB measured (`torch.cuda.max_memory_allocated`).

Not included: the CUDA context and the allocator's cache and fragmentation (typically 0.5 to 2 GiB), NCCL's buffers,
a KV cache (pass `use_cache=False` in the closures: a forward with the default `use_cache=True` keeps
`2·L·b·s·KV·hd·e` bytes of keys and values), and the input tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

import torch

from .mask import index_dtype, kept_per_row
from .scorers import get_scorer
from .zo.perturbation import EAGER_MAX_BYTES


@dataclass(frozen=True)
class ModelShapes:
    """The shapes of a Llama-style decoder (what the prediction needs of a config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """From a transformers config (`LlamaConfig` and alike) or a dict with the same keys."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = int(get("num_attention_heads"))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or 0),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of the seven projections of one decoder layer (the adapted layers of "all-linear")."""
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_width, self.num_kv_heads * self.head_width
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (inter, h),
            "up_proj": (inter, h),
            "down_proj": (h, inter),
        }

    def units(self) -> dict[str, list[tuple[int, ...]]]:
        """The base's parameter shapes grouped as `shard_base` groups them: one unit per decoder layer, the input
        embeddings, the head (unless tied) and the root (the final norm; the tied embeddings)."""
        h = self.hidden_size
        layer = list(self.layer_linears().values()) + [(h,), (h,)]
        embed = [(self.vocab_size, h)]
        units: dict[str, list[tuple[int, ...]]] = {f"layer{i}": list(layer) for i in range(self.num_layers)}
        if self.tie_word_embeddings:
            units["root"] = embed + [(h,)]
        else:
            units.update(embed=embed, lm_head=[(self.vocab_size, h)], root=[(h,)])
        return units

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for unit in self.units().values() for shape in unit)


LLAMA2_7B = ModelShapes(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
)
LLAMA2_70B = ModelShapes(
    vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8
)


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted bytes per GPU, by term (see the module docstring for each formula)."""

    world_size: int
    perturbation: str  # the resolved mode: "eager" or "lazy"
    base_shard: int
    base_gathered: int
    adapter: int
    masks: int
    zo_buffers: int
    momentum: int
    composed_weight: int
    activations: int
    logits: int

    @property
    def persistent(self) -> int:
        """Bytes held for the whole step: the base shard, the all-gathered units, the adapter, masks and buffers."""
        return self.base_shard + self.base_gathered + self.adapter + self.masks + self.zo_buffers + self.momentum

    @property
    def total(self) -> int:
        """The predicted peak: `persistent + max(composed_weight + activations, logits)`."""
        return self.persistent + max(self.composed_weight + self.activations, self.logits)

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), persistent=self.persistent, total=self.total)


def _bytes_of(dtype: Union[str, torch.dtype]) -> int:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dtype).element_size()


def _shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of one rank's (padded) FSDP2 shard of a tensor: `ceil(dim0 / W)` rows."""
    rows = -(-shape[0] // world_size)
    return rows * math.prod(shape[1:])


def adapter_numel(shapes: ModelShapes, r: int, sparsity: float, scorer: str = "mazo") -> dict[str, int]:
    """Trainable values of one decoder layer's adapter, per projection."""
    out = {}
    for name, (out_features, in_features) in shapes.layer_linears().items():
        if r > 0:
            out[name] = r * (in_features + out_features)
        else:
            k = kept_per_row(in_features, sparsity) if get_scorer(scorer).masked else in_features
            out[name] = out_features * k
    return out


def mask_bytes(shapes: ModelShapes, r: int, sparsity: float, scorer: str = "mazo") -> int:
    """Bytes of one decoder layer's mask buffers (the columns or the packed bits, and `mazo_shape`)."""
    total = 0
    for out_features, in_features in shapes.layer_linears().values():
        total += 16  # mazo_shape: two int64
        if not get_scorer(scorer).masked:
            continue
        if r > 0:
            total += out_features * -(-in_features // 8)
        else:
            k = kept_per_row(in_features, sparsity)
            total += out_features * k * torch.empty((), dtype=index_dtype(in_features)).element_size()
    return total


def predict_memory_per_gpu(
    shapes: Union[ModelShapes, Any],
    world_size: int,
    *,
    dtype: Union[str, torch.dtype] = "bfloat16",
    r: int = 0,
    sparsity: float = 0.9,
    scorer: str = "mazo",
    delta_dtype: Union[str, torch.dtype] = "float32",
    batch_per_gpu: int = 1,
    seq_len: int = 512,
    logit_positions: int | None = None,
    perturbation: Literal["auto", "eager", "lazy"] = "auto",
    momentum: bool = False,
) -> MemoryPrediction:
    """Predicted bytes per GPU of a ZO step with the base sharded over `world_size` GPUs (module docstring: formulas).

    Args:
        shapes (`ModelShapes`, a transformers config or a dict of its keys): the model (`LLAMA2_7B`, `LLAMA2_70B`).
        world_size (`int`): GPUs sharing the base; 1 is one GPU without FSDP.
        dtype: the base's dtype (default bf16).
        r, sparsity, scorer, delta_dtype: the `MaZOConfig` (adapter on the seven projections of every layer).
        batch_per_gpu, seq_len (`int`): rows and tokens per row of each GPU's share of the step's batch.
        logit_positions (`int`, *optional*): positions whose logits are computed per row (default: `seq_len`).
        perturbation (`str`): `ZOSGD`'s mode ("auto" resolves as the optimizer does).
        momentum (`bool`): whether `ZOSGD` keeps a momentum buffer.

    Returns:
        `MemoryPrediction` (bytes per term, `.total`, `.as_dict()`).
    """
    if not isinstance(shapes, ModelShapes):
        shapes = ModelShapes.from_config(shapes)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    if perturbation not in ("auto", "eager", "lazy"):
        raise ValueError(f"perturbation must be 'auto', 'eager' or 'lazy', got {perturbation!r}.")
    e, d = _bytes_of(dtype), _bytes_of(delta_dtype)
    units = shapes.units()
    sharded = world_size > 1
    base_shard = e * sum(
        _shard_numel(s, world_size) if sharded else math.prod(s) for unit in units.values() for s in unit
    )
    gathered = 0
    if sharded:
        full = {name: world_size * sum(_shard_numel(s, world_size) for s in unit) for name, unit in units.items()}
        gathered = e * (full["root"] + 2 * max(size for name, size in full.items() if name != "root"))

    per_layer = adapter_numel(shapes, r, sparsity, scorer)
    adapter = d * shapes.num_layers * sum(per_layer.values())
    masks = shapes.num_layers * mask_bytes(shapes, r, sparsity, scorer)
    mode = perturbation
    if mode == "auto":
        mode = "eager" if 2 * adapter <= EAGER_MAX_BYTES else "lazy"
    zo_buffers = 2 * adapter if mode == "eager" else d * max(per_layer.values())
    composed = e * max(o * i for o, i in shapes.layer_linears().values())

    b, s, h = batch_per_gpu, seq_len, shapes.hidden_size
    mlp = b * s * (2 * h + 3 * shapes.intermediate_size) * e
    attention = b * s * (2 * h + 5 * shapes.num_heads * shapes.head_width) * e
    positions = seq_len if logit_positions is None else logit_positions
    logits = b * positions * shapes.vocab_size * (e + 8) + b * s * h * e
    return MemoryPrediction(
        world_size=world_size,
        perturbation=mode,
        base_shard=base_shard,
        base_gathered=gathered,
        adapter=adapter,
        masks=masks,
        zo_buffers=zo_buffers,
        momentum=adapter if momentum else 0,
        composed_weight=composed,
        activations=max(mlp, attention),
        logits=logits,
    )
