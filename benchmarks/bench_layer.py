"""Layer benchmark (issue 6): NAtSLAttention fwd+bwd vs a GDN-only layer and a full-softmax layer, same width.

The router's decision is forced to a fixed softmax fraction (random blocks) so that every T sees the same f.
Usage (H200, fla wheels on PYTHONPATH): python3 benchmarks/bench_layer.py [--T 4096,16384,65536] [--frac 0.125]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from triton.testing import do_bench

from natsl import NAtSLAttention
from natsl.layers.baselines import LinearAttention, SoftmaxAttention

D = 1024


def forced_router(layer: NAtSLAttention, frac: float, seed: int = 0):
    """Replace the router's decision by random blocks with softmax fraction `frac` (gradient still flows)."""
    router = layer.router

    def forward(x, cu_seqlens=None, layout=None):
        w, p = type(router).forward(router, x, cu_seqlens, layout)
        g = torch.Generator(device="cpu").manual_seed(seed)
        soft = (torch.rand(w.shape[:-1], generator=g) < frac).to(w.device)
        hard = torch.stack([soft, ~soft], -1).to(w.dtype)
        return hard + (w - w.detach()), p

    router.forward = forward


def make(provider: str, frac: float):
    if provider.startswith("natsl-"):
        layer = NAtSLAttention(hidden_size=D, linear_backend=provider.split("-", 1)[1], softmax_backend="auto")
        forced_router(layer, frac)
    elif provider == "gdn-only":
        layer = LinearAttention(hidden_size=D, num_heads=6, head_dim=128, linear_backend="gdn")
    else:
        layer = SoftmaxAttention(hidden_size=D, num_heads=16)
    return layer.cuda().to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="4096,16384,65536")
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--providers", default="natsl-gdn,natsl-mamba2,gdn-only,softmax")
    ap.add_argument("--compile-check", action="store_true")
    args = ap.parse_args()
    Ts = [int(t) for t in args.T.split(",")]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} sha {os.environ.get('NATSL_GIT_SHA', '?')}")
    rows = []
    for prov in args.providers.split(","):
        layer = make(prov, args.frac)
        t0 = time.time()
        x = torch.randn(1, 1024, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layer(x)[0].sum().backward()
        torch.cuda.synchronize()
        warm = time.time() - t0
        for T in Ts:
            x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(x)
            torch.cuda.reset_peak_memory_stats()

            def fwd():
                return layer(x)[0]

            def fwd_bwd():
                torch.autograd.backward(layer(x)[0], dy)

            ms_f = do_bench(fwd, quantiles=[0.5])
            ms_fb = do_bench(fwd_bwd, quantiles=[0.5], grad_to_none=[x, *layer.parameters()])
            peak = torch.cuda.max_memory_allocated() / 2**20
            rows.append((prov, T, ms_f, ms_fb, T / ms_fb * 1e3, peak, warm))
            print(f"{prov:14s} T={T:6d} fwd {ms_f:8.3f} ms  fwd+bwd {ms_fb:8.3f} ms  {T / ms_fb * 1e3:12.0f} tok/s "
                  f"peak {peak:8.0f} MiB  (first call {warm:.1f} s)", flush=True)
    print("\n| provider | T | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | peak MiB |")
    print("|---|---|---|---|---|---|")
    for prov, T, f, fb, tps, peak, _ in rows:
        print(f"| {prov} | {T} | {f:.3f} | {fb:.3f} | {tps:,.0f} | {peak:,.0f} |")
    if args.compile_check:
        import torch._dynamo as dynamo

        layer = make("natsl-gdn", args.frac)
        x = torch.randn(1, 4096, D, device="cuda", dtype=torch.bfloat16)
        ex = dynamo.explain(layer)(x)
        print(f"\ntorch.compile (dynamo.explain) natsl-gdn: graphs={ex.graph_count} graph_breaks={ex.graph_break_count}")
        for reason in ex.break_reasons[:10]:
            print("  break:", str(reason.reason)[:200])


if __name__ == "__main__":
    main()
