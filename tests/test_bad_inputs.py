"""Table-driven bad-input suite across the public API and the `mazo` command.

Every case asserts:

- the exception type (for the command: the exit status 2 and the message on stderr);
- a message that names the problem (`problem` regex) and the fix (`fix` regex);
- that it was raised before any work: no forward pass of any model involved, and for the command no model loaded;
- that nothing the user had was modified: the models' state dicts and the files involved (adapters, data, run
  directories) are byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_mazo
from peft_mazo import ZOSGD, MaZOConfig, runner
from peft_mazo.cli import main
from peft_mazo.tasks import TaskDataError, load_examples
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


class CommandFailed(Exception):
    """`mazo ...` exited with a non-zero status; `str()` is what it printed on stderr."""

    def __init__(self, status: int, stderr: str) -> None:
        super().__init__(stderr)
        self.status = status


def mazo(*argv: Any) -> None:
    """Run the `mazo` command in this process; raise `CommandFailed` on a non-zero exit status."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            status = int(exit_.code)
    if status != 0:
        raise CommandFailed(status, stderr.getvalue())


@dataclass
class Attempt:
    """One bad call, what it must raise, and what it must leave alone."""

    call: Callable[[], Any]
    error: type[BaseException]
    problem: str
    fix: str
    models: list[nn.Module] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


class Env:
    """Builders' access to temporary paths, the tiny model directory and pytest's monkeypatch."""

    def __init__(self, tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.model_dir, self.monkeypatch = tmp_path, model_dir, monkeypatch

    def train_args(self, *extra: Any, out: Path | None = None) -> list[Any]:
        return [
            "train", "--model", self.model_dir, "--tasks", "sst2,copa", "--data-dir", SHARED_DATA,
            "--out", out or self.tmp / "run", "--r", "4", "--steps", "2", "--save-every", "1", "--lr", "1e-3",
            "--batch-size", "2", "--n-train", "8", "--n-val", "4", "--n-test", "4", "--calib-batches", "1",
            "--calib-batch-size", "4", "--max-length", "96", "--no-eval-before", *extra,
        ]  # fmt: skip

    def adapter(self, name: str, **config: Any) -> Path:
        """A saved adapter with a non-zero delta, on the tiny Llama of seed 0."""
        path = self.tmp / name
        model = get_peft_model(make_tiny_llama(), MaZOConfig(init_weights=False, **{"r": 0, **config}))
        model.save_pretrained(path)
        return path

    def peft_model(self, **config: Any) -> nn.Module:
        return get_peft_model(make_tiny_llama(), MaZOConfig(**{"r": 0, **config}))


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensor(adapter: Path, kind: str, edit: Callable[[torch.Tensor], None]) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(kind))
    tensors[key] = tensors[key].clone()
    edit(tensors[key])
    save_file(tensors, adapter / "adapter_model.safetensors")


def calibration(env: Env) -> list[dict[str, torch.Tensor]]:
    tokenizer = make_tiny_tokenizer(pad=True)
    return [dict(tokenizer(["some text", "more text here"], return_tensors="pt", padding=True))]


def bad_data_dir(env: Env, edit: Callable[[list[str]], None]) -> Path:
    """A copy of the SST-2 files whose train file is edited by `edit(lines)`."""
    root = env.tmp / "data"
    shutil.copytree(SHARED_DATA / "sst2", root / "sst2")
    train = root / "sst2" / "train.jsonl"
    lines = train.read_text().splitlines()[:40]
    edit(lines)
    train.write_text("\n".join(lines) + "\n")
    return root


def drop_label(lines: list[str]) -> None:
    record = json.loads(lines[1])
    del record["label"]
    lines[1] = json.dumps(record)


# ----------------------------------------------------------------------------------------------------------------------
# the table: id -> builder(env) -> Attempt
# ----------------------------------------------------------------------------------------------------------------------
def config_case(problem: str, fix: str, **kwargs: Any) -> Callable[[Env], Attempt]:
    return lambda env: Attempt(lambda: MaZOConfig(**kwargs), ValueError, problem, fix)


def importance_case(make_loaders: Callable[[Env], Any], error: type, problem: str, fix: str, **kwargs):
    def build(env: Env) -> Attempt:
        model = env.peft_model(sparsity=0.8, r=4)
        loaders = make_loaders(env)
        return Attempt(
            lambda: model.compute_importance(loaders, progress=False, **kwargs), error, problem, fix, [model]
        )

    return build


def trained_delta(env: Env) -> Attempt:
    model = env.peft_model(sparsity=0.8, r=4)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "mazo_B" in n).add_(0.1)
    loaders = {"a": calibration(env)}
    return Attempt(
        lambda: model.compute_importance(loaders, progress=False),
        ValueError,
        r"already has a non-zero delta .* would silently change the trained adapter",
        r"Pass reset=True",
        [model],
    )


def masks_case(edit: Callable[[dict[str, torch.Tensor]], Any], error: type, problem: str, fix: str):
    def build(env: Env) -> Attempt:
        model = env.peft_model(sparsity=0.5, r=0)
        masks = edit(model.get_masks())
        return Attempt(lambda: model.set_masks(masks), error, problem, fix, [model])

    return build


GATE = "model.layers.0.mlp.gate_proj"


def load_case(
    adapter_kwargs: dict, edit: Callable[[Path], None], base: Callable[[], nn.Module], problem: str, fix: str
) -> Callable[[Env], Attempt]:
    def build(env: Env) -> Attempt:
        path = env.adapter("adapter", **adapter_kwargs)
        edit(path)
        model = base()
        return Attempt(lambda: PeftModel.from_pretrained(model, path), ValueError, problem, fix, [model], [path])

    return build


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def repeat_a_column(columns: torch.Tensor) -> None:
    columns[2, 1] = columns[2, 0]  # row 2 now keeps one entry fewer


def flip_bits(bits: torch.Tensor) -> None:
    bits[2, 0] = 255 if bits[2, 0] != 255 else 0  # row 2 now keeps another number of entries


def zosgd_case(make: Callable[[nn.Module], Any], error: type, problem: str, fix: str, **config: Any):
    def build(env: Env) -> Attempt:
        model = env.peft_model(sparsity=0.8, r=4, **config)
        return Attempt(lambda: make(model), error, problem, fix, [model])

    return build


def frozen_model(env: Env) -> Attempt:
    model = make_tiny_llama().requires_grad_(False)
    return Attempt(
        lambda: ZOSGD(model), ValueError, r"found no trainable parameters", r"Wrap the model with a MaZO adapter first",
        [model],
    )  # fmt: skip


def command_case(args: Callable[[Env], list[Any]], problem: str, fix: str, paths=lambda env: []):
    def build(env: Env) -> Attempt:
        argv = args(env)
        return Attempt(lambda: mazo(*argv), CommandFailed, problem, fix, [], paths(env))

    return build


def resume_other_settings(env: Env) -> Attempt:
    out = env.tmp / "run"
    mazo(*env.train_args(out=out))  # a finished run with checkpoint-2
    argv = env.train_args("--resume", "--steps", "4", out=out)
    argv[argv.index("--r") + 1] = "8"
    return Attempt(
        lambda: mazo(*argv),
        CommandFailed,
        r"--resume: .*checkpoint-2 was made with other settings \(r: 4 -> 8\)",
        r"Resume with the settings of that run .* or pass another --out",
        [],
        [out],
    )


def no_free_space(env: Env) -> Attempt:
    usage = shutil.disk_usage(env.tmp)
    env.monkeypatch.setattr(runner.preflight.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    return Attempt(
        lambda: mazo(*env.train_args()),
        CommandFailed,
        r"Not enough free disk space for the run's checkpoints .* MiB needed .*, 10\.0 MiB free",
        r"Free some space or choose another --out",
    )


def out_under_a_file(env: Env) -> Attempt:
    (env.tmp / "notes.txt").write_text("mine")
    return Attempt(
        lambda: mazo(*env.train_args(out=env.tmp / "notes.txt" / "run")),
        CommandFailed,
        r"notes\.txt is a file, not a directory",
        r"choose another --out",
        [],
        [env.tmp / "notes.txt"],
    )


def eval_without_adapter_config(env: Env) -> Attempt:
    (env.tmp / "empty").mkdir()
    argv = ["eval", "--model", env.model_dir, "--adapter", env.tmp / "empty", "--tasks", "sst2",
            "--data-dir", SHARED_DATA, "--out", env.tmp / "eval"]  # fmt: skip
    return Attempt(
        lambda: mazo(*argv), CommandFailed, r"has no adapter_config\.json",
        r"pass a directory written by save_pretrained", [], [env.tmp / "empty"],
    )  # fmt: skip


def eval_on_another_model(env: Env) -> Attempt:
    adapter = env.adapter("adapter", sparsity=0.8, r=4)
    other = env.tmp / "wide_model"
    make_tiny_llama(hidden_size=128, intermediate_size=256, max_position_embeddings=256).save_pretrained(other)
    make_tiny_tokenizer(pad=True).save_pretrained(other)
    argv = ["eval", "--model", other, "--adapter", adapter, "--tasks", "sst2", "--data-dir", SHARED_DATA,
            "--out", env.tmp / "eval"]  # fmt: skip
    return Attempt(
        lambda: mazo(*argv),
        CommandFailed,
        r"--adapter .* does not fit --model .*saved for a weight of shape \(out, in\) = \(64, 64\).*\(128, 128\)",
        r"Load it onto the base model it was trained on",
        [],
        [adapter, other],
    )


def bad_record_via_command(env: Env) -> Attempt:
    data = bad_data_dir(env, drop_label)
    argv = env.train_args()
    argv[argv.index("--tasks") + 1] = "sst2"
    argv[argv.index("--data-dir") + 1] = data
    return Attempt(
        lambda: mazo(*argv),
        CommandFailed,
        r"sst2/train\.jsonl, line 2: the record has no field 'label', which task 'sst2' needs",
        r"Add the field to that line or remove the line",
        [],
        [data],
    )


def record_case(edit: Callable[[list[str]], None], problem: str, fix: str) -> Callable[[Env], Attempt]:
    def build(env: Env) -> Attempt:
        data = bad_data_dir(env, edit)
        return Attempt(lambda: load_examples("sst2", "train", data), TaskDataError, problem, fix, [], [data])

    return build


def break_json(lines: list[str]) -> None:
    lines[2] = lines[2][:-5]


CASES: dict[str, Callable[[Env], Attempt]] = {
    # --- MaZOConfig ---------------------------------------------------------------------------------------------------
    "config-sparsity-1": config_case(r"sparsity must be in \[0, 1\).*got 1\.0", r"Use e\.g\. 0\.9", sparsity=1.0),
    "config-negative-rank": config_case(r"r must be an integer >= 0.*got -1", r"0 = dense .*> 0 = LoRA rank", r=-1),
    "config-unknown-scorer": config_case(r"scorer must be one of", r"\('mazo', 'wanda', 'magnitude'", scorer="x"),
    "config-half-delta": config_case(
        r"delta_dtype must be one of .* got 'bfloat16'", r"\('float32', 'float64'\)", delta_dtype="bfloat16"
    ),
    "config-lora-alpha-dense": config_case(r"lora_alpha is set but r = 0", r"set r > 0", r=0, lora_alpha=16),
    "config-infinite-alpha": config_case(
        r"alpha must be a number >= 0 \(finite\), got inf", r"Paper: alpha = 10", alpha=float("inf")
    ),  # fmt: skip
    "config-target-type": config_case(
        r"target_modules must be a regex string, a list .* got 5",
        r"Example: target_modules=\['q_proj'",
        target_modules=5,
    ),
    "config-mask-seed": config_case(
        r"mask_seed must be an integer .* got 'a'", r"seed of scorer='random'", mask_seed="a"
    ),  # fmt: skip
    "target-embedding": lambda env: (
        lambda model: Attempt(
            lambda: get_peft_model(model, MaZOConfig(target_modules=["embed_tokens"])),
            ValueError,
            r"matched 'model\.embed_tokens' of type Embedding, but MaZO adapts only linear layers",
            r"Narrow target_modules to linear layers, e\.g\. \['q_proj', 'v_proj'\]",
            [model],
        )
    )(make_tiny_llama()),
    "target-no-match": lambda env: (
        lambda model: Attempt(
            lambda: get_peft_model(model, MaZOConfig(target_modules=["qproj"])),
            ValueError,
            r"Target modules \{'qproj'\} \(MaZOConfig\.target_modules\) match no module of LlamaForCausalLM",
            r"linear layers are named \[.*'q_proj'.*\]; use some of these names",
            [model],
        )
    )(make_tiny_llama()),
    # --- compute_importance: loaders --------------------------------------------------------------------------------
    "loader-empty": importance_case(
        lambda env: {"sst2": calibration(env), "boolq": []},
        ValueError,
        r"loader of task 'boolq' is empty",
        r"give every task at least one batch",
    ),  # fmt: skip
    "loader-wrong-type": importance_case(
        lambda env: 42,
        TypeError,
        r"calib_loaders must be .* got int",
        r"\{task: loader\}, a list of \(task, loader\) pairs or one loader",
    ),  # fmt: skip
    "loader-repeated-task": importance_case(
        lambda env: [("sst2", calibration(env)), ("sst2", calibration(env))],
        ValueError,
        r"task name 'sst2' appears more than once",
        r"task names must be unique",
    ),  # fmt: skip
    "loader-tensor-batches": importance_case(
        lambda env: {"sst2": [calibration(env)[0]["input_ids"]]},
        TypeError,
        r"Task 'sst2': batch 0 is a Tensor",
        r"every batch must be a mapping of keyword arguments such as \{'input_ids'",
    ),  # fmt: skip
    "importance-on-plain-model": lambda env: (
        lambda model: Attempt(
            lambda: peft_mazo.compute_importance(model, {"a": calibration(env)}),
            TypeError,
            r"compute_importance needs a model with a MaZO adapter, got LlamaForCausalLM",
            r"Wrap it first: model = peft\.get_peft_model",
            [model],
        )
    )(make_tiny_llama()),
    "importance-trained-delta": trained_delta,
    # --- set_masks: shapes, counts, dtypes --------------------------------------------------------------------------
    "masks-wrong-shape": masks_case(
        lambda m: {GATE: m[GATE].T.contiguous()},
        ValueError,
        rf"mask of '{GATE}' must have shape \(128, 64\)",
        r"Start from model\.get_masks\(\)\[name\]",
    ),  # fmt: skip
    "masks-wrong-count": masks_case(
        lambda m: {GATE: torch.ones_like(m[GATE])},
        ValueError,
        r"must keep exactly k = 32 entries in every row",
        r"Build the mask with peft_mazo\.mask\.topk_columns or compute_importance",
    ),  # fmt: skip
    "masks-float-dtype": masks_case(
        lambda m: {GATE: m[GATE].float()},
        ValueError,
        r"must be a bool tensor, got dtype torch\.float32",
        r"convert it with mask\.bool\(\)",
    ),  # fmt: skip
    "masks-numpy": masks_case(
        lambda m: {GATE: m[GATE].numpy()},
        TypeError,
        r"must be a torch\.Tensor of dtype torch\.bool, got ndarray",
        r"torch\.as_tensor\(mask, dtype=torch\.bool\)",
    ),  # fmt: skip
    "masks-unknown-module": masks_case(
        lambda m: {"model.layers.0.mlp.gate": m[GATE]},
        ValueError,
        r"modules without a MaZO adapter 'default'",
        r"Use the names returned by get_masks\(\)",
    ),  # fmt: skip
    "masks-not-a-dict": masks_case(
        lambda m: list(m.values()),
        TypeError,
        r"set_masks takes a dict .* got list",
        r"Start from model\.get_masks\(\)",
    ),
    # --- saved adapters ---------------------------------------------------------------------------------------------
    "adapter-other-sparsity": load_case(
        {"sparsity": 0.8},
        lambda p: edit_json(p / "adapter_config.json", sparsity=0.5),
        make_tiny_llama,
        r"saved with 13 kept entries per row .* gives k = 32",
        r"Use the adapter_config\.json saved with these weights",
    ),  # fmt: skip
    "adapter-other-rank": load_case(
        {"sparsity": 0.8, "r": 4},
        lambda p: edit_json(p / "adapter_config.json", r=8, lora_alpha=8),
        make_tiny_llama,
        r"saved with LoRA rank r = 4 .* says r = 8",
        r"Use the adapter_config\.json saved with these weights",
    ),  # fmt: skip
    "adapter-dense-as-lora": load_case(
        {"sparsity": 0.8},
        lambda p: edit_json(p / "adapter_config.json", r=4, lora_alpha=4),
        make_tiny_llama,
        r"holds a dense delta \(mazo_values\) .* says r = 4 \(LoRA\)",
        r"Use the adapter_config\.json saved",
    ),  # fmt: skip
    "adapter-invalid-config-value": load_case(
        {"sparsity": 0.8},
        lambda p: edit_json(p / "adapter_config.json", sparsity=1.5),
        make_tiny_llama,
        r"sparsity must be in \[0, 1\).*got 1\.5",
        r"Use e\.g\. 0\.9",
    ),  # fmt: skip
    "mask-file-edited-dense": load_case(
        {"sparsity": 0.8},
        lambda p: edit_tensor(p, "mazo_columns", repeat_a_column),
        make_tiny_llama,
        r"mask of '.*' in .*adapter_model\.safetensors must be strictly ascending in every row \(no repeated column\)",
        r"The mask file was edited or damaged: restore the adapter .* or recompute the mask",
    ),  # fmt: skip
    "mask-file-edited-lora": load_case(
        {"sparsity": 0.8, "r": 4},
        lambda p: edit_tensor(p, "mazo_bits", flip_bits),
        make_tiny_llama,
        r"must keep exactly k = \d+ entries in every row .* e\.g\. row 2 keeps \d+",
        r"The mask file was edited or damaged: restore the adapter .* or recompute the mask",
    ),  # fmt: skip
    "base-gpt2": load_case(
        {"sparsity": 0.8, "r": 4},
        lambda p: None,
        gpt2,
        r"has weights for 14 module\(s\) that this GPT2LMHeadModel does not have",
        r"Load it onto the base model it was trained on",
    ),  # fmt: skip
    "base-llama-other-sizes": load_case(
        {"sparsity": 0.8, "r": 4},
        lambda p: None,
        lambda: make_tiny_llama(hidden_size=128, intermediate_size=256),
        r"'model\.layers\.0\.self_attn\.q_proj' was saved for a weight of shape \(out, in\) = \(64, 64\), but this "
        r"base model's layer has shape \(128, 128\)",
        r"Load it onto the base model it was trained on",
    ),  # fmt: skip
    "base-llama-fewer-layers": load_case(
        {"sparsity": 0.8},
        lambda p: None,
        lambda: make_tiny_llama(num_hidden_layers=1),
        r"has weights for 7 module\(s\) that this LlamaForCausalLM does not have \(e\.g\. 'model\.layers\.1\.",
        r"Load it onto the base model it was trained on",
    ),  # fmt: skip
    # --- ZOSGD ------------------------------------------------------------------------------------------------------
    "zosgd-negative-lr": zosgd_case(
        lambda m: ZOSGD(m, lr=-1e-3),
        ValueError,
        r"lr must be a finite number >= 0, got -0\.001",
        r"Use lr = 0 to evaluate without updating",
    ),  # fmt: skip
    "zosgd-zero-eps": zosgd_case(
        lambda m: ZOSGD(m, eps=0.0), ValueError, r"eps must be a finite number > 0", r"default 1e-3"
    ),
    "zosgd-momentum-1": zosgd_case(
        lambda m: ZOSGD(m, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)", r"0 disables it"
    ),
    "zosgd-parameters-first": zosgd_case(
        lambda m: ZOSGD(m.parameters()), TypeError, r"ZOSGD takes the model first", r"Use ZOSGD\(model, lr=\.\.\.\)"
    ),
    "zosgd-weighting-string": zosgd_case(
        lambda m: ZOSGD(m, weighting="famo"),
        ValueError,
        r"weighting must be a peft_mazo\.TaskWeighting, got str",
        r"subclass TaskWeighting",
    ),  # fmt: skip
    "zosgd-no-trainable": frozen_model,
    "zosgd-step-without-closure": zosgd_case(
        lambda m: ZOSGD(m).step(),
        ValueError,
        r"ZOSGD\.step needs a closure",
        r"opt\.step\(lambda: model\(\*\*batch\)\.loss\)",
    ),  # fmt: skip
    # --- the command ------------------------------------------------------------------------------------------------
    "cli-unknown-task": command_case(
        lambda env: env.train_args("--tasks", "sst2,mnli"), r"Unknown task 'mnli'", r"Known tasks: sst2, boolq"
    ),
    "cli-task-twice": command_case(
        lambda env: env.train_args("--tasks", "sst2,SST-2"), r"--tasks names a task twice", r"Give every task once"
    ),
    "cli-unknown-method": command_case(
        lambda env: env.train_args("--method", "mezo"), r"invalid choice: 'mezo'", r"choose from .*'mazo-lora'"
    ),
    "cli-missing-data-dir": command_case(
        lambda env: env.train_args("--data-dir", env.tmp / "nowhere"),
        r"nowhere' does not exist",
        r"Pass the directory that holds <task>/train\.jsonl",
    ),  # fmt: skip
    "cli-zero-steps": command_case(
        lambda env: env.train_args("--steps", "0"),
        r"--steps must be a positive integer .* got 0",
        r"e\.g\. --steps 1000",
    ),  # fmt: skip
    "cli-resume-without-checkpoint": command_case(
        lambda env: env.train_args("--resume"), r"--resume: no complete checkpoint", r"Drop --resume"
    ),
    "cli-resume-other-settings": resume_other_settings,
    "cli-sparsity-1.5": command_case(
        lambda env: env.train_args("--sparsity", "1.5"),
        r"--sparsity/--r: MaZOConfig\.sparsity must be in \[0, 1\) .* got 1\.5",
        r"Use e\.g\. 0\.9",
    ),  # fmt: skip
    "cli-negative-rank": command_case(
        lambda env: env.train_args("--r", "-1"), r"--r must be an integer >= 0 .* got -1", r"0 = dense masked delta"
    ),
    "cli-negative-max-skipped-steps": command_case(
        lambda env: env.train_args("--max-skipped-steps", "-1"),
        r"--max-skipped-steps must be an integer >= 0",
        r"0 = never stop",
    ),  # fmt: skip
    "cli-unknown-dtype": command_case(
        lambda env: env.train_args("--dtype", "float8"), r"--dtype must be one of", r"auto, float32, float64"
    ),
    "cli-missing-model": command_case(
        lambda env: [a if a != env.model_dir else env.tmp / "no_model" for a in env.train_args()],
        r"--model .*no_model: no such directory",
        r"Pass an existing model directory, a hub id",
    ),  # fmt: skip
    "cli-no-free-space": no_free_space,
    "cli-out-under-a-file": out_under_a_file,
    "cli-eval-not-an-adapter": eval_without_adapter_config,
    "cli-eval-adapter-of-another-model": eval_on_another_model,
    "cli-bad-record": bad_record_via_command,
    # --- task data --------------------------------------------------------------------------------------------------
    "record-missing-field": record_case(
        drop_label,
        r"sst2/train\.jsonl, line 2: the record has no field 'label'",
        r"Add the field to that line or remove the line",
    ),  # fmt: skip
    "record-invalid-json": record_case(
        break_json, r"sst2/train\.jsonl, line 3: not valid JSON", r"Fix or remove that line"
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------------------------
def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def snapshot_files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_clearly_before_any_work_and_changes_nothing(case, tmp_path, tiny_model_dir, monkeypatch):
    attempt = CASES[case](Env(tmp_path, tiny_model_dir, monkeypatch))
    states = [snapshot_state(model) for model in attempt.models]
    files = [snapshot_files(path) for path in attempt.paths]
    forwards = []
    hooks = [
        module.register_forward_pre_hook(lambda *args: forwards.append(1))
        for model in attempt.models
        for module in model.modules()
    ]

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the command started loading the model")

    monkeypatch.setattr(runner.job, "load_model_and_tokenizer", no_model_loading)
    try:
        with pytest.raises(attempt.error) as info:
            attempt.call()
    finally:
        for hook in hooks:
            hook.remove()

    message = str(info.value)
    assert re.search(attempt.problem, message, re.S), f"the problem is not named: {message}"
    assert re.search(attempt.fix, message, re.S), f"the fix is not named: {message}"
    if isinstance(info.value, CommandFailed):
        assert info.value.status == 2, message
        assert "Traceback" not in message
    assert not forwards, "a forward pass ran before the error"
    for model, before in zip(attempt.models, states, strict=True):
        after = model.state_dict()
        assert after.keys() == before.keys(), "the model's modules changed"
        assert all(torch.equal(before[k], after[k]) for k in before), "the model's weights changed"
    for path, before in zip(attempt.paths, files, strict=True):
        assert snapshot_files(path) == before, f"{path} changed"
    run_dir = tmp_path / "run"
    if case.startswith("cli-") and case != "cli-resume-other-settings":
        assert not run_dir.exists() or not any(run_dir.iterdir()), "the command wrote into --out"
