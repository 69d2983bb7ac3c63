"""The attention read of a decode step (issue 22 item 3): `attend_rows` with `impl="sdpa"` (length-masked SDPA) vs
`"triton"` (natsl's split-KV kernel), one query per head against `R` K/V rows, bf16, as CUDA-graph replays (the GPU
time a captured decode step sees) and eager.

Heads: the NAtS-L layer's softmax heads (H_A=12, d=64, d_v=128) and the Transformer's (16 × 64). Rows: 16k (a
natsl layer at 128k context with 12.5% softmax blocks) and 128k (a softmax layer at 128k). Each provider is checked
against float64 SDPA first (2× the bf16 SDPA error + 1e-3 of the largest output).
Usage (GPU): python3 benchmarks/bench_decode_read.py [--batch 1 8] [--out F]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import bench_graph_ms, bench_ms, env_line, markdown_table  # noqa: E402

from natsl.layers.state import attend_rows  # noqa: E402

CASES = [("natsl 12 x (64, 128)", 12, 64, 128, 16384), ("natsl 12 x (64, 128)", 12, 64, 128, 131072),
         ("softmax 16 x 64", 16, 64, 64, 131072)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for B in args.batch:
        for name, H, d, dv, R in CASES:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, 1, H, d, generator=g, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, H, R + 64, d, generator=g, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, H, R + 64, dv, generator=g, device="cuda", dtype=torch.bfloat16)
            limit = torch.full((B, H, 1), R, device="cuda", dtype=torch.long)
            ref = attend_rows(q.double(), k.double(), v.double(), limit, d ** -0.5)
            base = attend_rows(q, k, v, limit, d ** -0.5)
            tol = 2 * (base.double() - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
            row = dict(B=B, heads=name, rows=R)
            for impl in ("sdpa", "triton"):
                out = attend_rows(q, k, v, limit, d ** -0.5, impl)
                err = (out.double() - ref).abs().max().item()
                row[f"{impl} ok"] = err <= tol

                def fn(impl=impl):
                    return attend_rows(q, k, v, limit, d ** -0.5, impl)
                row[f"{impl} graphed ms"] = bench_graph_ms(fn)[0]
                row[f"{impl} eager ms"] = bench_ms(fn)[0]
            row["graphed sdpa / triton"] = row["sdpa graphed ms"] / row["triton graphed ms"]
            rows.append(row)
            print(row, flush=True)
    cols = ["B", "heads", "rows", "sdpa ok", "triton ok", "sdpa graphed ms", "triton graphed ms", "graphed sdpa / triton",
            "sdpa eager ms", "triton eager ms"]
    text = f"# {env_line()}\n\n" + markdown_table(rows, cols)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
