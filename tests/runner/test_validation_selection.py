"""Validation-based selection in `mazo train` (`--eval-every`, `best/`, `selected_step`) and the validation split of
`mazo eval` (`--split validation`), end to end on a tiny model and the real task files."""

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_mazo.cli import main
from peft_mazo.runner import RunConfig, RunError, latest_checkpoint, run
from peft_mazo.runner.validation import BEST_DIR, SELECTION_NAME, VALIDATION_LOG, ValidationSelector
from peft_mazo.tasks import sample_tasks
from tests.helpers import SHARED_DATA
from tests.runner.test_cli import small_config


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensors(path):
    return load_file(path / "adapter_model.safetensors")


def selecting_config(model_dir, out, **overrides):
    # lr 1, seed 1: the validation loss of this tiny model is lowest at step 4 of 6 (neither the first nor the last)
    values = dict(steps=6, eval_every=2, n_val=6, n_val_eval=4, lr=1.0, seed=1, evaluate_before=False)
    values.update(overrides)
    return small_config(model_dir, out, **values)


def test_best_is_the_adapter_of_the_step_with_the_lowest_validation_loss(tiny_model_dir, tmp_path):
    results = run(selecting_config(tiny_model_dir, tmp_path / "run"))
    log = read_log(tmp_path / "run" / VALIDATION_LOG)
    assert [r["step"] for r in log] == [0, 2, 4, 6]  # every 2 steps, the last one, and the starting point
    assert log[0]["candidate"] is False  # the untrained adapter is logged, never selected
    candidates = [r for r in log if r["candidate"]]
    lowest = min(candidates, key=lambda r: r["loss"])
    assert results["selected_step"] == lowest["step"] == 4
    assert results["selection"]["all"]["curve"] == [[r["step"], r["loss"]] for r in log]
    assert all(set(r["losses"]) == {"sst2", "copa"} for r in log)
    selection = json.loads((tmp_path / "run" / BEST_DIR / SELECTION_NAME).read_text())
    assert selection["step"] == lowest["step"] and selection["loss"] == pytest.approx(lowest["loss"])

    # the same run stopped at the selected step ends with exactly best/'s adapter (evaluating does not change training)
    straight = run(small_config(tiny_model_dir, tmp_path / "short", steps=4, lr=1.0, seed=1, n_val=6,
                                evaluate_before=False))  # fmt: skip
    assert straight["after"]  # a plain run: no selection keys
    assert "selected_step" not in straight and not (tmp_path / "short" / BEST_DIR).exists()
    best, short = tensors(tmp_path / "run" / BEST_DIR), tensors(tmp_path / "short" / "adapter")
    assert best.keys() == short.keys() and all(torch.equal(best[k], short[k]) for k in best)
    last = tensors(tmp_path / "run" / "adapter")  # adapter/ stays the last step's
    assert any(not torch.equal(best[k], last[k]) for k in best)


def training_records(out):
    # everything a step measured and did, not how long it took
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(out / "losses.jsonl")]


@pytest.mark.parametrize("method, r", [("mazo-lora", 4), ("mtl-zo-lora", 4), ("mazo", None), ("mtl-zo", None)])
def test_the_training_trajectory_does_not_depend_on_how_often_it_is_evaluated(tiny_model_dir, tmp_path, method, r):
    # same seed and settings, evaluated never / every 2 steps on 2 examples / every step with --patience: the same
    # batches, the same z, the same losses at every step (an evaluation may only end the run earlier)
    common = dict(method=method, r=r, steps=6, n_val=6, lr=1.0 if r else 1e-2, seed=1, evaluate_before=False)
    runs = {
        "never": dict(eval_every=0),
        "every 2": dict(eval_every=2, n_val_eval=2),
        "every step, patience": dict(eval_every=1, n_val_eval=4, patience=1),
    }
    records = {}
    for name, overrides in runs.items():
        run(small_config(tiny_model_dir, tmp_path / name, **common, **overrides))
        records[name] = training_records(tmp_path / name)
    plain = records["never"]
    assert len(plain) == 6 and len({r["loss"] for r in plain}) > 1  # it trains
    assert records["every 2"] == plain
    assert records["every step, patience"] == plain[: len(records["every step, patience"])]
    same = tensors(tmp_path / "never" / "adapter"), tensors(tmp_path / "every 2" / "adapter")
    assert same[0].keys() == same[1].keys() and all(torch.equal(same[0][k], same[1][k]) for k in same[0])


def test_best_adapter_reloaded_gives_the_logged_loss_and_results_score_it(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from peft_mazo.models import load_model_and_tokenizer
    from peft_mazo.tasks import evaluate_tasks

    config = selecting_config(tiny_model_dir, tmp_path / "run")
    results = run(config)
    log = {r["step"]: r for r in read_log(tmp_path / "run" / VALIDATION_LOG)}
    base, tokenizer = load_model_and_tokenizer(config.model, device="cpu")
    model = PeftModel.from_pretrained(base, tmp_path / "run" / BEST_DIR)
    splits = sample_tasks(config.tasks, data_dir=config.data_dir, n_train=12, n_val=6, n_test=6, seed=config.seed)
    losses = ValidationSelector(config, config.tasks, splits, tokenizer, tmp_path / "x").losses(model)
    assert losses == pytest.approx(log[results["selected_step"]]["losses"], abs=1e-6)
    test = evaluate_tasks(model, tokenizer, {t: s.test for t, s in splits.items()}, batch_size=8, max_length=160)
    validation = evaluate_tasks(model, tokenizer, {t: s.val for t, s in splits.items()}, batch_size=8, max_length=160)
    for task in config.tasks:
        assert results["after"][task]["score"] == pytest.approx(test[task]["score"])
        assert results["validation"][task] == pytest.approx(validation[task])
        assert results["validation"][task]["n"] == 6
    assert results["average_validation"] == pytest.approx(sum(v["score"] for v in validation.values()) / 2)


def test_resume_keeps_the_selection_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = run(selecting_config(tiny_model_dir, tmp_path / "straight", eval_every=1, save_every=3))
    assert straight["selected_step"] == 4

    class Interrupt(Exception):
        pass

    def crash_at_4(step, record):
        if step == 4:
            raise Interrupt

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run(selecting_config(tiny_model_dir, out, eval_every=1, save_every=3), on_step=crash_at_4)
    # the crash left best/ newer than the last checkpoint: step 4's adapter, step 3's checkpoint
    assert latest_checkpoint(out).name == "checkpoint-3"
    assert json.loads((out / BEST_DIR / SELECTION_NAME).read_text())["step"] == 4
    resumed = run(selecting_config(tiny_model_dir, out, eval_every=1, save_every=3, resume=True))
    assert resumed["selected_step"] == 4
    assert resumed["validation"] == straight["validation"] and resumed["after"] == straight["after"]
    steps = [r["step"] for r in read_log(out / VALIDATION_LOG)]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint, then continued
    a, b = tensors(tmp_path / "straight" / BEST_DIR), tensors(out / BEST_DIR)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_patience_stops_when_the_validation_loss_stops_falling(tiny_model_dir, tmp_path):
    # lr 0: the adapter never moves, so no evaluation after the first is lower
    results = run(selecting_config(tiny_model_dir, tmp_path, steps=8, eval_every=1, patience=2, lr=0.0))
    assert results["selected_step"] == 1
    assert results["selection"]["all"]["stopped_early_at"] == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_zero_shot_with_eval_every_also_scores_the_validation_examples(tiny_model_dir, tmp_path):
    results = run(small_config(tiny_model_dir, tmp_path, method="zero-shot", eval_every=1, n_val=5))
    assert results["selected_step"] == 0
    assert {t: r["n"] for t, r in results["validation"].items()} == {"sst2": 5, "copa": 5}
    assert {t: r["n"] for t, r in results["after"].items()} == {"sst2": 6, "copa": 6}


def test_eval_split_validation_scores_the_validation_examples(tiny_model_dir, tmp_path, monkeypatch):
    import peft_mazo.tasks

    train = tmp_path / "train"
    run(small_config(tiny_model_dir, train, steps=2, evaluate_before=False))
    scored = {}
    real = peft_mazo.tasks.evaluate_tasks

    def spy(model, tokenizer, examples_by_task, **kwargs):
        scored.update({t: [e.uid for e in ex] for t, ex in examples_by_task.items()})
        return real(model, tokenizer, examples_by_task, **kwargs)

    monkeypatch.setattr(peft_mazo.tasks, "evaluate_tasks", spy)
    argv = ["eval", "--model", str(tiny_model_dir), "--adapter", str(train / "adapter"), "--tasks", "sst2,copa",
            "--data-dir", str(SHARED_DATA), "--out", str(tmp_path / "eval"), "--split", "validation", "--n-train",
            "12", "--n-val", "5", "--n-test", "6", "--eval-batch-size", "8", "--max-length", "160"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    splits = sample_tasks(["sst2", "copa"], data_dir=SHARED_DATA, n_train=12, n_val=5, n_test=6, seed=0)
    assert results["split"] == "validation"
    for task, split in splits.items():
        assert sorted(scored[task]) == sorted(e.uid for e in split.val)  # the validation examples, not the test ones
        assert not set(scored[task]) & {e.uid for e in split.test}
        assert results["after"][task]["n"] == 5 == results["sizes"][task]["val"]

    # the base model, too (`mazo eval` without --adapter)
    scored.clear()
    assert main(argv[:3] + argv[5:]) == 0
    assert sorted(scored["copa"]) == sorted(e.uid for e in splits["copa"].val)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eval_every": -1}, "--eval-every must be an integer >= 0"),
        ({"split": "foo"}, "--split must be one of test, validation"),
        ({"patience": 3}, "--patience 3 counts validation evaluations, but --eval-every is 0"),
        ({"eval_every": 5, "n_val": 0}, "needs validation examples, but --n-val is 0"),
        ({"n_val_eval": 0, "eval_every": 1}, "--n-val-eval must be a positive integer"),
    ],
)
def test_bad_selection_values_are_refused(tiny_model_dir, tmp_path, overrides, match):
    with pytest.raises(RunError, match=match):
        small_config(tiny_model_dir, tmp_path / "run", **overrides)


def test_bad_selection_flags_exit_with_status_2(tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--tasks", "sst2", "--data-dir", str(SHARED_DATA), "--out", str(tmp_path)]
    assert main(["train", *base, "--eval-every", "-1"]) == 2
    assert "--eval-every must be an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *base, "--split", "foo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_eval_every_is_a_flag_with_its_dataclass_default():
    from peft_mazo.cli import _config, build_parser

    args = build_parser().parse_args(["train", "--model", "m", "--tasks", "sst2", "--eval-every", "25",
                                      "--n-val-eval", "all", "--split", "validation"])  # fmt: skip
    config = _config(args)
    assert (config.eval_every, config.n_val_eval, config.split) == (25, None, "validation")
    assert RunConfig(model="m", tasks=["sst2"]).eval_every == 0
