"""Quickstart: wrap a small Llama model with a MaZO adapter, inspect the mask, train a few steps, save and reload.

Runs offline on the CPU in seconds (the model is built in code with random weights):

    python examples/quickstart.py [--r 64] [--sparsity 0.8] [--steps 5] [--out out/quickstart]
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_mazo


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8, help="0 = dense masked delta, > 0 = LoRA rank")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=5, help="backprop steps on a random batch")
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()

    model = get_peft_model(tiny_llama(), peft_mazo.MaZOConfig(sparsity=args.sparsity, r=args.r))
    model.print_trainable_parameters()
    masks = model.get_masks()
    name, mask = next(iter(masks.items()))
    print(f"{len(masks)} adapted layers; {name}: mask {tuple(mask.shape)}, {int(mask[0].sum())} kept per row")

    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    model.save_pretrained(args.out)
    reloaded = PeftModel.from_pretrained(tiny_llama(), args.out)
    with torch.no_grad():
        same = torch.allclose(reloaded(input_ids=batch).logits, model(input_ids=batch).logits)
    print(f"saved to {args.out}; reloaded adapter gives the same logits: {same}")


if __name__ == "__main__":
    main()
