"""Every benchmark script runs end to end on the CPU at tiny shapes (`--tiny`) and writes its JSON with the device,
the versions and the medians it reports, so that the scripts behind the documented figures do not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, SHARED_DATA


SCRIPTS = {  # script: (extra arguments, a check of its JSON)
    "zo_step.py": (["--configs", "forward,mazo_lora"], lambda r: r["results"]["mazo_lora"]["median_ms"] > 0),
    "forward.py": ([], lambda r: r["device"]),
    "importance.py": ([], lambda r: r["device"]),
    "distributed.py": ([], lambda r: r["speedup"]),
    "fsdp_memory.py": ([], lambda r: r["results"]["tiny"]["mazo_lora"]["2"]["total"] > 0 and "git_commit" in r),
    "multitask_step.py": (
        ["--methods", "mazo-lora", "--cli-steps", "6", "--data-dir", str(SHARED_DATA)],
        lambda r: r["rows"]["mazo-lora"]["step_fast_ms"] > 0 and r["cli"]["steps"] == 6 and "git_commit" in r,
    ),
    "mechanisms.py": (
        ["--data-dir", str(SHARED_DATA)],
        lambda r: r["cosine"]["masked"]["d"] > 0 and r["hessian"]["spectra"]["multi-task"] and "git_commit" in r,
    ),
}
NEEDS_DATA = {"multitask_step.py", "mechanisms.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs_tiny_and_writes_its_json(script, tmp_path):
    if script in NEEDS_DATA and not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    extra, check = SCRIPTS[script]
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *extra]
    if script != "multitask_step.py":
        command += ["--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert check(report), report
