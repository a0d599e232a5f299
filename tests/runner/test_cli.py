"""The `mazo` command and the run behind it, end to end on a tiny model and the real task files."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peft_mazo.cli import main
from peft_mazo.methods import METHODS
from peft_mazo.runner import RunConfig, RunError, latest_checkpoint, run
from tests.helpers import SHARED_DATA


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
TASKS = ["sst2", "copa"]


def small_config(model_dir, out, **overrides) -> RunConfig:
    values = dict(
        model=str(model_dir),
        tasks=list(TASKS),
        method="mazo-lora",
        out=str(out),
        data_dir=str(SHARED_DATA),
        steps=4,
        r=4,
        lr=1e-3,
        batch_size=2,
        eval_batch_size=8,
        n_train=12,
        n_val=4,
        n_test=6,
        save_every=2,
        calib_batches=1,
        calib_batch_size=4,
        max_length=160,
    )
    values.update(overrides)
    return RunConfig(**values)


def adapter_tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_train_writes_results_log_plot_and_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(tiny_model_dir), "--tasks", "sst2,copa", "--method", "mazo-lora", "--r", "4",
         "--steps", "3", "--save-every", "2", "--data-dir", str(SHARED_DATA), "--out", str(out), "--n-train", "12",
         "--n-val", "4", "--n-test", "6", "--batch-size", "2", "--calib-batches", "1", "--max-length", "160"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "average" in printed and "sst2" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["after"]) == set(TASKS) == set(results["before"])
    for task in TASKS:
        n = results["after"][task]["n"]
        assert n == results["sizes"][task]["test"]
        correct = results["after"][task]["score"] * n / 100  # an accuracy over n examples: a whole number correct
        assert 0 <= round(correct) <= n and correct == pytest.approx(round(correct), abs=1e-9)
    assert results["sizes"]["sst2"] == {"train": 12, "val": 4, "test": 6}
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(set(r["losses"]) == set(TASKS) and all(v > 0 for v in r["losses"].values()) for r in log)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest_checkpoint(out).name == "checkpoint-3"
    assert not list(out.glob("checkpoint-2")) and not list(out.glob(".checkpoint-*"))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "importance.txt").read_text().strip()


def test_resume_after_interruption_gives_the_same_adapter(tiny_model_dir, tmp_path):
    straight = small_config(tiny_model_dir, tmp_path / "straight", evaluate_before=False)
    run(straight)

    class Interrupt(Exception):
        pass

    def crash_at_3(step, record):
        if step == 3:
            raise Interrupt

    interrupted = small_config(tiny_model_dir, tmp_path / "resumed", evaluate_before=False)
    with pytest.raises(Interrupt):
        run(interrupted, on_step=crash_at_3)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    run(small_config(tiny_model_dir, tmp_path / "resumed", evaluate_before=False, resume=True))

    expected = adapter_tensors(tmp_path / "straight" / "adapter")
    got = adapter_tensors(tmp_path / "resumed" / "adapter")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("mazo-lora",)])
def test_every_method_runs_a_few_steps(tiny_model_dir, tmp_path, method):
    config = small_config(
        tiny_model_dir, tmp_path, method=method, steps=2, r=None, n_test=4, lr=None, evaluate_before=False,
        coba_every=1,
    )  # fmt: skip
    if METHODS[method].adapter is not None and METHODS[method].adapter.get("r"):
        config.r = 4
    results = run(config)
    assert set(results["after"]) == set(TASKS)
    if METHODS[method].trains:
        groups = TASKS if METHODS[method].per_task else [None]
        for task in groups:
            directory = tmp_path / task if task else tmp_path
            log = (directory / "losses.jsonl").read_text().splitlines()
            assert len(log) == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"tasks": ["sst2", "mnli"]}, "Unknown task 'mnli'.*sst2.*boolq"),
        ({"data_dir": "/nonexistent/data"}, "/nonexistent/data"),
        ({"steps": 0}, "--steps must be a positive integer"),
        ({"method": "mezo"}, "Unknown method 'mezo'. Known methods: zero-shot"),
        ({"resume": True}, "no complete checkpoint"),
        ({"tasks": ["sst2", "sst2"]}, "twice"),
        ({"eps": 0.0}, "--eps must be"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny_model_dir, tmp_path, overrides, match):
    out = tmp_path / "run"
    with pytest.raises(RunError, match=match):
        run(small_config(tiny_model_dir, out, **overrides))
    assert not (out / "results.json").exists() and not (out / "losses.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_is_refused(tiny_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(RunError, match="not writable"):
        run(small_config(tiny_model_dir, locked / "run"))


def test_console_script_reports_errors_with_exit_code_2(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_mazo.cli", "train", "--model", str(tiny_model_dir), "--tasks", "sst2,nope",
         "--data-dir", str(SHARED_DATA), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Unknown task 'nope'" in result.stderr


def test_eval_of_a_saved_adapter_matches_the_training_run(tiny_model_dir, tmp_path):
    train_out = tmp_path / "train"
    trained = run(small_config(tiny_model_dir, train_out, steps=2, evaluate_before=False))
    eval_out = tmp_path / "eval"
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--adapter", str(train_out / "adapter"), "--tasks", "sst2,copa",
         "--data-dir", str(SHARED_DATA), "--out", str(eval_out), "--n-test", "6",
         "--eval-batch-size", "8", "--max-length", "160"]
    )  # fmt: skip
    assert code == 0
    evaluated = json.loads((eval_out / "results.json").read_text())
    for task in TASKS:
        assert evaluated["after"][task]["score"] == pytest.approx(trained["after"][task]["score"])


def test_train_on_a_4bit_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = small_config(tiny_model_dir, tmp_path, load_in_4bit=True, steps=2, evaluate_before=False, n_test=4)
    results = run(config)
    assert set(results["after"]) == set(TASKS)
    log = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    assert any(r["projected_grads"]["sst2"] != 0 for r in log)  # the nf4 model's adapter really moved the loss
    trained = adapter_tensors(tmp_path / "adapter")
    assert any(k.endswith("mazo_B") and t.abs().sum() > 0 for k, t in trained.items())


def test_cli_flags_and_defaults_come_from_run_config():
    """Every RunConfig field is a `mazo train` flag with the dataclass's default; `mazo eval` takes only the
    evaluation fields (plus --adapter); comma- and space-separated task lists and the short aliases parse alike."""
    from dataclasses import MISSING, fields

    from peft_mazo.cli import _config, build_parser
    from peft_mazo.runner import EvalConfig

    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--tasks", "sst2,boolq"])
    config = _config(args)
    for spec in fields(RunConfig):
        if spec.default is not MISSING:
            assert getattr(config, spec.name) == spec.default, spec.name
    assert config.tasks == ["sst2", "boolq"]
    spaced = _config(parser.parse_args(["train", "--model", "m", "--tasks", "sst2", "boolq", "--no-eval-before"]))
    assert spaced.tasks == ["sst2", "boolq"] and spaced.evaluate_before is False
    assert _config(parser.parse_args(["train", "--model", "m", "--tasks", "sst2", "--n-train", "all"])).n_train is None
    assert (
        _config(parser.parse_args(["train", "--model", "m", "--tasks", "sst2", "--no-cuda-graphs"])).cuda_graphs
        is False
    )

    eval_names = {f.name for f in fields(EvalConfig)}
    assert "adapter" in eval_names and not {"steps", "lr", "method", "eval_every", "resume"} & eval_names
    assert {"split", "n_train", "n_val"} <= eval_names  # which train.jsonl examples are the validation ones
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--tasks", "sst2", "--out", "o", "--steps", "3"])
    with pytest.raises(SystemExit):  # an evaluation always names where its results go
        parser.parse_args(["eval", "--model", "m", "--tasks", "sst2"])
