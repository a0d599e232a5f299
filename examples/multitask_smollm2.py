"""Multi-task MaZO LoRA on SmolLM2-135M-Instruct: mask search, zeroth-order training, before/after metrics.

The main job of the README, from Python. With the defaults it trains MaZO LoRA (r = 64, ρ = 0.8) on SST-2, COPA and
RTE for 30 ZO steps and runs offline in under 10 minutes on 2 CPU cores (a demonstration of the pipeline: 30
steps do not move a 135M model's metrics measurably):

    python examples/multitask_smollm2.py [--steps 30] [--tasks sst2,copa,rte] [--out runs/multitask_smollm2]
    python examples/multitask_smollm2.py --model tiny --steps 3      # a tiny random model: seconds, for a try

The run directory gets results.json, losses.jsonl, loss_curves.png, importance.txt, the adapter and a checkpoint;
rerun with --resume after an interruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import DATA_DIR, check_data_dir, model_path

from peft_mazo.runner import RunConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id")
    parser.add_argument("--tasks", default="sst2,copa,rte")
    parser.add_argument("--method", default="mazo-lora", help="see `mazo methods`")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-test", type=int, default=None, help="test examples per task (default 64; tiny: 8)")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default="runs/multitask_smollm2")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    tiny = args.model == "tiny"
    config = RunConfig(
        model=model_path(args.model),
        tasks=args.tasks.split(","),
        method=args.method,
        out=args.out,
        data_dir=check_data_dir(args.data_dir),
        steps=args.steps,
        lr=args.lr,
        batch_size=4,
        n_train=16 if tiny else 200,
        n_val=4 if tiny else 16,
        n_test=args.n_test or (8 if tiny else 64),
        max_length=128 if tiny else 256,
        r=8 if tiny else None,  # the method's rank otherwise (64 for mazo-lora)
        calib_batches=2 if tiny else 8,
        save_every=max(1, args.steps // 2),
        resume=args.resume,
    )
    print(f"{config.method} on {args.model}: tasks {config.tasks}, {config.steps} ZO steps, lr {config.lr}")
    results = run(config)

    print(f"\n{'task':<8} {'metric':<9} {'before':>7} {'after':>7}")
    for task, after in results["after"].items():
        before = results["before"].get(task, {}).get("score", float("nan"))
        print(f"{task:<8} {after['metric']:<9} {before:7.1f} {after['score']:7.1f}")
    out = Path(config.out)
    log = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    print(f"\nloss: step 1 {log[0]['loss']:.4f} -> step {log[-1]['step']} {log[-1]['loss']:.4f}")
    print(f"skipped steps (non-finite loss): {results['skipped_steps']}")
    print(f"wrote {out}/results.json, losses.jsonl, loss_curves.png, importance.txt, adapter/")


if __name__ == "__main__":
    main()
