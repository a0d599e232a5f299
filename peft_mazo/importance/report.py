"""The report of a mask search: per task and layer, tokens seen, wall time and mask overlap, as a short table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class LayerTaskRecord:
    """What one task contributed to one layer's mask.

    Attributes:
        task (`str`), layer (`str`): the task and the module name.
        tokens (`int`): non-padding tokens whose inputs reached the layer.
        seconds (`float`): wall time of this task's score for this layer (its share of the group's Cholesky work,
            the combination and the top-k), excluding the forward passes (see `ImportanceReport.task_seconds`).
        overlap (`float`): |task's own top-k set ∩ final mask| / (out · k).
        kept (`int`): out · k, the number of kept entries of the layer.
    """

    task: str
    layer: str
    tokens: int
    seconds: float
    overlap: float
    kept: int


@dataclass
class ImportanceReport:
    """Result of `compute_importance`: per task and layer, tokens seen, wall time and mask overlap.

    `print(report)` shows a short table: per task the tokens, the time, and the overlap between the task's own top-k
    set and the final multi-task mask (1.0 = the task alone would have chosen the same mask); per layer too when there
    are few layers (or with `report.table(per_layer=True)`).
    """

    scorer: str
    adapter_name: str
    tasks: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    records: list[LayerTaskRecord] = field(default_factory=list)
    task_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def overlap(self, task: Optional[str] = None, layer: Optional[str] = None) -> float:
        """Overlap of `task` (all tasks if None) on `layer` (all layers if None), weighted by each layer's out · k."""
        chosen = [r for r in self.records if (task is None or r.task == task) and (layer is None or r.layer == layer)]
        kept = sum(r.kept for r in chosen)
        return sum(r.overlap * r.kept for r in chosen) / kept if kept else float("nan")

    def tokens(self, task: str) -> int:
        """Non-padding calibration tokens of `task` (the largest count over layers)."""
        return max((r.tokens for r in self.records if r.task == task), default=0)

    def scoring_seconds(self, task: str) -> float:
        return sum(r.seconds for r in self.records if r.task == task)

    def table(self, per_layer: Optional[bool] = None, markdown: bool = False) -> str:
        """A short text (or markdown) table; `per_layer=None` adds the per-layer overlaps when there are ≤ 24 layers."""
        head = (
            f"MaZO mask search: scorer={self.scorer}, adapter '{self.adapter_name}', {len(self.tasks)} task(s), "
            f"{len(self.layers)} layer(s), {self.total_seconds:.1f} s"
        )
        if not self.records:
            return head + ("" if self.scorer == "none" else " (data-free scorer: no per-task statistics)")
        rows = [
            [
                task,
                str(self.tokens(task)),
                f"{self.task_seconds.get(task, 0.0):.2f}",
                f"{self.scoring_seconds(task):.2f}",
                f"{self.overlap(task):.3f}",
            ]
            for task in self.tasks
        ]
        lines = [head, ""]
        lines += _format_table(["task", "tokens", "stats s", "scoring s", "overlap"], rows, markdown)
        if per_layer or (per_layer is None and len(self.layers) <= 24):
            layer_rows = [[layer] + [f"{self.overlap(t, layer):.3f}" for t in self.tasks] for layer in self.layers]
            lines += [""] + _format_table(["layer"] + self.tasks, layer_rows, markdown)
        lines += [
            "",
            "overlap = |task's own top-k set ∩ final mask| / (out·k), weighted by out·k; 1.0 = same mask as the task "
            "alone would choose.",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "scorer": self.scorer,
            "adapter_name": self.adapter_name,
            "tasks": self.tasks,
            "layers": self.layers,
            "total_seconds": self.total_seconds,
            "task_seconds": self.task_seconds,
            "settings": self.settings,
            "overlap": {task: self.overlap(task) for task in self.tasks},
            "records": [vars(r) for r in self.records],
        }


def _format_table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header)] + [fmt.format(*row) for row in rows]
