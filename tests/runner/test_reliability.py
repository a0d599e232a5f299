"""Reliability of `mazo train` under faults: hard kills, full disks, unwritable directories, non-finite losses, and
determinism (the same seed gives the same masks and the same trained adapter on the same machine).

Everything runs on a tiny Llama built in code and the real task files of ../shared/data.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import peft_mazo
import peft_mazo.tasks
from peft_mazo import runner
from peft_mazo.cli import main
from peft_mazo.runner import CheckpointError, RunConfig, RunError, RunFailed, latest_checkpoint, run
from tests.helpers import ROOT, SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
TASKS = ["sst2", "copa"]
# A run of the killed-and-resumed test: every step writes a checkpoint, so that kills often land inside one.
KILL_ARGS = [
    "--tasks", "sst2,copa", "--method", "mazo-lora", "--r", "4", "--steps", "24", "--save-every", "1", "--lr", "1e-3",
    "--batch-size", "2", "--n-train", "12", "--n-val", "4", "--n-test", "4", "--calib-batches", "1",
    "--calib-batch-size", "4", "--max-length", "96", "--no-eval-before", "--data-dir", str(SHARED_DATA),
]  # fmt: skip


def small_config(model_dir: Path, out: Path, **overrides) -> RunConfig:
    values = dict(
        model=str(model_dir), tasks=list(TASKS), method="mazo-lora", out=str(out), data_dir=str(SHARED_DATA),
        steps=6, r=4, lr=1e-3, batch_size=2, eval_batch_size=8, n_train=12, n_val=4, n_test=4, save_every=2,
        calib_batches=1, calib_batch_size=4, max_length=96, evaluate_before=False,
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:5]


def log_records(out: Path) -> list[dict]:
    """The per-step records of losses.jsonl without the wall times."""
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_checkpoint_complete(checkpoint: Path) -> None:
    """Every file of a checkpoint is there and readable: config, weights, optimizer/sampler state, settings."""
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "MAZO"
    assert load_file(checkpoint / "adapter_model.safetensors")
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["step"] == int(checkpoint.name.removeprefix("checkpoint-"))
    assert json.loads((checkpoint / "run_config.json").read_text())["tasks"] == TASKS


# ----------------------------------------------------------------------------------------------------------------------
# hard kills
# ----------------------------------------------------------------------------------------------------------------------
# Every process whose results are compared bit for bit runs with one thread (thread counts change float reductions).
THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def mazo_train(model_dir: Path, out: Path, resume: bool) -> subprocess.Popen:
    env = THREAD_ENV
    command = [sys.executable, "-m", "peft_mazo.cli", "train", "--model", str(model_dir), "--out", str(out)]
    command += KILL_ARGS + (["--resume"] if resume else [])
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    process = mazo_train(tiny_model_dir, out, resume=False)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return out


# Where the killed-and-resumed run SIGKILLs itself: (kind, zero-based optimizer step). Deterministic points, one in
# each phase of a step: in a forward pass, halfway through the update of the trainable tensors, and halfway through
# writing a checkpoint (state.pt half written in the staging directory).
KILL_POINTS = [("forward", 4), ("update", 10), ("checkpoint", 16)]
KILL_PATCHES = {
    "forward": """
        real_step = optimizer.ZOSGD.step
        def step(self, closure=None):
            if self.state["zo"]["step"] != {step}:
                return real_step(self, closure)
            calls = []
            def killing_closure():
                calls.append(1)
                value = closure()
                if len(calls) == 2:  # the - pass, after the + pass
                    os.kill(os.getpid(), signal.SIGKILL)
                return value
            return real_step(self, killing_closure)
        optimizer.ZOSGD.step = step
    """,
    "update": """
        real_update = optimizer.ZOSGD._update_param
        updated = []
        def update(self, *args, **kwargs):
            result = real_update(self, *args, **kwargs)
            if self.state["zo"]["step"] == {step}:
                updated.append(1)
                if len(updated) == 2:  # some tensors of this step updated, the others not yet
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        optimizer.ZOSGD._update_param = update
    """,
    "checkpoint": """
        real_save = torch.save
        def save(obj, path, *args, **kwargs):
            if "checkpoint-{checkpoint}" in str(path):
                with open(path, "wb") as handle:
                    handle.write(b"half a file")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *args, **kwargs)
        torch.save = save
    """,
}


def killed_mazo_train(model_dir: Path, out: Path, kind: str, step: int) -> subprocess.CompletedProcess:
    """`mazo train` (resuming when `out` has a checkpoint) in a process that SIGKILLs itself at (`kind`, `step`)."""
    resume = ["--resume"] if latest_checkpoint(out) is not None else []
    argv = ["train", "--model", str(model_dir), "--out", str(out), *KILL_ARGS, *resume]
    script = textwrap.dedent(
        """
        import os, signal
        import torch
        torch.set_num_threads(1)
        from peft_mazo import runner
        from peft_mazo.zo import optimizer
        """
    )
    script += textwrap.dedent(KILL_PATCHES[kind].format(step=step, checkpoint=step + 1))
    script += f"from peft_mazo.cli import main\nmain({argv!r})\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=THREAD_ENV)


def test_sigkill_in_a_forward_an_update_and_a_checkpoint_write_then_resume_gives_the_same_adapter(
    tiny_model_dir, uninterrupted_run, tmp_path
):
    """`mazo train` is SIGKILLed inside a forward pass, halfway through an update and halfway through a checkpoint
    write, resumed each time, and finishes with the adapter, the mask and the loss log of an uninterrupted run; after
    every kill `latest` names a complete checkpoint. Every process runs with one thread, so the runs are bitwise
    comparable."""
    out = tmp_path / "killed"
    for kind, step in KILL_POINTS:
        result = killed_mazo_train(tiny_model_dir, out, kind, step)
        assert result.returncode == -signal.SIGKILL, (kind, result.stderr[-3000:])
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None and checkpoint.name == f"checkpoint-{step}", (kind, checkpoint)
        assert_checkpoint_complete(checkpoint)  # never half-written: whatever `latest` names is complete

    # A crash can also cut a log line short; the resumed run must drop it.
    with open(out / "losses.jsonl", "a") as log:
        log.write('{"step": 99, "loss": 0.69, "los')
    process = mazo_train(tiny_model_dir, out, resume=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    assert_same_tensors(adapter_tensors(uninterrupted_run / "adapter"), adapter_tensors(out / "adapter"))
    assert log_records(out) == log_records(uninterrupted_run)
    assert latest_checkpoint(out).name == "checkpoint-24"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-24"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


KILL_INSIDE = {
    # SIGKILL after half of state.pt was written into the staging directory of checkpoint-4
    "mid_write": KILL_PATCHES["checkpoint"].format(step=None, checkpoint=4),
    # SIGKILL after checkpoint-4 was renamed into place but before `latest` was switched to it
    "before_latest": """
        real_write = runner.checkpoint.write_text_atomically
        def write(path, text):
            if path.name == "latest" and text == "checkpoint-4":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, text)
        runner.checkpoint.write_text_atomically = write
    """,
}


def run_in_subprocess(config: RunConfig, patch: str = "") -> subprocess.CompletedProcess:
    """`runner.run(config)` in a fresh one-thread process, after the Python of `patch` (e.g. a fault to inject)."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        torch.set_num_threads(1)
        from peft_mazo import runner
        from peft_mazo.runner import RunConfig
        """
    )
    script += textwrap.dedent(patch)
    script += f"runner.run(RunConfig(**{vars(config)!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=THREAD_ENV)


@pytest.mark.parametrize("where", list(KILL_INSIDE))
def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_one(tiny_model_dir, tmp_path, where):
    out = tmp_path / "run"
    result = run_in_subprocess(small_config(tiny_model_dir, out), KILL_INSIDE[where])
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]

    assert latest_checkpoint(out).name == "checkpoint-2"
    assert_checkpoint_complete(out / "checkpoint-2")
    leftovers = sorted(p.name for p in out.iterdir() if "checkpoint-4" in p.name)
    if where == "before_latest":
        assert leftovers == ["checkpoint-4"]  # complete, but not named by `latest`: dropped on resume
    else:
        assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint-4-")  # the half-written staging dir

    resumed = run_in_subprocess(small_config(tiny_model_dir, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"
    finished = run_in_subprocess(small_config(tiny_model_dir, reference))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_tensors(adapter_tensors(reference / "adapter"), adapter_tensors(out / "adapter"))
    assert log_records(out) == log_records(reference)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the stale staging directory is gone


# ----------------------------------------------------------------------------------------------------------------------
# full disk, unwritable directories
# ----------------------------------------------------------------------------------------------------------------------
def test_too_little_free_space_is_reported_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(runner.job, "load_model_and_tokenizer", lambda *args, **kwargs: loaded.append(args))
    usage = runner.preflight.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runner.preflight.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"Not enough free disk space .* MiB needed .* 1\.0 MiB free\. Free some space"):
        run(small_config(tiny_model_dir, out))
    assert not loaded and not out.exists()


def test_adapter_size_estimate_matches_the_saved_adapter(tiny_model_dir, tmp_path):
    """The free-space check needs 2 x this estimate (+ a margin); it is made from the model's config alone."""
    config = small_config(tiny_model_dir, tmp_path / "run")
    estimate = runner.estimate_adapter_bytes(config)
    run(config)
    saved = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert estimate <= saved < estimate + 16 * 1024  # safetensors adds only a JSON header


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.ENOSPC, r"Free disk space .*rerun with --resume"),
        (errno.EACCES, r"Make .* writable and rerun with --resume"),
    ],
    ids=["disk-full", "permission-denied"],
)
def test_oserror_while_writing_a_checkpoint_keeps_the_last_one(
    tiny_model_dir, tmp_path, monkeypatch, capsys, code, fix
):
    out = tmp_path / "run"
    saved: dict[str, bytes] = {}
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            with open(path, "wb") as handle:
                handle.write(b"partial")  # the disk fills up in the middle of the file
            raise OSError(code, os.strerror(code))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    real_checkpoint = runner.save_checkpoint

    def remember(out_dir, step, *args, **kwargs):
        path = real_checkpoint(out_dir, step, *args, **kwargs)
        if step == 2:
            saved.update(file_bytes(path))
        return path

    monkeypatch.setattr(runner.loop, "save_checkpoint", remember)
    argv = ["train", "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "sst2,copa", "--r", "4",
            "--steps", "6", "--save-every", "2", "--lr", "1e-3", "--batch-size", "2", "--n-train", "12", "--n-val",
            "4", "--n-test", "4", "--calib-batches", "1", "--calib-batch-size", "4", "--max-length", "96",
            "--no-eval-before", "--data-dir", str(SHARED_DATA)]  # fmt: skip
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert "Could not write checkpoint checkpoint-4" in message
    assert os.strerror(code) in message and "Nothing was half-written" in message
    assert f"{out / 'checkpoint-2'}, is intact" in message
    assert re.search(fix, message)
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert file_bytes(out / "checkpoint-2") == saved  # byte-identical to what was written at step 2
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no staging left

    monkeypatch.setattr(torch, "save", real_save)
    assert main(argv + ["--resume"]) == 0
    reference = tmp_path / "reference"
    run(small_config(tiny_model_dir, reference))
    assert_same_tensors(adapter_tensors(reference / "adapter"), adapter_tensors(out / "adapter"))


def test_checkpoint_error_is_a_run_failure_naming_the_checkpoint(tmp_path):
    model = get_peft_model(make_tiny_llama(), peft_mazo.MaZOConfig(r=4, sparsity=0.5))
    runner.save_checkpoint(tmp_path, 1, model, {"step": 1})
    locked = tmp_path / "sub"
    with pytest.raises(CheckpointError, match=r"Could not write checkpoint checkpoint-2 in .*sub") as info:
        runner.save_checkpoint(locked, 2, model, {"step": 2})  # the directory does not exist: an OSError
    assert isinstance(info.value, RunFailed) and "no checkpoint was completed yet" in str(info.value)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_unwritable_output_directory_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(
        runner.preflight.tempfile, "NamedTemporaryFile", refuse
    )  # root may write anywhere: simulate it
    out = tmp_path / "locked" / "run"
    with pytest.raises(RunError, match=r"not writable \(Permission denied\); choose another --out or fix"):
        run(small_config(tiny_model_dir, out))
    assert not out.exists() and not out.parent.exists()


def test_output_path_under_a_file_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RunError, match=r"is a file, not a directory; choose another --out"):
        run(small_config(tiny_model_dir, tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "mine"


def test_stale_files_of_an_interrupted_run_are_removed(tmp_path):
    model = get_peft_model(make_tiny_llama(), peft_mazo.MaZOConfig(r=4, sparsity=0.5))
    runner.save_checkpoint(tmp_path, 2, model, {"step": 2})
    (tmp_path / ".checkpoint-4-abc").mkdir()
    (tmp_path / ".checkpoint-4-abc" / "state.pt").write_bytes(b"half")
    (tmp_path / "checkpoint-1").mkdir()  # an older checkpoint whose removal was interrupted
    (tmp_path / ".latest.tmp").write_text("checkp")
    removed = {p.name for p in runner.remove_stale_files(tmp_path)}
    assert removed == {".checkpoint-4-abc", "checkpoint-1", ".latest.tmp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]


# ----------------------------------------------------------------------------------------------------------------------
# non-finite losses
# ----------------------------------------------------------------------------------------------------------------------
def nan_losses(every: int = 1):
    """A stand-in for `multitask_losses`: NaN on the steps whose index is a multiple of `every`."""
    from peft_mazo.tasks import multitask_losses

    calls = []

    def losses(model, batches):
        step = len(calls) // 2  # two forwards per ZO step
        calls.append(step)
        value = multitask_losses(model, batches)
        return torch.full_like(value, float("nan")) if step % every == 0 else value

    return losses


def test_only_non_finite_losses_stop_the_run_after_max_skipped_steps(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peft_mazo.tasks, "multitask_losses", nan_losses())
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--out", str(out), "--tasks", "sst2,copa", "--r", "4",
            "--steps", "20", "--save-every", "2", "--n-train", "12", "--n-val", "4", "--n-test", "4",
            "--batch-size", "2", "--calib-batches", "1", "--max-length", "96", "--no-eval-before",
            "--data-dir", str(SHARED_DATA), "--max-skipped-steps", "3"]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert main(argv) == 1
    message = capsys.readouterr().err
    assert "Training stopped at step 3: the last 3 steps all gave a non-finite loss (NaN or inf)" in message
    assert "--max-skipped-steps 3" in message and "Lower --lr or --eps" in message
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in message
    log = log_records(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["skipped"] for r in log)
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    # the adapter was never changed: the checkpoint holds the initial (identity) LoRA B
    tensors = adapter_tensors(out / "checkpoint-2")
    assert all(not t.any() for k, t in tensors.items() if k.endswith("mazo_B"))


def test_intermittent_non_finite_losses_are_skipped_and_counted(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(peft_mazo.tasks, "multitask_losses", nan_losses(every=3))
    with pytest.warns(RuntimeWarning, match="not finite"):
        results = run(small_config(tiny_model_dir, tmp_path, steps=6, max_skipped_steps=2))
    log = log_records(tmp_path)
    assert [r["skipped"] for r in log] == [True, False, False, True, False, False]
    assert results["skipped_steps"] == 2
    tensors = adapter_tensors(tmp_path / "adapter")
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_max_skipped_steps_zero_never_stops(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(peft_mazo.tasks, "multitask_losses", nan_losses())
    with pytest.warns(RuntimeWarning, match="not finite"):
        results = run(small_config(tiny_model_dir, tmp_path, steps=4, max_skipped_steps=0))
    assert results["skipped_steps"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_masks_and_adapter(tiny_model_dir, tmp_path):
    """Two runs in one process with the same seed: bit-identical masks, adapter weights and loss logs; another seed
    gives another adapter."""
    for name in ("a", "b"):
        run(small_config(tiny_model_dir, tmp_path / name, seed=7, steps=4))
    run(small_config(tiny_model_dir, tmp_path / "other", seed=8, steps=4))
    first, second = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter")
    assert any(k.endswith("mazo_bits") for k in first)
    assert_same_tensors(first, second)
    assert log_records(tmp_path / "a") == log_records(tmp_path / "b")
    assert (tmp_path / "a" / "importance.txt").exists()
    other = adapter_tensors(tmp_path / "other" / "adapter")
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("mazo_B"))


def test_same_seed_gives_the_same_masks_and_steps_through_the_api():
    tokenizer = make_tiny_tokenizer(pad=True)
    batches = [dict(tokenizer(["a tiny batch of text", "another one"], return_tensors="pt", padding=True))]

    def train(seed: int) -> tuple[dict, dict]:
        model = get_peft_model(make_tiny_llama(seed=0), peft_mazo.MaZOConfig(sparsity=0.8, r=4))
        model.compute_importance({"a": batches, "b": batches[:1]}, progress=False)
        opt = peft_mazo.ZOSGD(model, lr=1e-2, eps=1e-3, seed=seed)
        for _ in range(3):
            opt.step(lambda: model(**batches[0], labels=batches[0]["input_ids"]).loss)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model.get_masks(), trained

    masks_a, params_a = train(seed=0)
    masks_b, params_b = train(seed=0)
    assert_same_tensors(masks_a, masks_b)
    assert_same_tensors(params_a, params_b)
    _, params_c = train(seed=1)
    assert any(not torch.equal(params_a[k], params_c[k]) for k in params_a)
