"""MaZO under the Hugging Face Trainer: a multi-task dataset, `MaZOTrainer`, evaluation, checkpoints and resume.

The mask is computed from calibration batches of every task, then `MaZOTrainer` runs zeroth-order steps (two forward
passes each, no backward) with the stock Trainer's schedulers, logging, evaluation and checkpoints. The run is done in
two parts, the second resuming from the first one's checkpoint (the result is the same as one uninterrupted run):

    python examples/hf_trainer.py [--model smollm2-135m] [--steps 20] [--out out/hf_trainer]
    python examples/hf_trainer.py --model tiny --steps 4

Unchanged under several processes (data parallel, docs/distributed.md): `torchrun --nproc_per_node 2
examples/hf_trainer.py --model tiny --steps 4` (gloo on CPUs, NCCL on GPUs) or `accelerate launch --num_processes 2
...`; rank 0 prints and saves.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import DATA_DIR, check_data_dir, load
from datasets import Dataset
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq

import peft_mazo
from peft_mazo.tasks import calibration_loaders, sample_tasks


def say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch: rank 0 only
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id")
    parser.add_argument("--tasks", default="sst2,copa")
    parser.add_argument("--steps", type=int, default=20, help="total ZO steps (half before, half after the resume)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default="out/hf_trainer")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    max_length = 128 if args.model == "tiny" else 256

    base, tokenizer, _ = load(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = sample_tasks(tasks, data_dir=check_data_dir(args.data_dir), n_train=64, n_val=16, n_test=0, seed=0)

    def features(example):
        prompt = tokenizer(example.prompt)["input_ids"]
        answer = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        return {
            "input_ids": (prompt + answer)[-max_length:],
            "labels": ([-100] * len(prompt) + answer)[-max_length:],
        }

    train = Dataset.from_list([features(e) for s in splits.values() for e in s.train]).shuffle(seed=0)
    val = Dataset.from_list([features(e) for s in splits.values() for e in s.val])
    say(f"tasks {tasks}: {len(train)} training and {len(val)} validation sequences")

    model = get_peft_model(base, peft_mazo.MaZOConfig(sparsity=0.8, r=16))
    loaders = calibration_loaders(
        tasks, tokenizer, batch_size=4, num_batches=2, examples_by_task={t: s.train for t, s in splits.items()},
        max_length=max_length,
    )  # fmt: skip
    model.compute_importance(loaders, progress=False)

    first_part = max(1, args.steps // 2)
    training_args = peft_mazo.MaZOTrainingArguments(
        args.out,
        max_steps=first_part,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        zo_eps=1e-3,
        zo_max_consecutive_skips=10,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=first_part,
        save_steps=first_part,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def trainer() -> peft_mazo.MaZOTrainer:
        return peft_mazo.MaZOTrainer(
            model=model, args=training_args, train_dataset=train, eval_dataset=val, data_collator=collator
        )

    say(f"part 1: steps 1-{first_part}")
    trainer().train()
    training_args.max_steps = args.steps
    say(f"part 2: resume from {args.out}/checkpoint-{first_part}, steps {first_part + 1}-{args.steps}")
    second = trainer()
    second.train(resume_from_checkpoint=True)

    for log in second.state.log_history:
        if "loss" in log:
            say(f"step {log['step']}: loss {log['loss']:.4f}, projected gradient {log['zo_projected_grad']:+.4f}")
        if "eval_loss" in log:
            say(f"step {log['step']}: eval_loss {log['eval_loss']:.4f}")
    say(f"skipped (non-finite) steps: {second.zo_optimizer().state['zo']['skipped_steps']}")
    if second.is_world_process_zero():  # every rank holds the same adapter: one writes it
        model.save_pretrained(f"{args.out}/adapter")
    say(f"wrote the checkpoints and {args.out}/adapter")


if __name__ == "__main__":
    main()
