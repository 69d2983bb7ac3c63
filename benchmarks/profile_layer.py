"""Where a NAtS-L layer's fwd+bwd time goes beside a GDN layer's (issue 21): the CUDA kernels of one training call
of each layer, grouped by name, with the layer's total GPU time, its number of kernel launches and the call's wall
time (wall well above GPU time: the call is host-bound or waits on host syncs).

Layers: the paper's 340M NAtS-L layer (gdn, forced softmax fraction `--frac`, `softmax_backend` of `--softmax`) and
the GDN layer of the same width, bf16 weights as in `bench_layer.py`; torch.profiler over one fwd+bwd after two
warm-up calls. Usage (H200, fla wheels on PYTHONPATH):
    python3 benchmarks/profile_layer.py [--shape 8x4096] [--frac 0.125] [--softmax auto] [--rows 30] [--prefill] \
        --fla-hopper-bypass
`--prefill`: one no-grad forward of each layer into a fresh inference cache (the prefill of generation) instead.
`--models hybrid,fla_gdn` (names of `bench_model.py`): whole 340M models instead of layers, with `--prefill` their
prefill as `bench_model.py --prefill` times it, otherwise their training step.
CPU smoke run: --device cpu --shape 1x128 [--models hybrid,linear --size tiny --prefill]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import add_common_args, env_line, force_router, parse_common  # noqa: E402

from natsl import NAtSLAttention  # noqa: E402
from natsl.layers.baselines import LinearAttention  # noqa: E402

D = 1024


def kernel_table(call, device: str, rows: int) -> tuple[str, float, int, float]:
    """`(table, total GPU ms, launches, wall ms)` of one `call()` after two warm-up calls: device time per kernel
    name (CPU: per op), largest first."""
    for _ in range(2):
        call()
    cuda = device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    per_name: dict = defaultdict(lambda: [0.0, 0])
    spans = []  # (start, end, name) of the GPU events, for the idle gaps
    for ev in prof.events():
        kind = getattr(ev, "device_type", None)
        on_gpu = kind is not None and kind == torch.autograd.DeviceType.CUDA
        if (cuda and not on_gpu) or (not cuda and ev.cpu_parent is not None):
            continue
        us = ev.device_time if cuda else ev.cpu_time_total
        if cuda:
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
        per_name[ev.name][0] += us
        per_name[ev.name][1] += 1
    total = sum(v[0] for v in per_name.values()) / 1e3
    launches = sum(v[1] for v in per_name.values())
    if not per_name:  # a profiler build that reports no kernel events: its own table
        return prof.key_averages().table(sort_by="device_time_total", row_limit=rows), float("nan"), 0, wall
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:rows]
    lines = ["| kernel | ms | calls | share |", "|---|---|---|---|"]
    lines += [f"| {name[:90]} | {us / 1e3:.3f} | {n} | {us / 1e3 / max(total, 1e-9):.1%} |" for name, (us, n) in top]
    host = []
    if cuda:  # where the host spends its time (a sync shows as a long aten::item / cudaStreamSynchronize / cudaMemcpy)
        host = ["", "Host time by op (self CPU):", "", "```",
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "```"]
    return "\n".join(lines + idle_gaps(spans) + host), total, launches, wall


def idle_gaps(spans: list, top: int = 8) -> list[str]:
    """Lines on the GPU's idle time between kernels (`spans`: their (start, end, name) in us): the total and the
    `top` longest gaps with the kernels on either side (where the host stalled or fell behind)."""
    if not spans:
        return []
    spans = sorted(spans)
    gaps, end, prev = [], spans[0][1], spans[0][2]
    for s, e, name in spans[1:]:
        if s > end:
            gaps.append((s - end, prev, name))
        if e >= end:
            end, prev = e, name
    total = sum(g for g, _, _ in gaps) / 1e3
    out = ["", f"GPU idle between kernels: {total:.3f} ms in {len(gaps)} gaps; longest:", "",
           "| idle ms | after | before |", "|---|---|---|"]
    out += [f"| {g / 1e3:.3f} | {a[:60]} | {b[:60]} |" for g, a, b in sorted(gaps, reverse=True)[:top]]
    return out


def layer_call(layer, x, dy, prefill: bool):
    """One fwd+bwd of `layer` (with `prefill`: one no-grad forward into a fresh inference cache)."""
    def call():
        if prefill:
            with torch.no_grad():
                layer(x, use_cache=True)
            return
        x.grad = None
        layer.zero_grad(set_to_none=True)
        torch.autograd.backward(layer(x)[0], dy)
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8x4096")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--softmax", default="auto", help="softmax_backend of the NAtS-L layer")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--prefill", action="store_true", help="profile the no-grad prefill into a cache instead")
    ap.add_argument("--models", default="", help="comma-separated bench_model.py models to profile instead of layers")
    ap.add_argument("--size", default="340m", help="model size preset of --models")
    add_common_args(ap)
    args = parse_common(ap)
    B, T = (int(n) for n in args.shape.split("x"))
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    what = "prefill (no grad, into a fresh cache)" if args.prefill else "fwd+bwd"
    print(f"# {env_line()}; {B}x{T} {what}, forced softmax fraction {args.frac}, {dtype}", flush=True)
    calls = {}
    if args.models:
        import bench_model

        for family in args.models.split(","):
            model, opt = bench_model.build(args.size, family, args.frac, args.device, "gdn")
            vocab = model.config.vocab_size
            if args.prefill:
                model = model.to(dtype).eval()
                calls[family] = bench_model.make_prefill(model, B, T, args.device, vocab)
            else:
                calls[family] = bench_model.make_step(model, opt, B, T, args.device, vocab)
    else:
        layers = {"natsl-gdn": NAtSLAttention(hidden_size=D, softmax_backend=args.softmax),
                  "gdn-only": LinearAttention(hidden_size=D, num_heads=6, head_dim=128, linear_backend="gdn")}
        force_router(layers["natsl-gdn"], args.frac)
        for name, layer in layers.items():
            layer = layer.to(device=args.device, dtype=dtype)
            x = torch.randn(B, T, D, device=args.device, dtype=dtype, requires_grad=not args.prefill)
            calls[name] = layer_call(layer, x, torch.randn_like(x), args.prefill)
    out = []
    for name, call in calls.items():
        table, total, launches, wall = kernel_table(call, args.device, args.rows)
        out.append(f"## {name}: {total:.3f} ms {'GPU' if cuda else 'CPU'} time in {launches} "
                   f"{'kernels' if cuda else 'top-level ops'}, {wall:.3f} ms wall\n\n{table}\n")
        print(out[-1], flush=True)
        calls[name] = None  # free the model before the next one
        if cuda:
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
