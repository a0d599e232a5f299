"""MaZO on a 4-bit (nf4) base through bitsandbytes: mask search, ZO steps on two tasks, save, reload on a fresh base.

The base's weights stay 4-bit and frozen; the MaZO delta (LoRA A and B, and the mask) is float32 and small. Runs on a
GPU when there is one, else on the CPU (bitsandbytes supports nf4 on the CPU, slowly):

    python examples/four_bit.py [--model smollm2-135m] [--steps 10] [--out out/four_bit]
    python examples/four_bit.py --model tiny --steps 2
"""

from __future__ import annotations

import argparse

import torch
from _common import DATA_DIR, check_data_dir, model_path
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peft_mazo
from peft_mazo.runner import dequantized_config, keep_bnb_cpu_layout
from peft_mazo.tasks import MultiTaskSampler, calibration_loaders, multitask_losses, sample_tasks


def load_4bit(path: str) -> torch.nn.Module:
    on_gpu = torch.cuda.is_available()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
    )
    device_map = {"": 0} if on_gpu else {"": "cpu"}
    # dequantized_config: a copy converted from a GGUF file (the cached SmolLM2) still names GGUF quantization in its
    # config.json, which transformers would not combine with a BitsAndBytesConfig
    model = AutoModelForCausalLM.from_pretrained(
        path, config=dequantized_config(path), quantization_config=quantization, device_map=device_map
    ).eval()
    if not on_gpu:
        keep_bnb_cpu_layout(model)  # bitsandbytes' CPU repacking cannot be undone exactly: see its docstring
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny, a directory or hub id")
    parser.add_argument("--tasks", default="sst2,copa")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default="out/four_bit")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    max_length = 128 if args.model == "tiny" else 256

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = load_4bit(path)
    print(f"{args.model} in nf4: {base.get_memory_footprint() / 2**20:.1f} MiB of weights")

    model = get_peft_model(base, peft_mazo.MaZOConfig(sparsity=0.8, r=args.r))
    adapter_mib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    print(f"MaZO LoRA r={args.r}, rho=0.8: {adapter_mib:.1f} MiB of float32 trainable state")

    data_dir = check_data_dir(args.data_dir)
    splits = sample_tasks(tasks, data_dir=data_dir, n_train=32, n_val=4, n_test=0, seed=0)
    loaders = calibration_loaders(
        tasks, tokenizer, batch_size=4, num_batches=2, examples_by_task={t: s.train for t, s in splits.items()},
        max_length=max_length,
    )  # fmt: skip
    report = model.compute_importance(loaders, progress=False)
    print(f"mask search: {report.total_seconds:.1f} s (|W| of every layer dequantized one at a time)")

    opt = peft_mazo.ZOSGD(model, lr=args.lr, eps=1e-3, seed=0)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=4, seed=0)
    steps = sampler.encoded(tokenizer, max_length=max_length)
    first = None
    for step in range(args.steps):
        batches = next(steps)
        loss = opt.step(lambda batches=batches: multitask_losses(model, batches))
        first = first if first is not None else batches
        per_task = ", ".join(f"{t} {v:.4f}" for t, v in zip(tasks, opt.last_step.losses_plus.tolist(), strict=True))
        print(f"step {step + 1}: loss {float(loss):.4f} ({per_task})")

    model.save_pretrained(args.out)
    reloaded = PeftModel.from_pretrained(load_4bit(path), args.out)
    saved = {k: v for k, v in model.state_dict().items() if "mazo_" in k}
    loaded = {k: v for k, v in reloaded.state_dict().items() if "mazo_" in k}
    same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    print(f"saved the adapter to {args.out}; reloaded onto a fresh 4-bit base: same delta and mask: {same}")
    with torch.no_grad():
        before, after = multitask_losses(model, first), multitask_losses(reloaded, first)
    print(f"losses of the first batch: trained {before.tolist()}, reloaded {after.tolist()}")
    print(f"the reloaded adapter gives the same losses: {torch.allclose(before, after, atol=1e-5)}")


if __name__ == "__main__":
    main()
