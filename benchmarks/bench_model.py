"""Training-step throughput and peak memory of whole models (issues 7, 20, 21): natsl's model families side by side
with fla's own `GatedDeltaNetForCausalLM` (`fla_gdn`, fla's default fused modules and loss).

One step = forward with labels (shifted cross-entropy over the full vocabulary), backward, gradient clipping at 1.0
and a fused AdamW step; fp32 master weights under bf16 autocast (what `natsl train --device cuda` does).
Every natsl layer's router decision is forced to random blocks with softmax fraction `--frac` (a trained router's
sparsity; its straight-through gradient still flows, so the training path with router gradients is what runs).
Step time = median of `--steps` synchronised steps after 2 warm-up steps; the first step (fla's compile and autotune)
runs at the first shape and is reported separately (before session 26 a training run's first step ran at 1 x 1024,
which also made fla's autotuners choose at that length).

Usage (H200, fla wheels on PYTHONPATH):
    python3 benchmarks/bench_model.py [--shapes 8x4096,1x32768] [--models linear,fla_gdn,hybrid,softmax] [--out F]
    (a model name may name the NAtS-L layers' softmax backend: `hybrid@triton,hybrid@flex`)
CPU smoke run: python3 benchmarks/bench_model.py --device cpu --size tiny --shapes 2x128 --models linear,hybrid --steps 1

With `--prefill` (issue 22) a step is instead the prefill of a generation: the bf16 model in eval mode, one forward
under `torch.no_grad()` with an inference cache (`use_cache=True`) and the logits of the last position only
(`logits_to_keep=1`), e.g. `--prefill --shapes 1x131072,1x32768 --models hybrid,softmax,fla_gdn`. The first step runs
at the first shape (training too) because fla's autotuned kernels key their configurations on head counts and dims but
not on the length, so the first call's length picks them for every later one, and Triton caches them on disk
(`FLA_CACHE_RESULTS=0` keeps them to the process). Tuned at 1 x 1024, fla's fused kkt/solve kernel took 0.52 ms
(fla's model) and 0.66 ms (natsl's layers) per layer at 128k, against 0.29 ms tuned at 128k (benchmarks/RESULTS.md,
session 24).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import add_common_args, env_line, force_router, markdown_table, parse_common, time_ms  # noqa: E402

from natsl import NAtSLAttention, NAtSLConfig, NAtSLForCausalLM  # noqa: E402

NAMES = {"hybrid": "NAtS-L Hybrid", "layer_hybrid": "GDN Hybrid 3:1", "softmax": "Transformer",
         "natsl": "NAtS-L (all layers)", "linear": "GDN (all layers)", "fla_gdn": "fla GatedDeltaNetForCausalLM"}


def display_name(family: str) -> str:
    """`hybrid@flex` → `NAtS-L Hybrid (flex)`."""
    name, _, sb = family.partition("@")
    return NAMES.get(name, name) + (f" ({sb})" if sb else "")


def build(size: str, family: str, frac: float, device: str, backend: str):
    """`family` may end in `@<softmax backend>` (e.g. `hybrid@flex`); default `auto`."""
    family, _, softmax_backend = family.partition("@")
    if family == "fla_gdn":  # fla's own model of natsl's `linear` dims (natsl.models.convert)
        from fla.models import GatedDeltaNetForCausalLM

        from natsl.models.convert import fla_gdn_config_from

        config = fla_gdn_config_from(NAtSLConfig.preset(size, "linear"))
        model = GatedDeltaNetForCausalLM(config).to(device)
    else:
        config = NAtSLConfig.preset(size, family, linear_backend=backend, softmax_backend=softmax_backend or "auto")
        model = NAtSLForCausalLM(config).to(device)
    for module in model.modules():
        if isinstance(module, NAtSLAttention):
            force_router(module, frac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    return model, opt


def make_prefill(model, B: int, T: int, device: str, vocab: int):
    """One prefill: a no-grad forward that builds the inference cache and the last position's logits."""
    ids = torch.randint(0, vocab, (B, T), device=device)

    @torch.no_grad()
    def step():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    return step


def make_step(model, opt, B: int, T: int, device: str, vocab: int):
    ids = torch.randint(0, vocab, (B, T), device=device)
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
    ap.add_argument("--shapes", default="8x4096,1x32768", help="comma-separated BxT training shapes")
    ap.add_argument("--models", default="linear,fla_gdn,hybrid,layer_hybrid,softmax")
    ap.add_argument("--size", default="340m")
    ap.add_argument("--linear-backend", default="gdn")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute every block in the backward (model.gradient_checkpointing_enable())")
    ap.add_argument("--export-fla-configs", default=None,
                    help="after the runs, write the configurations fla's autotuners chose here (natsl.tuning)")
    ap.add_argument("--precompile", default=None, metavar="MANIFEST",
                    help="compile a Triton kernel manifest's kernels in parallel processes before the first step, "
                         "inside its timing (natsl.tuning.precompile_triton_kernels; 'auto': natsl's for this GPU)")
    ap.add_argument("--record-triton", default=None, metavar="FILE",
                    help="write the Triton kernels the first step compiles to this manifest (record_triton_compiles)")
    ap.add_argument("--prefill", action="store_true",
                    help="time the prefill of generation (bf16, no grad, with a cache) instead of a training step")
    add_common_args(ap)
    args = parse_common(ap)
    cuda = args.device.startswith("cuda")
    shapes = [tuple(int(n) for n in sh.split("x")) for sh in args.shapes.split(",")]
    header = (f"# {env_line()}; size {args.size}, backend {args.linear_backend}, forced softmax fraction {args.frac}"
              + ("; prefill (bf16, no grad, with a cache)" if args.prefill else "; training step"))
    print(header, flush=True)
    rows = []
    for family in args.models.split(","):
        model, opt = build(args.size, family, args.frac, args.device, args.linear_backend)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if args.prefill:
            opt = None
            model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
            make = functools.partial(make_prefill, model, device=args.device, vocab=vocab)
        else:
            make = functools.partial(make_step, model, opt, device=args.device, vocab=vocab)
        t0 = time.time()
        if args.precompile:
            from natsl.tuning import precompile_triton_kernels

            print(f"# precompiled {precompile_triton_kernels(args.precompile)}", flush=True)
        with contextlib.ExitStack() as stack:
            if args.record_triton:
                from natsl.tuning import record_triton_compiles

                recorded = stack.enter_context(record_triton_compiles(args.record_triton))
            make(*shapes[0])()  # fla's autotuners choose at the first shape (their keys omit the length)
            if cuda:
                torch.cuda.synchronize()
        first = time.time() - t0
        if args.record_triton:
            print(f"# Triton compiles of the first step: {recorded}", flush=True)
        print(f"{family}: {params:.1f}M parameters, first step {first:.1f} s", flush=True)
        for B, T in shapes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_ms(make(B, T), warmup=2, rep=args.steps)
            except torch.OutOfMemoryError:
                print(f"{family} {B}x{T}: out of memory", flush=True)
                rows.append(dict(model=display_name(family), shape=f"{B}x{T}", note="OOM"))
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            row = dict(model=display_name(family), params_M=round(params, 1),
                       shape=f"{B}x{T}", step_ms=ms,
                       tokens_per_s=round(B * T / ms * 1e3), peak_GiB=peak, first_step_s=round(first, 1))
            rows.append(row)
            print(row, flush=True)
        del model, opt, make
        if cuda:
            torch.cuda.empty_cache()
    table = markdown_table(rows, ["model", "params_M", "shape", "step_ms", "tokens_per_s", "peak_GiB",
                                  "first_step_s"])
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")
    if args.export_fla_configs:
        from natsl.tuning import export_fla_configs

        files = export_fla_configs(args.export_fla_configs)
        print(f"wrote {len(files)} fla kernel configuration files to {args.export_fla_configs}", flush=True)


if __name__ == "__main__":
    main()
