"""`mazo train` / `mazo eval` under `torchrun --nproc_per_node 2` on the CPU (gloo), through the real CLI.

One module fixture launches the runs (each `python -m torch.distributed.run --standalone` with one log file per rank)
and a single-process reference in this process; the tests compare them:

- 2 ranks, `--batch-size 4` (2 examples of each task per rank) = one process with `--batch-size 4`: the same masks
  (bit for bit: the calibration statistics summed over the ranks), the same losses and adapter up to float32
  rounding (`FULL_BATCH_REL_TOL`, measured and justified below); the files are those of one process, written once
  (rank 0), and only rank 0 prints the table, progress bars and INFO logs;
- `--steps 2` (under `accelerate launch`), then `--steps 4 --resume` (under torchrun), on 2 ranks = the
  uninterrupted 2-rank run, bit for bit;
- `--eval-every 2` (validation selection): the validation losses of 2 ranks (each scoring half of the examples)
  match one process's, and `best/` is written once and resumed;
- `mazo eval` of `best/` on 2 ranks: each scores half of the test examples; the combined scores are those of the
  training run's final evaluation, and rank 0 alone writes results.json;
- `--batch-size 3` on 2 ranks: refused on every rank before any work (rc 2), no hang;
- the HF Trainer path: examples/hf_trainer.py (MaZOTrainer, checkpoints and resume) under torchrun.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_mazo.cli import main
from tests.helpers import ROOT, SHARED_DATA


pytestmark = [
    pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
]

STEPS = 4
# One process over the batch of 4 vs two ranks over 2 + 2, float32: each rank's per-task loss is a mean over its
# 2 examples and ZOSGD averages the two ranks' means, the same mean up to float32 rounding (measured: training and
# validation losses within 4e-7 relative). ĝ = (L⁺ − L⁻) / 2ε divides that rounding by 2ε = 2e-3, so ĝ, and the update
# lr·ĝ·z built from it, differ by ~1e-4 relative (measured after 4 steps: 2.3e-4 of the adapter's norm, which is the
# whole update: the dense masked delta starts at zero). The bounds leave a factor of 9 or more for other CPU kernels;
# a real error (a rank training on the wrong shard, a mask from one rank's data) changes ĝ itself, and the adapter by
# O(1) of its norm.
FULL_BATCH_REL_TOL = 2e-3
LOSS_REL_TOL = 1e-5
TIMEOUT = 240


def common_args(model_dir: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["--model", str(model_dir), "--tasks", "sst2,copa", "--method", "mazo", "--data-dir", str(SHARED_DATA),
            "--out", str(out), "--steps", str(steps), "--save-every", "2", "--n-train", "12", "--n-val", "4",
            "--n-test", "6", "--batch-size", "4", "--calib-batches", "2", "--calib-batch-size", "4",
            "--max-length", "160", "--lr", "1e-2", "--eval-batch-size", "4", "--eval-every", "2", "--device", "cpu"]  # fmt: skip


class Launch:
    """`torchrun --nproc_per_node 2 -m peft_mazo.cli ARGS` (or `--script`: a script; `accelerate=True`: `accelerate
    launch --multi_gpu --num_processes 2`, which runs torchrun's launcher underneath; the ranks find no GPU and use
    gloo): the return code, the launcher's output and, under torchrun, each rank's stdout and stderr."""

    def __init__(self, args: list[str], logs: Path, script: str | None = None, accelerate: bool = False) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        program = [script] if script else ["-m", "peft_mazo.cli"]
        if accelerate:
            env["HF_HOME"] = str(logs / "hf_home")  # no user accelerate config
            launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        else:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
                        "--redirects", "3"]  # fmt: skip
        command = [sys.executable, *launcher, *program, *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
        self.returncode, self.launcher = done.returncode, done.stdout + done.stderr
        self.stdout, self.stderr = [""] * 2, [self.launcher] * 2
        for rank in range(2):
            for folder in logs.glob(f"*/attempt_0/{rank}"):
                self.stdout[rank] = (folder / "stdout.log").read_text()
                self.stderr[rank] = (folder / "stderr.log").read_text()

    def __str__(self) -> str:
        ranks = "\n".join(f"--- rank {r} stderr:\n{self.stderr[r][-3000:]}" for r in range(2))
        return f"rc {self.returncode}\n{self.launcher[-2000:]}\n{ranks}"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("torchrun")
    out = {"root": root}
    assert main(["train", *common_args(tiny_model_dir, root / "one")]) == 0  # one process, the full batch
    out["two"] = Launch(["train", *common_args(tiny_model_dir, root / "two")], root / "logs-two")
    first = ["train", *common_args(tiny_model_dir, root / "resumed", steps=2)]
    out["first"] = Launch(first, root / "logs-first", accelerate=True)  # accelerate launch, then torchrun
    out["resumed"] = Launch(["train", *common_args(tiny_model_dir, root / "resumed"), "--resume"], root / "logs-res")
    eval_args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(root / "two" / "best"), "--tasks",
                 "sst2,copa", "--data-dir", str(SHARED_DATA), "--n-test", "6", "--eval-batch-size", "4",
                 "--max-length", "160", "--device", "cpu", "--out", str(root / "eval")]  # fmt: skip
    out["eval"] = Launch(eval_args, root / "logs-eval")
    return out


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def log(run_dir: Path, name: str = "losses.jsonl") -> list[dict]:
    records = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return records


def test_two_ranks_give_the_adapter_of_one_process_on_the_full_batch(runs):
    root, two = runs["root"], runs["two"]
    assert two.returncode == 0, str(two)
    one_tensors, two_tensors = tensors(root / "one"), tensors(root / "two")
    assert one_tensors.keys() == two_tensors.keys()
    masks = [k for k, v in one_tensors.items() if not v.is_floating_point()]
    values = [k for k, v in one_tensors.items() if v.is_floating_point()]
    assert masks and values
    assert all(torch.equal(one_tensors[k], two_tensors[k]) for k in masks)  # one mask, from both ranks' data
    difference = torch.cat([(two_tensors[k].double() - one_tensors[k].double()).flatten() for k in values])
    update = torch.cat([one_tensors[k].double().flatten() for k in values])  # the delta started at zero
    assert update.norm() > 0
    assert difference.norm() / update.norm() < FULL_BATCH_REL_TOL

    one_log, two_log = log(root / "one"), log(root / "two")
    assert [r["step"] for r in two_log] == list(range(1, STEPS + 1))  # written once, by rank 0
    for a, b in zip(one_log, two_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL_TOL)
        assert b["losses"] == pytest.approx(a["losses"], rel=LOSS_REL_TOL)
    # --eval-every 2: each rank scores half of the validation examples, the sums are added
    one_val, two_val = log(root / "one", "validation.jsonl"), log(root / "two", "validation.jsonl")
    assert [r["step"] for r in two_val] == [0, 2, 4]
    for a, b in zip(one_val, two_val, strict=True):
        assert b["losses"] == pytest.approx(a["losses"], rel=LOSS_REL_TOL)

    # the files of one process, once; the evaluation over both ranks' shares counts every test example
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(root / "two") == names(root / "one")
    assert names(root / "two" / "checkpoint-4") == names(root / "one" / "checkpoint-4")
    assert names(root / "two" / "best") == names(root / "one" / "best")
    results = json.loads((root / "two" / "results.json").read_text())
    for key in ("before", "after"):
        assert {t: r["n"] for t, r in results[key].items()} == {"sst2": 6, "copa": 6}

    # rank 0 alone prints the table, the progress bars and the INFO logs
    assert two.stdout[0].count("results: ") == 1 and not two.stdout[1].strip()
    assert "MaZO mask search" in two.stderr[0] and "MaZO mask search" not in two.stderr[1]
    assert "it/s" in two.stderr[0] and "it/s" not in two.stderr[1]


def test_resume_on_two_ranks_equals_the_uninterrupted_run(runs):
    """The first 2 steps under `accelerate launch`, the resume under `torchrun`: the launchers are interchangeable."""
    root = runs["root"]
    for name in ("two", "first", "resumed"):
        assert runs[name].returncode == 0, str(runs[name])
    straight, resumed = tensors(root / "two"), tensors(root / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert log(root / "resumed") == log(root / "two")
    assert log(root / "resumed", "validation.jsonl") == log(root / "two", "validation.jsonl")
    best, resumed_best = (load_file(root / d / "best" / "adapter_model.safetensors") for d in ("two", "resumed"))
    assert all(torch.equal(best[k], resumed_best[k]) for k in best)
    assert (root / "resumed" / "latest").read_text().strip() == "checkpoint-4"


def test_eval_on_two_ranks_combines_the_shares(runs):
    root, launch = runs["root"], runs["eval"]
    assert launch.returncode == 0, str(launch)
    evaluated = json.loads((root / "eval" / "results.json").read_text())["after"]
    trained = json.loads((root / "two" / "results.json").read_text())["after"]  # the selected adapter: best/
    assert evaluated == trained
    assert launch.stdout[0].count("results: ") == 1 and not launch.stdout[1].strip()


def test_a_batch_that_does_not_split_is_refused_on_every_rank(tiny_model_dir, tmp_path):
    args = common_args(tiny_model_dir, tmp_path / "bad")
    args[args.index("--batch-size") + 1] = "3"
    launch = Launch(["train", *args], tmp_path / "logs")
    assert launch.returncode != 0
    assert "exitcode  : 2" in launch.launcher and "exitcode  : 1" not in launch.launcher
    for rank in range(2):
        assert "mazo: error: --batch-size 3 cannot be split over 2 processes" in launch.stderr[rank], str(launch)
        assert "Traceback" not in launch.stderr[rank]
    assert not (tmp_path / "bad").exists()  # refused before any work: nothing written


def test_hf_trainer_example_under_torchrun(tmp_path):
    """The HF Trainer path (`MaZOTrainer`, examples/hf_trainer.py) unchanged under torchrun: accelerate initialises the
    group, the trainer shards the data, rank 0 logs and writes the checkpoints, both ranks resume from them. (That the
    ranks stay bit-identical and match one process at the same global batch: test_distributed.py.)"""
    out = tmp_path / "out"
    launch = Launch(
        ["--model", "tiny", "--steps", "4", "--out", str(out)], tmp_path / "logs", script="examples/hf_trainer.py"
    )
    assert launch.returncode == 0, str(launch)
    assert "part 2: resume from" in launch.stdout[0]
    assert re.findall(r"^step (\d+): loss", launch.stdout[0], re.M) == ["1", "2", "3", "4"]
    assert "'loss'" in launch.stdout[0] and not launch.stdout[1].strip()  # the Trainer's logs: rank 0
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
