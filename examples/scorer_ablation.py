"""The mask-scorer ablation (the paper's Table 5, in small): random, magnitude, Wanda and MaZO masks at ρ = 0.5.

For every scorer: compute the mask from the same calibration batches of every task, then train a dense masked delta
for `--steps` ZO steps on the same batches with the same seed (only the mask differs). Prints the pairwise overlap of
the masks and each scorer's per-task training losses:

    python examples/scorer_ablation.py [--model smollm2-135m] [--steps 10] [--tasks sst2,boolq,copa,squad]
    python examples/scorer_ablation.py --model tiny --steps 2
"""

from __future__ import annotations

import argparse

from _common import DATA_DIR, check_data_dir, load
from peft import get_peft_model

import peft_mazo
from peft_mazo.tasks import MultiTaskSampler, calibration_loaders, multitask_losses, sample_tasks


SCORERS = ("random", "magnitude", "wanda", "mazo")


def overlap(first: dict, second: dict) -> float:
    """Fraction of the kept entries that two masks share (0.5 by chance at ρ = 0.5)."""
    kept = sum(int(mask.sum()) for mask in first.values())
    return sum(int((first[name] & second[name]).sum()) for name in first) / kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id")
    parser.add_argument("--tasks", default="sst2,boolq,copa,squad")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-5 (1e-3 for --model tiny)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    tiny = args.model == "tiny"
    max_length = 128 if tiny else 256
    lr = args.lr if args.lr is not None else (1e-3 if tiny else 1e-5)

    _, tokenizer, path = load(args.model)
    splits = sample_tasks(tasks, data_dir=check_data_dir(args.data_dir), n_train=32, n_val=4, n_test=0, seed=0)
    train = {t: s.train for t, s in splits.items()}
    loaders = calibration_loaders(
        tasks, tokenizer, batch_size=4, num_batches=2, examples_by_task=train, max_length=max_length
    )
    sampler = MultiTaskSampler(train, batch_size=4, seed=0)
    steps = sampler.encoded(tokenizer, max_length=max_length)
    batches = [next(steps) for _ in range(args.steps)]  # the same batches for every scorer

    masks, losses = {}, {}
    for scorer in SCORERS:
        base, _, _ = load(path)
        model = get_peft_model(base, peft_mazo.MaZOConfig(sparsity=args.sparsity, r=0, scorer=scorer))
        report = model.compute_importance(loaders, progress=False)
        masks[scorer] = model.get_masks()
        opt = peft_mazo.ZOSGD(model, lr=lr, eps=1e-3, seed=0)
        for step_batches in batches:
            opt.step(lambda step_batches=step_batches, model=model: multitask_losses(model, step_batches))
        losses[scorer] = ((opt.last_step.losses_plus + opt.last_step.losses_minus) / 2).tolist()
        print(f"{scorer:<10} mask in {report.total_seconds:5.1f} s, {opt.num_trainable:,} trainable values")

    print(f"\nmask overlap (chance: {1 - args.sparsity:.2f})")
    print(" " * 10 + "".join(f"{s:>10}" for s in SCORERS))
    for first in SCORERS:
        print(f"{first:<10}" + "".join(f"{overlap(masks[first], masks[second]):10.3f}" for second in SCORERS))
    print(f"\nper-task training loss after {args.steps} ZO steps (lr {lr:g})")
    print(" " * 10 + "".join(f"{t:>10}" for t in tasks))
    for scorer in SCORERS:
        print(f"{scorer:<10}" + "".join(f"{v:10.4f}" for v in losses[scorer]))


if __name__ == "__main__":
    main()
