"""Merge a trained MaZO adapter into its base model and export a plain transformers model.

Trains a short MaZO LoRA adapter (or loads one with `--adapter DIR`), folds `W + (α/r)(B A) ⊙ M` into every adapted
weight with `merge_and_unload()`, saves the result with `save_pretrained` (no peft or peft-mazo needed to use it), then
reloads it with `AutoModelForCausalLM` and checks that it computes what the adapter computed:

    python examples/merge_export.py [--model smollm2-135m] [--steps 5] [--out out/merged]
    python examples/merge_export.py --model tiny --steps 2
    python examples/merge_export.py --model smollm2-135m --adapter runs/multitask_smollm2/adapter

Merge into a full-precision base: merging into a 4-bit base requantizes every layer (lossy, and it warns).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import DATA_DIR, check_data_dir, load
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_mazo
from peft_mazo.tasks import MultiTaskSampler, calibration_loaders, multitask_losses, sample_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id")
    parser.add_argument("--adapter", help="a saved MaZO adapter to merge (default: train one for --steps steps)")
    parser.add_argument("--tasks", default="sst2,copa")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default="out/merged")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    max_length = 128 if args.model == "tiny" else 256

    base, tokenizer, path = load(args.model, dtype=torch.float32)
    splits = sample_tasks(tasks, data_dir=check_data_dir(args.data_dir), n_train=32, n_val=4, n_test=0, seed=0)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=4, seed=0)
    batches = sampler.encoded(tokenizer, max_length=max_length)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
        print(f"loaded the adapter {args.adapter}")
    else:
        model = get_peft_model(base, peft_mazo.MaZOConfig(sparsity=0.8, r=16))
        loaders = calibration_loaders(
            tasks, tokenizer, batch_size=4, num_batches=2, examples_by_task={t: s.train for t, s in splits.items()},
            max_length=max_length,
        )  # fmt: skip
        model.compute_importance(loaders, progress=False)
        opt = peft_mazo.ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)  # a large lr, so that the delta is visible
        for _ in range(args.steps):
            step_batches = next(batches)
            opt.step(lambda step_batches=step_batches: multitask_losses(model, step_batches))
        print(f"trained a MaZO LoRA adapter for {args.steps} ZO steps")

    check = next(batches)
    probe = check[tasks[0]]
    with torch.no_grad():
        adapter_logits = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        with model.disable_adapter():
            base_logits = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        adapter_losses = multitask_losses(model, check)

    merged = model.merge_and_unload()  # a plain transformers model again: no MaZO layers left
    out = Path(args.out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged and saved {type(merged).__name__} to {out}: {sorted(p.name for p in out.iterdir())}")

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        exported_logits = exported(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        exported_losses = multitask_losses(exported, check)
    print(f"the adapter changed the logits by up to {(adapter_logits - base_logits).abs().max():.2e}")
    print(f"exported vs adapter logits: max difference {(exported_logits - adapter_logits).abs().max():.2e}")
    print(f"per-task losses: adapter {adapter_losses.tolist()}, exported {exported_losses.tolist()}")
    same = torch.allclose(exported_logits, adapter_logits, atol=1e-4)
    print(f"the exported model computes what the adapter did: {same}")


if __name__ == "__main__":
    main()
