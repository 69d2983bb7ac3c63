"""The NAtS-L layer's two-norm merge (spec §1.6): natsl's fused kernel (`natsl.kernels.merge.norm_merge`) against
the composed PyTorch twin (`naive_norm_merge`, what the layer ran before), forward and forward+backward time and
the memory the forward keeps for the backward, at the 340M layer's shapes (H_A = 12 softmax heads × d_va = 128).

Run on a GPU: `PYTHONPATH=$PWD python3 benchmarks/bench_merge.py [--shapes 8x4096,1x65536]`. Outputs are checked
against a float64 twin before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import bench_ms, env_line, markdown_table  # noqa: E402

from natsl.kernels.merge import norm_merge  # noqa: E402
from natsl.kernels.naive import naive_norm_merge  # noqa: E402

PROVIDERS = {"natsl kernel": norm_merge, "composed torch": naive_norm_merge}


def inputs(B, T, H, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype).requires_grad_()

    gam = [(1 + 0.1 * torch.randn(D, generator=g, device="cuda")).requires_grad_() for _ in range(2)]
    return [r(B, T, H, D, scale=2), r(B, T, H, D, scale=0.3), r(B, T, H, 2), r(B, T, H, D), *gam]


def saved_bytes(fn, args) -> int:
    """Bytes of activation memory that the forward leaves allocated for the backward."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fn(*args, 1e-5)
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return used


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x4096,1x65536")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"# {env_line()}; H_A={args.heads}, d_va={args.dim}, bf16", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        xs = inputs(B, T, args.heads, args.dim, torch.bfloat16)
        ref = naive_norm_merge(*[x.double() for x in xs], 1e-5)
        dy = torch.randn_like(ref, dtype=torch.bfloat16)
        for name, fn in PROVIDERS.items():
            y = fn(*xs, 1e-5)
            err = (y.double() - ref).abs().max().item()
            assert err <= 0.05 * ref.abs().max().item(), f"{name}: error {err}"
            fwd = bench_ms(lambda: fn(*xs, 1e-5))[0]
            fb = bench_ms(lambda: torch.autograd.grad(fn(*xs, 1e-5), xs, dy))[0]
            rows.append(dict(shape=shape, provider=name, fwd_ms=fwd, fwd_bwd_ms=fb,
                             saved_MiB=saved_bytes(fn, xs) / 2**20))
            print(rows[-1], flush=True)
    table = markdown_table(rows, ["shape", "provider", "fwd_ms", "fwd_bwd_ms", "saved_MiB"])
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
