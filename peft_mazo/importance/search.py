"""The mask search `compute_importance` (MAZO_SPEC §3): validation, calibration passes, per-task scores,
aggregation, top-k per row, and the `ImportanceReport`; the masks are written only after every layer has been scored.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed as _dist
from .._checks import is_finite_number, is_int
from .._inputs import check_token_inputs
from ..config import MaZOConfig
from ..layer import MaZOLayer, mazo_layers, mazo_tuner, resolve_adapter
from ..mask import index_dtype, topk_columns, topk_mask
from ..quantized import dense_weight
from ..scorers import Scorer, get_scorer
from ..scores import BLOCK_ELEMENTS, DEFAULT_DAMPING, DEFAULT_ETA, aggregate_scores
from .passes import TaskData, collect_task_vectors, grow_total, progress_bar, synchronize, take_batches
from .report import ImportanceReport, LayerTaskRecord


logger = logging.getLogger(__name__)


def compute_importance(
    model: nn.Module,
    calib_loaders: Optional[TaskData] = None,
    num_batches: Optional[int] = None,
    eta: Optional[float] = None,
    progress: bool = True,
    adapter_name: Optional[str] = None,
    reset: bool = False,
    *,
    damping: float = DEFAULT_DAMPING,
    max_stats_bytes: Optional[int] = None,
) -> ImportanceReport:
    """Choose the mask of every layer of a MaZO adapter from per-task importance scores (MAZO_SPEC §3).

    For `scorer="mazo"`, per task t and layer: g (mean input), H = XᵀX/N + λI, S_global (Cholesky solve), S_greedy,
    `S^t = norm(S_global) + α norm(S_greedy) + β norm(|W|)`; then `S = Σ_t norm(S^t)` and the top-k of every row
    (ties to the lower column index). `"wanda"` uses `|W_ij| · ‖X_j‖₂` per task with the same aggregation;
    `"magnitude"` and `"random"` need no data and recompute the adapter's data-free mask; `"none"` has no mask. What
    each scorer needs and computes is its entry in `peft_mazo.scorers.SCORERS`.

    Args:
        model (`nn.Module`): a `PeftModel` or `MaZOModel` holding the MaZO adapter.
        calib_loaders: `{task: loader}`, a sequence of `(task, loader)` pairs, or one loader (a single task). Each
            loader yields mappings accepted by `model(**batch)`; tokens where `attention_mask == 0` are ignored.
            The batches are taken once up front (they are small: token ids) and reused by every statistics window.
            Under `torch.distributed`, pass each rank its own shard (at least one batch per task on every rank): the
            statistics are summed over the ranks, and every rank writes the same mask.
        num_batches (`int`, *optional*): batches per task; None = the whole loader.
        eta (`float`, *optional*): learning rate η of the greedy score; default `DEFAULT_ETA` = 1e-7.
        progress (`bool`): one progress bar for the whole search (a step per forward pass and per scored layer);
            off as well when transformers' progress bars are (`transformers.utils.logging.disable_progress_bar()`,
            `HF_HUB_DISABLE_PROGRESS_BARS=1`) or `TQDM_DISABLE=1`.
        adapter_name (`str`, *optional*): defaults to the first active adapter.
        reset (`bool`): allow an adapter whose delta is non-zero: the delta is set to zero with the new mask.
            Without it, such an adapter is refused before any forward pass.
        damping (`float`): λ = damping · mean(diag(XᵀX / N)).
        max_stats_bytes (`int`, *optional*): budget for the statistics held at once (one window). Default: 1 GiB when
            the layer inputs are on CUDA, unlimited otherwise. More windows = more (partial) forward passes.

    Returns:
        `ImportanceReport`. The masks are written into the adapter only after every layer has been scored.
    """
    start = time.perf_counter()
    tuner = mazo_tuner(model, caller="compute_importance")
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    scorer = get_scorer(config.scorer)
    layers = {n: layer for n, layer in mazo_layers(tuner).items() if adapter_name in layer.mazo_k}
    if not layers:
        raise ValueError(f"MaZO adapter '{adapter_name}' adapts no layer; there is no mask to compute.")
    report = ImportanceReport(scorer=scorer.name, adapter_name=adapter_name, layers=list(layers))
    if not scorer.masked:
        logger.warning(
            "MaZO adapter '%s' uses scorer='none' (no mask): compute_importance has nothing to do.", adapter_name
        )
        return report
    eta = _positive("eta", DEFAULT_ETA if eta is None else eta)
    damping = _positive("damping", damping)
    if num_batches is not None and (not is_int(num_batches) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None (the whole loader), got {num_batches!r}.")
    if max_stats_bytes is not None:
        max_stats_bytes = _positive("max_stats_bytes", max_stats_bytes)
    _check_layers(layers, adapter_name, reset)
    report.settings = {"sparsity": config.sparsity, "num_batches": num_batches}

    if not scorer.needs_data:  # the adapter's data-free mask again (it may have been replaced with set_masks)
        if calib_loaders is not None:
            logger.info("scorer=%r is data-free: the calibration loaders are not used.", scorer.name)
        columns = {
            name: topk_columns(layer.initial_mask_scores(config, name), layer.mazo_k[adapter_name]).cpu()
            for name, layer in layers.items()
        }
        _write_masks(layers, columns, adapter_name, reset)
        report.total_seconds = time.perf_counter() - start
        logger.info(
            "MaZO mask (scorer=%s, data-free): %d layer(s) in %.1f s", scorer.name, len(layers), report.total_seconds
        )
        return report

    tasks = take_batches(calib_loaders, num_batches)
    for task, batches in tasks:  # token ids present, integer and within the vocabulary: before any forward pass
        for index, batch in enumerate(batches):
            check_token_inputs(tuner.model, (), batch, f"Task '{task}': calibration batch {index}", check_range=True)
    report.tasks = [task for task, _ in tasks]
    if _dist.is_distributed():  # every rank must run the same tasks: their statistics are summed over the ranks
        _dist.assert_same_on_all_ranks(
            (report.tasks, scorer.name), "compute_importance's calibration tasks and scorer"
        )
    if scorer.statistics == "moments":  # S_global and S_greedy: η, the damping, α and β apply
        report.settings.update({"eta": eta, "damping": damping, "alpha": config.alpha, "beta": config.beta})

    with progress_bar(progress, "MaZO mask search") as bar:
        grow_total(bar, len(layers))
        vectors, tokens, vector_seconds, groups, windows, passes = collect_task_vectors(
            tuner, layers, tasks, scorer, eta, damping, max_stats_bytes, bar, report.task_seconds
        )
        bar.set_postfix_str("scores")
        group_of = {name: group for group in groups for name in group.members}
        columns: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            group = group_of[name]
            k = layer.mazo_k[adapter_name]
            task_vectors = [(task, vectors[task][group.index]) for task in report.tasks]
            columns[name], overlaps, seconds = _score_layer(layer, k, task_vectors, scorer, config)
            for task in report.tasks:
                share = vector_seconds[task][group.index] / len(group.members)
                report.records.append(
                    LayerTaskRecord(
                        task=task,
                        layer=name,
                        tokens=tokens[task][group.index],
                        seconds=seconds[task] + share,
                        overlap=overlaps[task],
                        kept=layer.out_features * k,
                    )
                )
            bar.update(1)
    report.settings.update({"windows": windows, "forward_passes": passes})
    _write_masks(layers, columns, adapter_name, reset)
    report.total_seconds = time.perf_counter() - start
    logger.info(
        "MaZO mask search (scorer=%s): %d task(s), %d layer(s), %d forward pass(es) in %d statistics window(s): %.1f s",
        scorer.name,
        len(report.tasks),
        len(layers),
        passes,
        windows,
        report.total_seconds,
    )
    return report


def _positive(name: str, value: Any) -> Any:
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def _check_layers(layers: dict[str, MaZOLayer], adapter_name: str, reset: bool) -> None:
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} MaZO layer(s) are merged (e.g. '{merged[0]}'); call unmerge_adapter() before "
            "compute_importance."
        )
    if not reset:
        nonzero = [name for name, layer in layers.items() if layer.delta_is_nonzero(adapter_name)]
        if nonzero:
            raise ValueError(
                f"Adapter '{adapter_name}' already has a non-zero delta in {len(nonzero)} layer(s) (e.g. "
                f"'{nonzero[0]}'); a new mask would silently change the trained adapter. Pass reset=True to zero the "
                "delta and compute the mask."
            )


def _score_layer(
    layer: MaZOLayer,
    k: int,
    task_vectors: list[tuple[str, tuple[torch.Tensor, ...]]],
    scorer: Scorer,
    config: MaZOConfig,
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """Top-k columns of `S = Σ_t norm(S^t)` for one layer, in blocks of rows (every step is row-wise).

    Per block: `scorer.task_scores` gives each task's `S^t` in turn, `aggregate_scores` sums their row-normalised
    values (reading each task's own top-k on the way), and `topk_columns` chooses the kept columns.

    Returns:
        `(columns, overlaps, seconds)`: (out, k) kept columns on the CPU (index dtype), and per task the overlap of
        its own top-k set with the final mask and its wall time on this layer.
    """
    tasks = [task for task, _ in task_vectors]
    weight = dense_weight(layer.get_base_layer())
    out_features, in_features = weight.shape
    device = weight.device
    vectors = [tuple(v.to(device) for v in vecs) for _, vecs in task_vectors]
    rows = max(1, BLOCK_ELEMENTS // in_features)
    columns = torch.empty(out_features, k, dtype=index_dtype(in_features))
    hits = {task: torch.zeros((), dtype=torch.int64, device=device) for task in tasks}
    seconds = dict.fromkeys(tasks, 0.0)
    shared = 0.0
    own: dict[str, torch.Tensor] = {}  # each task's own top-k set, as a bool mask of the block
    mark = 0.0

    def read_task(t: int, normalised: torch.Tensor) -> None:
        """A task's own top-k set (for its overlap with the final mask) and its wall time since the previous task."""
        nonlocal mark
        if len(tasks) > 1:
            own[tasks[t]] = topk_mask(normalised, k)
        synchronize([device])
        now = time.perf_counter()
        seconds[tasks[t]] += now - mark
        mark = now

    for start in range(0, out_features, rows):
        begin = time.perf_counter()
        weight_abs = weight[start : start + rows].abs().float()
        task_scores = scorer.task_scores(weight_abs, vectors, config)
        mark = time.perf_counter()
        shared += mark - begin
        total = aggregate_scores(task_scores, each=read_task)
        begin = mark
        final = topk_columns(total, k)
        for task, chosen in own.items():
            hits[task] += chosen.gather(1, final).sum()
        own.clear()
        columns[start : start + rows] = final.to("cpu", dtype=columns.dtype)
        shared += time.perf_counter() - begin
    kept = out_features * k
    overlaps = {task: (int(hits[task]) / kept if len(tasks) > 1 else 1.0) for task in tasks}
    seconds = {task: value + shared / len(tasks) for task, value in seconds.items()}
    return columns, overlaps, seconds


def _write_masks(
    layers: dict[str, MaZOLayer], columns: dict[str, torch.Tensor], adapter_name: str, reset: bool
) -> None:
    for name, layer_columns in columns.items():
        layers[name].set_mask_columns(adapter_name, layer_columns, reset=reset)
