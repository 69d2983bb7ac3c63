"""Where a NAtS-L layer's fwd+bwd time goes beside a GDN layer's (issue 21): the CUDA kernels of one training call
of each layer, grouped by name, with the layer's total GPU time and its number of kernel launches.

Layers: the paper's 340M NAtS-L layer (gdn, forced softmax fraction `--frac`, `softmax_backend` of `--softmax`) and
the GDN layer of the same width, bf16 weights as in `bench_layer.py`; torch.profiler over one fwd+bwd after two
warm-up calls. Usage (H200, fla wheels on PYTHONPATH):
    python3 benchmarks/profile_layer.py [--shape 8x4096] [--frac 0.125] [--softmax auto] [--rows 30] [--prefill] \
        --fla-hopper-bypass
`--prefill`: one no-grad forward of each layer into a fresh inference cache (the prefill of generation) instead.
CPU smoke run: --device cpu --shape 1x128
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import add_common_args, env_line, force_router, parse_common  # noqa: E402

from natsl import NAtSLAttention  # noqa: E402
from natsl.layers.baselines import LinearAttention  # noqa: E402

D = 1024


def kernel_table(layer, x, dy, device: str, rows: int, prefill: bool = False) -> tuple[str, float, int]:
    """`(table, total ms, launches)` of one fwd+bwd (with `prefill`: one no-grad forward into a fresh inference
    cache, the prefill of generation): device time per kernel name (CPU: per op), largest first."""
    def call():
        if prefill:
            with torch.no_grad():
                layer(x, use_cache=True)
            return
        x.grad = None
        layer.zero_grad(set_to_none=True)
        torch.autograd.backward(layer(x)[0], dy)

    for _ in range(2):
        call()
    cuda = device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    per_name: dict = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        kind = getattr(ev, "device_type", None)
        on_gpu = kind is not None and kind == torch.autograd.DeviceType.CUDA
        if (cuda and not on_gpu) or (not cuda and ev.cpu_parent is not None):
            continue
        us = ev.device_time if cuda else ev.cpu_time_total
        per_name[ev.name][0] += us
        per_name[ev.name][1] += 1
    total = sum(v[0] for v in per_name.values()) / 1e3
    launches = sum(v[1] for v in per_name.values())
    if not per_name:  # a profiler build that reports no kernel events: its own table
        return prof.key_averages().table(sort_by="device_time_total", row_limit=rows), float("nan"), 0
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:rows]
    lines = ["| kernel | ms | calls | share |", "|---|---|---|---|"]
    lines += [f"| {name[:90]} | {us / 1e3:.3f} | {n} | {us / 1e3 / max(total, 1e-9):.1%} |" for name, (us, n) in top]
    return "\n".join(lines), total, launches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8x4096")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--softmax", default="auto", help="softmax_backend of the NAtS-L layer")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--prefill", action="store_true", help="profile the no-grad prefill into a cache instead")
    add_common_args(ap)
    args = parse_common(ap)
    B, T = (int(n) for n in args.shape.split("x"))
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    what = "prefill (no grad, into a fresh cache)" if args.prefill else "fwd+bwd"
    print(f"# {env_line()}; {B}x{T} {what}, forced softmax fraction {args.frac}, {dtype}", flush=True)
    layers = {"natsl-gdn": NAtSLAttention(hidden_size=D, softmax_backend=args.softmax),
              "gdn-only": LinearAttention(hidden_size=D, num_heads=6, head_dim=128, linear_backend="gdn")}
    force_router(layers["natsl-gdn"], args.frac)
    out = []
    for name, layer in layers.items():
        layer = layer.to(device=args.device, dtype=dtype)
        x = torch.randn(B, T, D, device=args.device, dtype=dtype, requires_grad=not args.prefill)
        table, total, launches = kernel_table(layer, x, torch.randn_like(x), args.device, args.rows, args.prefill)
        out.append(f"## {name}: {total:.3f} ms {'GPU' if cuda else 'CPU'} time in {launches} "
                   f"{'kernels' if cuda else 'top-level ops'}\n\n{table}\n")
        print(out[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
