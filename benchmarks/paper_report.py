"""The report of the paper's experiment (issue 13): the generated part of docs/experiment.md and its figures, rebuilt
from the results folders alone (`python benchmarks/paper_experiment.py --report`).

Sections: the settings of the runs, Table 1 (test scores, mean ± std over seeds) with its radar chart, the validation
grid and the chosen settings, the loss curves, the step-budget probe (`--budget-results`), the LoRA pair at the
probe's budget (`--lora-2000-results`), the mask ablation, wall time, and the runs not made yet.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from paper_experiment import (
    ABLATION_METHODS,
    ABLATION_TASKS,
    CORE_METHODS,
    GENERATED_BEGIN,
    GENERATED_END,
    ROOT,
    TABLE1_ORDER,
    Job,
    _finite,
    choose,
    family,
    load_records,
    number,
    plan,
    read_jsonl,
    write_text_atomically,
)


def n_runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def load_results(results_dir: Path, record: dict) -> dict:
    path = results_dir / record["id"] / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def table1_runs(records: dict[str, dict], chosen: dict[str, dict]) -> dict[str, list[dict]]:
    """Per method, the finished, non-diverged runs that Table 1 averages (core methods: the chosen setting)."""
    rows: dict[str, list[dict]] = {}
    for record in records.values():
        method, phase = record["method"], record["phase"]
        if phase == "ablation" or record["status"] != "ok":
            continue
        if method in CORE_METHODS and phase in ("grid", "seeds"):
            pick = chosen.get(method) or {}
            if pick.get("lr") is None or (record["lr"], record["eps"]) != (pick["lr"], pick["eps"]):
                continue
        elif phase not in ("zero-shot", "phase2"):
            continue
        rows.setdefault(method, []).append(record)
    return rows


def score_table(results_dir: Path, runs: dict[str, list[dict]], tasks: list[str], order: list[str]) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 3) + "|"]
    for method in order:
        if method not in runs:
            continue
        scores = [load_results(results_dir, r).get("after", {}) for r in runs[method]]
        scores = [s for s in scores if all(t in s for t in tasks)]
        if not scores:
            continue
        cells = []
        for task in tasks:
            m, s = mean_std([x[task]["score"] for x in scores])
            cells.append(f"{m:.1f} ± {s:.1f}" if len(scores) > 1 else f"{m:.1f}")
        m, s = mean_std([sum(x[t]["score"] for t in tasks) / len(tasks) for x in scores])
        cells.append(f"**{m:.1f} ± {s:.1f}**" if len(scores) > 1 else f"**{m:.1f}**")
        seeds = ",".join(str(r["seed"]) for r in sorted(runs[method], key=lambda r: r["seed"]))
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def grid_table(chosen: dict[str, dict]) -> list[str]:
    lines = [
        "| method | lr | eps | status | selected step | best validation loss | validation average |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, pick in chosen.items():
        for c in pick["candidates"]:
            mark = c["run"] == pick["run"]
            value = c.get("average_validation")
            loss = c.get("best_loss")
            cells = [
                method, number(c["lr"]), number(c["eps"]), c["status"], str(c.get("selected_step", "")),
                f"{loss:.4f}" if _finite(loss) else "—", f"{value:.1f}" if _finite(value) else "—",
            ]  # fmt: skip
            if mark:
                cells = [f"**{x}**" for x in cells]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def curve_figure(results_dir: Path, chosen: dict[str, dict], records: dict, path: Path) -> bool:
    """Training loss (window means) and validation loss of MTL-ZO vs MaZO, dense and LoRA, chosen setting, seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    drawn = False
    for col, pair in enumerate([("mtl-zo", "mazo"), ("mtl-zo-lora", "mazo-lora")]):
        for method in pair:
            pick = chosen.get(method) or {}
            run = pick.get("run")
            if run is None or not (results_dir / run).is_dir():
                continue
            label = f"{method} (lr {number(pick['lr'])}, eps {number(pick['eps'])})"
            losses = results_dir / run / "losses.jsonl"
            if losses.exists():
                rows = [r for r in read_jsonl(losses) if _finite(r.get("loss"))]
                axes[0, col].plot([r["step"] for r in rows], [r["loss"] for r in rows], ".-", label=label)
                drawn = True
            validation = results_dir / run / "validation.jsonl"
            if validation.exists():
                rows = [r for r in read_jsonl(validation) if _finite(r.get("loss"))]
                (line,) = axes[1, col].plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", label=label)
                selected = records.get(run, {}).get("selected_step")
                for r in rows:
                    if r["step"] == selected:
                        axes[1, col].plot([r["step"]], [r["loss"]], "*", ms=14, color=line.get_color())
        axes[0, col].set_title("dense" if col == 0 else "LoRA r = 64")
        axes[0, col].set_ylabel("training loss (mean over the tasks)")
        axes[1, col].set_ylabel("validation loss (mean over the tasks)")
        axes[1, col].set_xlabel("step (star: selected checkpoint)")
        for ax in axes[:, col]:
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def task_curves_figure(results_dir: Path, chosen: dict[str, dict], path: Path) -> bool:
    """Per-task validation loss of the LoRA methods (chosen setting, seed 0): has it flattened within the budget?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for method in ("mtl-zo-lora", "mazo-lora", "mtl-zo", "mazo"):
        run = (chosen.get(method) or {}).get("run")
        if run and (results_dir / run / "validation.jsonl").exists():
            series[method] = [r for r in read_jsonl(results_dir / run / "validation.jsonl") if r.get("losses")]
    if not series:
        return False
    tasks = list(next(iter(series.values()))[0]["losses"])
    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for index, task in enumerate(tasks):
        ax = axes[index // columns, index % columns]
        for method, records in series.items():
            points = [(r["step"], r["losses"][task]) for r in records if _finite(r["losses"].get(task))]
            ax.plot([p[0] for p in points], [p[1] for p in points], ".-", label=method)
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
    for index in range(len(tasks), rows * columns):
        axes[index // columns, index % columns].axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def radar_figure(results_dir: Path, runs: dict[str, list[dict]], tasks: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))] + [0.0]
    fig = plt.figure(figsize=(6.5, 6.5))
    ax = fig.add_subplot(polar=True)
    for method in TABLE1_ORDER:
        scores = [load_results(results_dir, r).get("after", {}) for r in runs.get(method, [])]
        scores = [s for s in scores if all(t in s for t in tasks)]
        if scores:
            values = [mean_std([s[t]["score"] for s in scores])[0] for t in tasks]
            ax.plot(angles, values + values[:1], label=method)
    ax.set_xticks(angles[:-1], tasks)
    drawn = bool(ax.lines)
    if drawn:
        ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def long_runs_table(runs_dir: Path, records: dict[str, dict], figure: Path) -> list[str]:
    """Per run of `runs_dir`: where its validation loss is lowest (the selected checkpoint), its last value and that
    checkpoint's validation / test averages (table rows); the validation curves go to `figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [
        "| run | steps | lowest at step | lowest validation loss | last validation loss | validation average | "
        "test average |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, record in sorted(records.items()):
        path = runs_dir / run / "validation.jsonl"
        validation = [r for r in read_jsonl(path) if _finite(r.get("loss"))] if path.exists() else []
        if not validation:
            continue
        (line,) = ax.plot([r["step"] for r in validation], [r["loss"] for r in validation], "o-", ms=3, label=run)
        best = min(validation, key=lambda r: r["loss"])
        ax.plot([best["step"]], [best["loss"]], "*", ms=14, color=line.get_color())
        results = load_results(runs_dir, record)
        rows.append(
            f"| `{run}` | {validation[-1]['step']} of {record['protocol'].get('steps')} | {best['step']} | "
            f"{best['loss']:.4f} | {validation[-1]['loss']:.4f} | "
            f"{results.get('average_validation', float('nan')):.1f} | {results.get('average_after', float('nan')):.1f} |"
        )
    ax.set_xlabel("step (star: lowest validation loss, the selected checkpoint)")
    ax.set_ylabel("validation loss (mean over the tasks)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return rows


def _shown(path: Path) -> Path:
    """`path` relative to the repository where it lies inside it (as the page shows it), else as given."""
    return path.resolve().relative_to(ROOT) if ROOT in path.resolve().parents else path


def budget_section(budget_dir: Path, figures: Path) -> list[str]:
    """The step-budget probe (`--budget-results`): long runs' validation loss against the step, and where it is lowest."""
    records = load_records(budget_dir)
    if not records:
        return []
    rows = long_runs_table(budget_dir, records, figures / "paper_budget.png")
    devices = sorted({r.get("device", "?") for r in records.values()})
    return [
        "### Step budget: long runs at the LoRA methods' default setting",
        "",
        f"From `{_shown(budget_dir)}` ({len(records)} runs on {', '.join(devices)}, seed 0, no early stop): the "
        "validation loss every `eval_every` steps, the step where it is lowest (the checkpoint the scores below come "
        "from), its last value, and the validation / test averages of that checkpoint.",
        "",
        *rows,
        "",
        f"![Validation loss over a long budget]({figures.name}/paper_budget.png)",
        "",
    ]


def lora_2000_section(runs_dir: Path, figures: Path) -> list[str]:
    """The LoRA pair at the budget the probe points to (`--lora-2000-results`): test scores over seeds, per-run
    selection, validation curves, and the runs not made."""
    records = load_records(runs_dir)
    if not records:
        return []
    trained = [r for r in records.values() if r["method"] != "zero-shot"]
    protocol = (trained or list(records.values()))[0].get("protocol", {})
    by_setting: dict[tuple[str, str], list[str]] = {}
    for record in sorted(trained, key=lambda r: TABLE1_ORDER.index(r["method"])):
        methods = by_setting.setdefault((number(record["lr"]), number(record["eps"])), [])
        methods += [record["method"]] if record["method"] not in methods else []
    settings = "; ".join(f"{' and '.join(m)} at lr {lr}, eps {eps}" for (lr, eps), m in by_setting.items())
    devices = sorted({r.get("device", "?") for r in records.values()})
    commits = sorted({str(r.get("git_commit", "?"))[:7] for r in records.values()})
    runs: dict[str, list[dict]] = {}
    for record in records.values():
        if record["status"] == "ok":
            runs.setdefault(record["method"], []).append(record)
    tasks = next(iter(records.values()))["tasks"]
    lines = [
        f"### The LoRA pair at {protocol.get('steps')} steps",
        "",
        f"From `{_shown(runs_dir)}` ({len(records)} runs on {', '.join(devices)}, commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}): "
        f"{settings} (one setting per method, no grid), up to {protocol.get('steps')} steps of "
        f"{protocol.get('batch_size')} examples per task, validation loss every {protocol.get('eval_every')} steps on "
        f"{protocol.get('n_val_eval') or 'all'} validation examples per task, patience "
        f"{protocol.get('patience') or 'off'}; scores of the checkpoint with the lowest validation loss.",
        "",
        *score_table(runs_dir, runs, tasks, TABLE1_ORDER),
        "",
        *long_runs_table(runs_dir, records, figures / "paper_lora_2000.png"),
        "",
        f"![Validation loss of the LoRA pair at {protocol.get('steps')} steps]({figures.name}/paper_lora_2000.png)",
        "",
    ]
    all_seeds = sorted({r["seed"] for r in trained})
    for method in dict.fromkeys(r["method"] for r in trained):
        missing = [s for s in all_seeds if s not in {r["seed"] for r in trained if r["method"] == method}]
        if missing:
            lines += [f"Not run yet: {method} with seed{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(map(str, missing))}.", ""]  # fmt: skip
    return lines


def report(args) -> str:
    """The generated part of docs/experiment.md, from `--results` alone; writes the figures next to `--report-out`."""
    results_dir = Path(args.results)
    records = load_records(results_dir)
    chosen_path = results_dir / "chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
    if chosen:  # the grid that was run (its lr and eps lists) decides the missing runs, not this call's defaults
        first = next(iter(chosen.values()))
        args.eps = first["grid"]["eps"]
        for method, pick in chosen.items():
            if family(method) == "lora":
                args.lr_lora = pick["grid"]["lr"]
            else:
                args.lr_dense = pick["grid"]["lr"]
        args.methods = list(chosen)
        chosen = {m: choose(args, m, records) for m in chosen}  # recomputed: chosen.json may be older
    else:
        chosen = {m: choose(args, m, records) for m in args.methods}
    out = Path(args.report_out)
    figures = out.parent / "img"
    figures.mkdir(parents=True, exist_ok=True)
    tasks = next((r["tasks"] for r in records.values() if r["phase"] != "ablation"), args.tasks)
    args.tasks = tasks
    lines = [GENERATED_BEGIN, ""]
    if not records:
        lines += [
            f"No run has finished yet: the tables and figures appear here once results are in `{_shown(results_dir)}`.",
            "",
        ]
    devices = sorted({r.get("device", "?") for r in records.values()})
    commits = sorted({str(r.get("git_commit", "?"))[:7] for r in records.values()})
    first_results = next((load_results(results_dir, r) for r in records.values() if r["phase"] != "ablation"), {})
    config = first_results.get("config", {})
    if records:
        protocol = next(iter(records.values())).get("protocol", {})
        lines += [
            "### Settings of these runs",
            "",
            f"{len(records)} runs on {', '.join(devices)} (commits {', '.join(commits)}). Every run: "
            f"{protocol.get('steps')} steps at most, {protocol.get('batch_size')} examples per task per step, "
            f"max length {protocol.get('max_length')}, validation loss every {protocol.get('eval_every')} steps on "
            f"{protocol.get('n_val_eval') or 'all'} validation examples per task (patience "
            f"{protocol.get('patience') or 'off'}), scores of the checkpoint with the lowest validation loss; dtype "
            f"{config.get('dtype', '?')}.",
            "",
        ]
        sizes = first_results.get("sizes")
        if sizes:
            lines += ["Examples per task (train / validation from train.jsonl; test from validation.jsonl):", ""]
            lines += ["| | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
            lines += ["| train / val / test | " + " | ".join(
                f"{s['train']} / {s['val']} / {s['test']}" for s in sizes.values()) + " |", ""]  # fmt: skip
    runs = table1_runs(records, chosen)
    if runs:
        lines += [
            "### Table 1: test scores (mean ± std over seeds)",
            "",
            "Accuracy (SQuAD: F1) on the test examples, of each run's checkpoint with the lowest validation loss; "
            "the core methods at the setting chosen on validation (next table). One seed: no ± shown.",
            "",
        ]
        lines += score_table(results_dir, runs, tasks, TABLE1_ORDER) + [""]
        if radar_figure(results_dir, runs, tasks, figures / "paper_radar.png"):
            lines += [f"![Radar chart of Table 1]({figures.name}/paper_radar.png)", ""]
    if any(c["status"] != "missing" for pick in chosen.values() for c in pick["candidates"]):
        lines += [
            "### Validation grid (seed 0): the setting of each method",
            "",
            "Validation average = task metrics of the run's selected checkpoint on the validation examples (drawn "
            "from train.jsonl). Bold: the chosen setting (best validation average; ties: lower validation loss). "
            "Diverged runs (a non-finite loss) are never chosen.",
            "",
        ]
        lines += grid_table(chosen) + [""]
    if curve_figure(results_dir, chosen, records, figures / "paper_loss_curves.png"):
        lines += [
            "### Loss curves: MTL-ZO vs MaZO, dense and LoRA",
            "",
            f"Chosen settings, seed {args.grid_seed}. Top: training loss (means over windows of steps); bottom: "
            "validation loss (the star marks the selected checkpoint).",
            "",
            f"![Loss curves]({figures.name}/paper_loss_curves.png)",
            "",
        ]
    if task_curves_figure(results_dir, chosen, figures / "paper_validation_tasks.png"):
        lines += [
            "Validation loss per task (chosen settings, seed 0): where it still falls at the last step, the step "
            "budget was too short for that task.",
            "",
            f"![Validation loss per task]({figures.name}/paper_validation_tasks.png)",
            "",
        ]
    lines += budget_section(Path(args.budget_results), figures)
    lines += lora_2000_section(Path(args.lora_2000_results), figures)
    ablation = {}
    for record in records.values():
        if record["phase"] == "ablation" and record["status"] == "ok":
            ablation.setdefault(record["method"], []).append(record)
    if ablation:
        lines += ["### Mask ablation (ρ = 0.5)", ""]
        lines += score_table(results_dir, ablation, ABLATION_TASKS, ABLATION_METHODS) + [""]
    if records:
        lines += ["### Wall time and GPU", ""]
        lines += ["| method | runs | median wall time per run (s) | total (s) |", "|---|---|---|---|"]
        by_method: dict[str, list[float]] = {}
        for record in records.values():
            if _finite(record.get("wall_seconds")):
                by_method.setdefault(record["method"], []).append(record["wall_seconds"])
        for method, walls in sorted(by_method.items()):
            lines.append(f"| {method} | {len(walls)} | {statistics.median(walls):.0f} | {sum(walls):.0f} |")
        lines += [
            "",
            f"Device: {', '.join(devices)}. Runs shared the device (`--parallel`), so a run's wall time includes "
            "waiting for the others. A run resumed over several calls sums its pieces where its `run.json` counts "
            "them (`pieces`); older records hold only the last call's part. Versions, commit and exact commands are "
            "in each `run.json`.",
            "",
        ]
    missing = [(job, why) for job, why in plan(args, records) if job.id not in records]
    if missing:
        lines += [f"### Runs not made yet ({len(missing)})", ""]
        ready: dict[str, list[Job]] = {}
        for job, why in missing:
            if why is None:
                ready.setdefault(job.phase, []).append(job)
        for phase, jobs in ready.items():
            lines.append(f"- {phase}: {n_runs(len(jobs))}: " + ", ".join(f"`{j.id}`" for j in jobs))
        blocked: dict[tuple[str, str], list[Job]] = {}
        for job, why in missing:
            if why is not None:
                blocked.setdefault((job.phase, why), []).append(job)
        for (phase, why), jobs in blocked.items():
            methods = ", ".join(dict.fromkeys(j.method for j in jobs))
            seeds = ", ".join(str(s) for s in dict.fromkeys(j.seed for j in jobs))
            lines.append(f"- {phase}: {n_runs(len(jobs))} ({methods}; seeds {seeds}): {why}")
        lines.append("")
    failed = [r for r in records.values() if r["status"] != "ok"]
    if failed:
        lines += ["Runs that diverged or failed: " + ", ".join(f"`{r['id']}` ({r['status']})" for r in failed), ""]
    lines.append(GENERATED_END)
    return "\n".join(lines) + "\n"


def write_report(args) -> Path:
    text = report(args)
    out = Path(args.report_out)
    if out.exists() and GENERATED_BEGIN in out.read_text():
        page = out.read_text()
        before = page.split(GENERATED_BEGIN)[0]
        after = page.split(GENERATED_END, 1)[1] if GENERATED_END in page else "\n"
        text = before + text.rstrip("\n") + after
    elif out.exists():
        text = out.read_text().rstrip("\n") + "\n\n## Results\n\n" + text
    write_text_atomically(out, text)
    return out
