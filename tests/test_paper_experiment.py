"""`benchmarks/paper_experiment.py` end to end on the CPU: a tiny model, 2 tasks, 2 methods, a 2-point grid (one point
forced to diverge), 2 steps, 2 runs at a time; then skipping, resuming and the report from the results alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


SCRIPT = ROOT / "benchmarks" / "paper_experiment.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_experiment as pe  # noqa: E402


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
GOOD, DIVERGED = "0.01", "1e30"  # lr 1e30 makes the tiny model's losses non-finite after one step


def experiment_argv(tmp_path: Path, model_dir: Path) -> list[str]:
    return [
        "--model", str(model_dir), "--data-dir", str(SHARED_DATA), "--out", str(tmp_path / "runs"),
        "--results", str(tmp_path / "results"), "--phases", "grid", "--methods", "mtl-zo-lora,mazo-lora",
        "--tasks", "sst2,copa", "--seeds", "0", "--lr-lora", f"{GOOD},{DIVERGED}", "--eps", "1e-3", "--steps", "2",
        "--batch-size", "2", "--eval-every", "1", "--n-val-eval", "4", "--patience", "0", "--n-train", "12",
        "--n-val", "6", "--n-test", "6", "--max-length", "160", "--eval-batch-size", "8", "--save-every", "1",
        "--parallel", "2", "--train-args=--r 4 --calib-batches 1 --calib-batch-size 4", "--poll", "0.2",
        "--archive", str(tmp_path / "back" / "paper.tar.gz"),
    ]  # fmt: skip


def run_script(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MAZO_GIT_COMMIT="0123abc")
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def interrupt_after_step_1(args, job_id: str) -> Path:
    """Leave the run directory of `job_id` as a run killed after its first step (checkpoint-1, no results)."""
    from peft_mazo.cli import _config, build_parser
    from peft_mazo.runner import latest_checkpoint, run

    job = next(job for job, _ in pe.plan(args, {}) if job.id == job_id)
    run_dir = Path(args.out) / job.id
    (command,), resumed = pe.commands(args, job, run_dir)
    assert not resumed and command[1:4] == ["-m", "peft_mazo.cli", "train"]

    class Interrupt(Exception):
        pass

    def crash(step, record):
        if step == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(_config(build_parser().parse_args(command[3:])), on_step=crash)
    assert latest_checkpoint(run_dir).name == "checkpoint-1" and not (run_dir / "results.json").exists()
    return run_dir


@pytest.mark.slow
def test_experiment_runs_skips_resumes_and_reports(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    make_tiny_llama(seed=0, max_position_embeddings=256).save_pretrained(model_dir)
    make_tiny_tokenizer(pad=True).save_pretrained(model_dir)
    argv = experiment_argv(tmp_path, model_dir)
    results = tmp_path / "results"
    resumed_id = f"mazo-lora_lr{GOOD}_eps0.001_seed0"
    interrupt_after_step_1(pe.parse_args(argv), resumed_id)

    first = run_script(argv).stdout
    ids = [f"{m}_lr{lr}_eps0.001_seed0" for m in ("mtl-zo-lora", "mazo-lora") for lr in (GOOD, DIVERGED)]
    assert sorted(p.name for p in results.iterdir() if p.is_dir()) == sorted(ids)
    assert f"resume {resumed_id}" in first and first.count("] start ") == 3
    for run_id in ids:
        folder = results / run_id
        assert {"results.json", "validation.jsonl", "losses.jsonl", "run.json"} <= {p.name for p in folder.iterdir()}
        record = json.loads((folder / "run.json").read_text())
        assert record["device"] and record["versions"]["torch"] and record["git_commit"] == "0123abc"
        assert "paper_experiment.py" in record["command"] and "peft_mazo.cli train" in record["commands"][0]
        assert record["status"] == ("diverged" if DIVERGED in run_id else "ok"), record.get("log_tail")
        assert record["protocol"]["steps"] == 2 and record["wall_seconds"] > 0
        validation = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
        assert [r["step"] for r in validation] == [0, 1, 2]
        selected = json.loads((folder / "results.json").read_text())["selected_step"]
        finite = [r for r in validation if r["candidate"] and r["loss"] == r["loss"]]
        assert selected == (min(finite, key=lambda r: r["loss"])["step"] if finite else None)
        assert json.loads((folder / "losses.jsonl").read_text().splitlines()[0])["steps"] == 2  # thinned
    assert not list(results.rglob("*.safetensors")) and not list(results.rglob("checkpoint-*"))
    resumed = json.loads((results / resumed_id / "run.json").read_text())
    assert resumed["resumed"] is True and "--resume" in resumed["commands"][0]

    chosen = json.loads((results / "chosen.json").read_text())
    for method in ("mtl-zo-lora", "mazo-lora"):
        pick = chosen[method]
        assert pick["complete"] and pick["lr"] == float(GOOD)  # the diverged point is never chosen
        statuses = {c["lr"]: c["status"] for c in pick["candidates"]}
        assert statuses == {float(GOOD): "ok", float(DIVERGED): "diverged"}
        good = json.loads((results / pick["run"] / "results.json").read_text())
        assert pick["average_validation"] == good["average_validation"]
    with tarfile.open(tmp_path / "back" / "paper.tar.gz") as archive:
        names = archive.getnames()
    assert "results/chosen.json" in names and f"results/{resumed_id}/run.json" in names

    # a second call finds every result and starts nothing (in this process: it would start no process anyway)
    monkeypatch.setenv("MAZO_GIT_COMMIT", "0123abc")
    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("run.json")}
    capsys.readouterr()
    assert pe.main(argv) == 0
    second = capsys.readouterr().out
    assert "started 0 runs" in second and second.count("] skip ") == 4
    assert {p: p.stat().st_mtime_ns for p in results.rglob("run.json")} == stamps

    # the report, from the results folder alone, into a page whose hand-written parts stay
    (tmp_path / "runs").rename(tmp_path / "runs-gone")
    page = tmp_path / "docs" / "experiment.md"
    page.parent.mkdir()
    page.write_text(
        f"# Title\n\nHand-written protocol.\n\n{pe.GENERATED_BEGIN}\nold\n{pe.GENERATED_END}\n\n## Notes\n"
    )
    report = ["--report", "--results", str(results), "--report-out", str(page)]
    no_long_runs = ["--budget-results", str(tmp_path / "no-probe"), "--lora-2000-results", str(tmp_path / "none")]
    assert pe.main([*report, *no_long_runs]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nHand-written protocol.") and text.rstrip().endswith("## Notes")
    assert "\nold\n" not in text and text.count(pe.GENERATED_BEGIN) == 1
    assert "| mtl-zo-lora | 0 |" in text and "| mazo-lora | 0 |" in text  # Table 1 rows
    assert f"| **mazo-lora** | **{GOOD}** |" in text and "| diverged |" in text  # the validation grid
    assert "Runs not made yet" in text and "zero-shot_seed0" in text and "waits for the mtl-zo grid" in text
    assert "| sst2 | copa |" in text and "12 / 6 / 6" in text  # sizes
    for figure in ("paper_radar.png", "paper_loss_curves.png", "paper_validation_tasks.png"):
        assert (page.parent / "img" / figure).read_bytes()[:4] == b"\x89PNG"
    assert "Step budget" not in text and not (page.parent / "img" / "paper_budget.png").exists()
    assert "The LoRA pair at" not in text

    # the step-budget probe's section: here these results stand in for a probe's long runs
    assert pe.main([*report, "--budget-results", str(results), "--lora-2000-results", str(tmp_path / "none")]) == 0
    text = page.read_text()
    assert "### Step budget" in text and text.count(pe.GENERATED_BEGIN) == 1
    good = json.loads((results / resumed_id / "results.json").read_text())
    lowest = min(
        (json.loads(line) for line in (results / resumed_id / "validation.jsonl").read_text().splitlines()),
        key=lambda r: r["loss"],
    )
    assert f"| `{resumed_id}` | 2 of 2 | {lowest['step']} | {lowest['loss']:.4f} |" in text
    assert f"| {good['average_validation']:.1f} | {good['average_after']:.1f} |" in text

    # the LoRA pair's seeds at a longer budget: the same results stand in; a seed only one method has is named
    partial = tmp_path / "lora-long"
    shutil.copytree(results / resumed_id, partial / resumed_id)
    other = partial / resumed_id.replace("seed0", "seed1").replace("mazo-lora", "mtl-zo-lora")
    shutil.copytree(results / f"mtl-zo-lora_lr{GOOD}_eps0.001_seed0", other)
    record = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**record, "id": other.name, "seed": 1}))
    assert pe.main([*report, "--budget-results", str(tmp_path / "no-probe"), "--lora-2000-results", str(partial)]) == 0
    text = page.read_text()
    assert "### The LoRA pair at 2 steps" in text and f"mtl-zo-lora and mazo-lora at lr {GOOD}, eps 0.001" in text
    assert "| mtl-zo-lora | 1 |" in text
    assert "| mazo-lora | 0 |" in text and "Not run yet: mazo-lora with seed 1." in text
    assert (page.parent / "img" / "paper_lora_2000.png").read_bytes()[:4] == b"\x89PNG"
    assert (page.parent / "img" / "paper_budget.png").read_bytes()[:4] == b"\x89PNG"


def record(run_id, status, average, loss):
    return {"id": run_id, "status": status, "average_validation": average, "best_loss": loss, "selected_step": 1}


def test_the_setting_with_the_best_validation_average_is_chosen_never_a_diverged_one():
    args = pe.parse_args(["--methods", "mtl-zo-lora", "--lr-lora", "1e-4,3e-4,1e-3", "--eps", "1e-3", "--seeds", "0"])
    ids = [job.id for job in pe.grid_jobs(args)]
    assert ids[0] == "mtl-zo-lora_lr0.0003_eps0.001_seed0"  # the default first: a partial grid is most useful
    records = {
        "mtl-zo-lora_lr0.0001_eps0.001_seed0": record("a", "ok", 60.0, 0.7),
        "mtl-zo-lora_lr0.0003_eps0.001_seed0": record("b", "ok", 60.0, 0.6),  # tie: the lower validation loss wins
        "mtl-zo-lora_lr0.001_eps0.001_seed0": record("c", "diverged", 90.0, None),
    }
    pick = pe.choose(args, "mtl-zo-lora", records)
    assert pick["complete"] and (pick["lr"], pick["eps"]) == (3e-4, 1e-3)
    del records["mtl-zo-lora_lr0.001_eps0.001_seed0"]
    assert not pe.choose(args, "mtl-zo-lora", records)["complete"]
    jobs = {job.id: why for job, why in pe.plan(pe.parse_args(["--phases", "seeds", "--methods", "mtl-zo-lora"]), {})}
    assert jobs == {f"mtl-zo-lora_chosen-setting_seed{s}": "waits for the mtl-zo-lora grid" for s in (1, 2)}
    one_setting = pe.parse_args(
        ["--phases", "grid,seeds", "--methods", "mtl-zo-lora", "--lr-lora", "3e-4", "--eps", "1e-3"]
    )
    jobs = {job.id: why for job, why in pe.plan(one_setting, {})}  # a grid of one: the seeds start at once
    assert jobs == {f"mtl-zo-lora_lr0.0003_eps0.001_seed{s}": None for s in (0, 1, 2)}


@pytest.mark.parametrize(
    "results, code, log, status",
    [
        ({"skipped_steps": 0, "selected_step": 3, "average_after": 50.0, "average_validation": 55.0}, 0, "", "ok"),
        ({"skipped_steps": 2, "selected_step": 3, "average_after": 50.0}, 0, "", "diverged"),
        ({"skipped_steps": 0, "selected_step": None, "average_after": 50.0}, 0, "", "diverged"),
        ({"skipped_steps": 0, "selected_step": {"sst2": 2, "copa": None}}, 0, "", "diverged"),
        ({"skipped_steps": 0, "average_validation": float("nan")}, 0, "", "diverged"),
        (None, 1, "mazo: run failed: ... gave a non-finite loss (NaN or inf)", "diverged"),
        (None, 2, "mazo: error: --lr must be", "failed"),
    ],
)
def test_status_of_a_run(results, code, log, status):
    assert pe.status_of(results, code, log) == status


def test_a_run_collected_from_its_directory_records_the_commands_that_made_it(tmp_path):
    """A later call finds a run finished by an earlier one in its run directory: its run.json still names the exact
    `mazo` commands (from the `$ ...` lines of the run's stdout.log), not an empty list."""
    args = pe.parse_args(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "runs")])
    args.command_line, args.environment = "paper_experiment.py --phases grid", {"device": "cpu", "git_commit": "abc"}
    job = pe.Job("mtl-zo_lr1e-05_eps0.01_seed0", "grid", "mtl-zo", ["sst2"], 0, 1e-5, 0.01)
    run_dir = tmp_path / "runs" / job.id
    run_dir.mkdir(parents=True)
    first = "python -m peft_mazo.cli train --method mtl-zo --steps 8"
    again = first + " --resume"
    (run_dir / "stdout.log").write_text(f"$ {first}\nstep 1\n$ {again}\ndone\n")
    results = {"average_after": 51.0, "average_validation": 50.0, "selected_step": 8, "wall_seconds": 12.5}
    (run_dir / "results.json").write_text(json.dumps(results))
    record = pe.collect(args, job, run_dir, {"resumed": False})
    assert record["commands"] == [first, again] and record["wall_seconds"] == 12.5
    saved = json.loads((tmp_path / "results" / job.id / "run.json").read_text())
    assert saved["commands"] == [first, again] and saved["status"] == "ok"
    started = pe.collect(args, job, run_dir, {"commands": [["mazo", "train", "--lr", "1e-05"]], "wall_seconds": 3.0})
    assert started["commands"] == ["mazo train --lr 1e-05"] and started["wall_seconds"] == 3.0


def test_a_resumed_runs_wall_time_sums_its_pieces_and_its_estimate_counts_what_is_left(tmp_path):
    """A run cut by one call's deadline and finished by the next: run.json holds the wall time of both pieces and says
    it resumed, even when a later call collects it from its directory; a resumed run is expected to need less."""
    args = pe.parse_args(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "runs")])
    args.command_line, args.environment = "paper_experiment.py", {"device": "cpu", "git_commit": "abc"}
    job = pe.Job("mtl-zo_lr1e-05_eps0.01_seed0", "grid", "mtl-zo", ["sst2"], 0, 1e-5, 0.01)
    run_dir = tmp_path / "runs" / job.id
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"average_after": 51.0, "wall_seconds": 7.0}))
    pe.record_piece(run_dir, 30.0, "interrupted")
    pe.record_piece(run_dir, 12.5, "finished")
    for extra in ({"wall_seconds": 12.5, "resumed": True}, {"resumed": False}):  # this call's run; a collected one
        record = pe.collect(args, job, run_dir, extra)
        assert (record["wall_seconds"], record["pieces"], record["resumed"]) == (42.5, 2, True)
    other = pe.Job("mtl-zo_lr1e-05_eps0.01_seed1", "seeds", "mtl-zo", ["sst2"], 1, 1e-5, 0.01)
    assert pe.estimate(other, {job.id: record}, "cpu") == 42.5  # a whole run, both pieces
    assert pe.time_left_of(other, {job.id: record}, "cpu", tmp_path / "runs" / other.id) == 42.5  # not begun
    (tmp_path / "runs" / other.id).mkdir()
    pe.record_piece(tmp_path / "runs" / other.id, 30.0, "interrupted")
    assert pe.time_left_of(other, {job.id: record}, "cpu", tmp_path / "runs" / other.id) == 12.5
