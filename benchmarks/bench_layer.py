"""Layer benchmark (issue 6): NAtSLAttention fwd+bwd vs a GDN-only layer and a full-softmax layer, same width.

The router's decision is forced to a fixed softmax fraction (random blocks) so that every T sees the same f.
Providers: the paper's 340M NAtS-L layer (D=1024, H_L=6 x (128, 256), H_A=12 x (64, 128), H_R=6, C=64) with the gdn or
mamba2 backend, a GDN-only layer (6 x (128, 256)) and the Transformer's softmax layer (16 x 64), same width D=1024.
Times: do_bench medians (ms) of the forward (inputs requiring grad) and of forward+backward, bf16, B=1 (`--batch`).
Usage (H200, fla wheels on PYTHONPATH): python3 benchmarks/bench_layer.py [--T 4096,16384,65536] [--frac 0.125]
    [--providers natsl-gdn@triton,natsl-gdn@flex,gdn-only,softmax] [--compile-check natsl-gdn] [--out F];
    CPU smoke run: --device cpu --T 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import add_common_args, bench_ms, env_line, force_router, parse_common, time_ms  # noqa: E402

from natsl import NAtSLAttention  # noqa: E402
from natsl.layers.baselines import LinearAttention, SoftmaxAttention  # noqa: E402

D = 1024


def make(provider: str, frac: float, device: str, dtype: torch.dtype):
    if provider.startswith("natsl-"):  # natsl-<linear backend>[@<softmax backend>]
        linear, _, softmax = provider.split("-", 1)[1].partition("@")
        layer = NAtSLAttention(hidden_size=D, linear_backend=linear, softmax_backend=softmax or "auto")
        if frac is not None:
            force_router(layer, frac)
    elif provider == "gdn-only":
        layer = LinearAttention(hidden_size=D, num_heads=6, head_dim=128, linear_backend="gdn")
    elif provider == "softmax":
        layer = SoftmaxAttention(hidden_size=D, num_heads=16)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return layer.to(device=device, dtype=dtype)


def compile_check(provider: str, device: str, dtype: torch.dtype, T: int) -> None:
    """`torch._dynamo.explain` of one training forward with the layer's own router: graphs and why it breaks."""
    import torch._dynamo as dynamo

    layer = make(provider, None, device, dtype)
    x = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)
    try:
        ex = dynamo.explain(layer)(x)
    except Exception as e:  # report, do not hide: the table above is still valid
        print(f"torch.compile check {provider}: dynamo.explain raised {type(e).__name__}: {str(e)[:400]}")
        return
    print(f"torch.compile check {provider} (T={T}): graphs={ex.graph_count} graph_breaks={ex.graph_break_count}")
    seen = set()
    for reason in ex.break_reasons:
        where = reason.user_stack[-1] if reason.user_stack else None
        key = (str(reason.reason)[:160], f"{where.filename}:{where.lineno}" if where else "?")
        if key not in seen:
            seen.add(key)
            print(f"  break at {key[1]}: {key[0]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,16384,65536")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--providers", default="natsl-gdn,natsl-mamba2,gdn-only,softmax")
    ap.add_argument("--compile-check", default="", help="comma-separated providers to run torch._dynamo.explain on")
    add_common_args(ap)
    args = parse_common(ap)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = bench_ms if cuda else (lambda fn: (time_ms(fn, warmup=1, rep=3),))
    Ts = [int(t) for t in args.T.split(",")]
    header = f"# {env_line()}; forced softmax fraction {args.frac}, {dtype}"
    print(header, flush=True)
    rows = []
    for prov in args.providers.split(","):
        layer = make(prov, args.frac, args.device, dtype)
        t0 = time.time()
        x = torch.randn(1, min(1024, Ts[0]), D, device=args.device, dtype=dtype, requires_grad=True)
        layer(x)[0].sum().backward()
        if cuda:
            torch.cuda.synchronize()
        warm = time.time() - t0
        for T in Ts:
            x = torch.randn(args.batch, T, D, device=args.device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def fwd(layer=layer, x=x):
                return layer(x)[0]

            def fwd_bwd(layer=layer, x=x, dy=dy):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                torch.autograd.backward(layer(x)[0], dy)

            ms_f = timer(fwd)[0]
            ms_fb = timer(fwd_bwd)[0]
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            tps = args.batch * T / ms_fb * 1e3
            rows.append((prov, f"{args.batch}x{T}", ms_f, ms_fb, tps, peak, warm))
            print(f"{prov:14s} {args.batch}x{T:6d} fwd {ms_f:8.3f} ms  fwd+bwd {ms_fb:8.3f} ms  {tps:12.0f} tok/s "
                  f"peak {peak:8.0f} MiB  (first call {warm:.1f} s)", flush=True)
        del layer
    lines = ["| provider | B x T | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | peak MiB | first call s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p} | {T} | {f:.3f} | {fb:.3f} | {tps:,.0f} | {pk:,.0f} | {w:.1f} |" for p, T, f, fb, tps, pk, w in rows]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + table + "\n")
    for prov in filter(None, args.compile_check.split(",")):
        compile_check(prov, args.device, dtype, min(4096, Ts[-1]))


if __name__ == "__main__":
    main()
