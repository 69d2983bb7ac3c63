"""Training-step throughput of whole models (issue 7): NAtS-L Hybrid vs GDN Hybrid (3:1) vs Transformer.

One step = forward with labels (shifted cross-entropy over the full vocabulary), backward, gradient clipping at 1.0
and a fused AdamW step; fp32 master weights under bf16 autocast (what `natsl train --device cuda` does), batch 1.
Every natsl layer's router decision is forced to random blocks with softmax fraction `--frac` (a trained router's
sparsity; its straight-through gradient still flows, so the training path with router gradients is what runs).
Step time = median of `--steps` synchronised steps after 2 warm-up steps; the first step at T=1024 (fla's compile
and autotune) is reported separately.

Usage (H200, fla wheels on PYTHONPATH):
    python3 benchmarks/bench_model.py [--T 4096,16384,32768] [--models hybrid,layer_hybrid,softmax] [--out F]
CPU smoke run: python3 benchmarks/bench_model.py --device cpu --size tiny --T 128 --steps 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import add_common_args, env_line, force_router, markdown_table, parse_common, time_ms  # noqa: E402

from natsl import NAtSLAttention, NAtSLConfig, NAtSLForCausalLM  # noqa: E402

NAMES = {"hybrid": "NAtS-L Hybrid", "layer_hybrid": "GDN Hybrid 3:1", "softmax": "Transformer",
         "natsl": "NAtS-L (all layers)", "linear": "GDN (all layers)"}


def build(size: str, family: str, frac: float, device: str, backend: str):
    config = NAtSLConfig.preset(size, family, linear_backend=backend)
    model = NAtSLForCausalLM(config).to(device)
    for module in model.modules():
        if isinstance(module, NAtSLAttention):
            force_router(module, frac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    return model, opt


def make_step(model, opt, T: int, device: str, vocab: int):
    ids = torch.randint(0, vocab, (1, T), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,16384,32768")
    ap.add_argument("--models", default="hybrid,layer_hybrid,softmax")
    ap.add_argument("--size", default="340m")
    ap.add_argument("--linear-backend", default="gdn")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=5)
    add_common_args(ap)
    args = parse_common(ap)
    cuda = args.device.startswith("cuda")
    Ts = [int(t) for t in args.T.split(",")]
    header = f"# {env_line()}; size {args.size}, backend {args.linear_backend}, forced softmax fraction {args.frac}"
    print(header, flush=True)
    rows = []
    for family in args.models.split(","):
        model, opt = build(args.size, family, args.frac, args.device, args.linear_backend)
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters()) / 1e6
        t0 = time.time()
        make_step(model, opt, min(1024, Ts[0]), args.device, vocab)()
        if cuda:
            torch.cuda.synchronize()
        first = time.time() - t0
        print(f"{family}: {params:.1f}M parameters, first step {first:.1f} s", flush=True)
        for T in Ts:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_ms(make_step(model, opt, T, args.device, vocab), warmup=2, rep=args.steps)
            except torch.OutOfMemoryError:
                print(f"{family} T={T}: out of memory", flush=True)
                rows.append(dict(model=NAMES.get(family, family), T=T, note="OOM"))
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            row = dict(model=NAMES.get(family, family), params_M=round(params, 1), T=T, step_ms=ms,
                       tokens_per_s=round(T / ms * 1e3), peak_GiB=peak, first_step_s=round(first, 1))
            rows.append(row)
            print(row, flush=True)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    table = markdown_table(rows, ["model", "params_M", "T", "step_ms", "tokens_per_s", "peak_GiB", "first_step_s"])
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
