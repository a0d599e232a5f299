"""`mazo train` guards a user's data and refuses options it would ignore: a used --out, --resume onto another model,
--sparsity for a mask-less method, evaluation-only flags; SIGINT ends with a message and rc 130."""

from __future__ import annotations

import pytest

from peft_mazo import cli
from peft_mazo.cli import build_parser, main
from peft_mazo.runner import RunConfig, RunError, run
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny_model_{seed}")
        make_tiny_llama(seed=seed, max_position_embeddings=256).save_pretrained(path)
        make_tiny_tokenizer(pad=True).save_pretrained(path)
        dirs.append(path)
    return dirs


def config(model_dir, out, **overrides) -> RunConfig:
    values = dict(
        model=str(model_dir), tasks=["sst2", "copa"], method="mazo-lora", out=str(out), data_dir=str(SHARED_DATA),
        steps=2, r=4, batch_size=2, eval_batch_size=8, n_train=8, n_val=2, n_test=4, save_every=1, calib_batches=1,
        calib_batch_size=2, max_length=96, evaluate_before=False,
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_used_out_is_refused_unless_resume_or_overwrite(model_dirs, tmp_path):
    out = tmp_path / "run"
    run(config(model_dirs[0], out))
    before = snapshot(out)
    with pytest.raises(RunError, match=r"already holds a run .* --resume .* --overwrite"):
        run(config(model_dirs[0], out, lr=1e-2))
    assert snapshot(out) == before  # nothing was touched
    run(config(model_dirs[0], out, lr=1e-2, overwrite=True))
    assert snapshot(out)["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]


def test_resume_onto_another_base_model_is_refused_before_any_work(model_dirs, tmp_path):
    out = tmp_path / "run"
    run(config(model_dirs[0], out, steps=1))
    before = snapshot(out)
    with pytest.raises(RunError, match=r"other settings \(model: "):
        run(config(model_dirs[1], out, steps=2, resume=True))
    with pytest.raises(RunError, match=r"other settings \(dtype: "):
        run(config(model_dirs[0], out, steps=2, resume=True, dtype="float64"))
    assert snapshot(out) == before


def test_sparsity_for_a_method_without_mask_is_refused(model_dirs, tmp_path):
    with pytest.raises(RunError, match=r"--sparsity 0\.5: method 'mtl-zo' trains every weight"):
        run(config(model_dirs[0], tmp_path / "run", method="mtl-zo", sparsity=0.5))
    assert not (tmp_path / "run").exists()


def test_eval_refuses_training_flags_and_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["eval", "--model", "m", "--tasks", "sst2", "--out", "o", "--eval-every", "5"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --eval-every" in capsys.readouterr().err
    train = build_parser().parse_args(["train", "--model", "m", "--tasks", "sst2", "--out", "o", "--coba-every", "7"])
    assert cli._config(train).coba_every == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "(default: 1000)" in capsys.readouterr().out


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(config, on_step=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    code = main(["train", "--model", "m", "--tasks", "sst2", "--out", str(tmp_path / "run")])
    assert code == 130
    err = capsys.readouterr().err
    assert "mazo: interrupted" in err and "with the same command and --resume" in err


def test_a_resumed_run_reports_the_zero_shot_scores_of_its_start(model_dirs, tmp_path):
    class Crash(Exception):
        pass

    def crash_after_first_step(step, record):
        if step == 1:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        run(config(model_dirs[0], out, evaluate_before=True), on_step=crash_after_first_step)
    resumed = run(config(model_dirs[0], out, evaluate_before=True, resume=True))
    straight = run(config(model_dirs[0], tmp_path / "straight", evaluate_before=True))
    assert resumed["before"] and resumed["before"] == straight["before"]
    assert resumed["after"] == straight["after"]


def test_two_runs_cannot_share_an_out(model_dirs, tmp_path):
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)  # what a running `mazo train` holds
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match=r"in use by another mazo run"):
            run(config(model_dirs[0], out))
        assert not list(out.iterdir())
    finally:
        os.close(holder)
    run(config(model_dirs[0], out))  # free again
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("damage", ["truncated adapter", "garbage state"])
def test_resume_from_a_damaged_checkpoint_names_it_before_any_work(model_dirs, tmp_path, damage):
    from peft_mazo.runner import latest_checkpoint

    out = tmp_path / "run"
    run(config(model_dirs[0], out, steps=1))
    checkpoint = latest_checkpoint(out)
    if damage == "truncated adapter":
        adapter = checkpoint / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:-100])
    else:
        (checkpoint / "state.pt").write_bytes(b"not a torch file")
    before = snapshot(out)
    with pytest.raises(RunError, match=rf"checkpoint {checkpoint} is damaged"):
        run(config(model_dirs[0], out, steps=2, resume=True))
    assert snapshot(out) == before


def test_a_diverging_loss_is_pointed_out_once(model_dirs, tmp_path, monkeypatch):
    import torch

    import peft_mazo.tasks

    calls = []

    def growing_losses(model, batches, *args, **kwargs):
        calls.append(1)
        step = len(calls) // 2
        return torch.tensor([1.0, 1.0]) * (1.0 if step < 12 else 50.0)

    monkeypatch.setattr(peft_mazo.tasks, "multitask_losses", growing_losses)
    with pytest.warns(
        RuntimeWarning, match=r"The training loss diverges: 25\.5 at step 12, 25\.5 x .* --lr"
    ) as record:
        run(config(model_dirs[0], tmp_path / "run", steps=16, save_every=16, lr=1e8))
    assert sum("diverges" in str(w.message) for w in record) == 1
