"""The examples run offline and do what they print (each with its smallest flags: `--model tiny`, a few steps)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SHARED_DATA


needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


def run_example(name: str, *args: object, cwd: Path | None = None) -> str:
    """Run `examples/<name>` in a fresh interpreter; return its stdout (fail with its stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_trains_saves_and_reloads(tmp_path):
    output = run_example("quickstart.py", "--steps", 3, "--out", tmp_path / "out")
    losses = [float(line.split()[-1]) for line in output.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "reloaded adapter gives the same logits: True" in output
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@needs_data
def test_multitask_smollm2_runs_the_main_job_on_a_tiny_model(tmp_path):
    output = run_example("multitask_smollm2.py", "--model", "tiny", "--steps", 3, "--out", tmp_path / "run")
    assert "mazo-lora on tiny: tasks ['sst2', 'copa', 'rte'], 3 ZO steps" in output
    assert re.search(r"^sst2 +accuracy +[\d.]+ +[\d.]+$", output, re.M)
    assert "skipped steps (non-finite loss): 0" in output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["after"]) == set(results["before"]) == {"sst2", "copa", "rte"}
    assert len((tmp_path / "run" / "losses.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@needs_data
def test_four_bit_trains_saves_and_reloads_on_an_nf4_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    output = run_example("four_bit.py", "--model", "tiny", "--steps", 2, "--out", tmp_path / "adapter")
    assert "tiny in nf4:" in output and "MaZO LoRA r=16, rho=0.8" in output
    assert re.search(r"^step 2: loss [\d.]+ \(sst2 [\d.]+, copa [\d.]+\)$", output, re.M)
    assert "reloaded onto a fresh 4-bit base: same delta and mask: True" in output
    assert "the reloaded adapter gives the same losses: True" in output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@needs_data
def test_hf_trainer_trains_evaluates_and_resumes(tmp_path):
    output = run_example("hf_trainer.py", "--model", "tiny", "--steps", 4, "--out", tmp_path / "out")
    assert "part 2: resume from" in output and "checkpoint-2" in output
    steps = [int(m) for m in re.findall(r"^step (\d+): loss", output, re.M)]
    assert steps == [1, 2, 3, 4]
    assert len(re.findall(r"^step \d+: eval_loss", output, re.M)) == 2
    assert "skipped (non-finite) steps: 0" in output
    assert (tmp_path / "out" / "checkpoint-4").is_dir() and (tmp_path / "out" / "adapter").is_dir()


@needs_data
def test_scorer_ablation_compares_four_masks():
    output = run_example("scorer_ablation.py", "--model", "tiny", "--steps", 2, "--tasks", "sst2,copa")
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in output.split("mask overlap")[1].split("per-task")[0].splitlines()[2:]
        if line.strip()
    }
    assert list(rows) == ["random", "magnitude", "wanda", "mazo"]
    assert all(rows[s][i] == 1.0 for i, s in enumerate(rows))
    assert 0.4 < rows["random"][3] < 0.6  # a random mask overlaps any other by about 1 - rho
    assert len(re.findall(r"^(random|magnitude|wanda|mazo) +[\d.]+ +[\d.]+$", output, re.M)) == 4


@needs_data
def test_merge_export_writes_a_plain_model_that_matches_the_adapter(tmp_path):
    output = run_example("merge_export.py", "--model", "tiny", "--steps", 2, "--out", tmp_path / "merged")
    assert "the exported model computes what the adapter did: True" in output
    assert not re.search(r"changed the logits by up to 0\.00e\+00", output)  # the adapter did change something
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "adapter_config.json" not in files
