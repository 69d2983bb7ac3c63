"""Bandwidth of natsl's gather / scatter kernels against a device copy of the same bytes and torch's index ops.

Run on a GPU (one process; correctness is checked before anything is timed or printed):
    NATSL_TEST_DEVICE=cuda PYTHONPATH=$PWD python3 benchmarks/bench_gather_scatter.py [--sweep]

Bytes are data bytes read + written (index reads not counted). "% copy" compares with `y.copy_(x)` moving the same
number of bytes. Every op is timed twice with `triton.testing.do_bench` (L2 flushed before each call): eager, and
as a CUDA-graph replay ("graph": GPU time only; eager also counts host launch overhead whenever the host cannot keep
ahead of the GPU, which happens for the ~20 µs ops here). "host µs/call" is the wall time per call of back-to-back
eager calls. Providers:
- gather:        `gather_tokens(x, src, Hr)`: `[S, G, D]` from `[B, T, H, D]`; `index_select` on the row view.
- scatter:       `scatter_rows(y, src, R, out=out)` into an existing `[R, W]` (index_copy_ semantics); `index_copy_`.
- scatter-dense: `scatter_tokens(y, dest)`: a fresh `[B, T, H, D]`, zero where not routed (the op the layer uses,
                 and gather_tokens' backward); torch: `zeros` + `index_copy_`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import bench_graph_ms, bench_ms, env_line, gbps, host_us_per_call, markdown_table  # noqa: E402

import natsl.kernels.gather_scatter as gs  # noqa: E402
from natsl.kernels import gather_tokens, scatter_rows, scatter_tokens  # noqa: E402
from natsl.kernels.index import block_layout, token_routes  # noqa: E402

SHAPES = {
    "T64k H12xD128 Hr6 (G2) f12.5%": dict(B=1, T=65536, H=12, D=128, Hr=6, block_size=64, softmax_frac=0.125),
    "T64k H12xD128 Hr12 (G1) f12.5%": dict(B=1, T=65536, H=12, D=128, Hr=12, block_size=64, softmax_frac=0.125),
    "T64k H12xD128 Hr6 (G2) f50%": dict(B=1, T=65536, H=12, D=128, Hr=6, block_size=64, softmax_frac=0.5),
}
DTYPE = torch.bfloat16
DEVICE = "cuda"
PROVIDERS = {
    "gather": ["natsl gather_tokens", "natsl gather_tokens (x.requires_grad)", "torch index_select",
               "copy (same bytes)"],
    "scatter": ["natsl scatter_rows(out=)", "torch index_copy_", "copy (same bytes)"],
    "scatter-dense": ["natsl scatter_tokens", "torch zeros+index_copy_", "copy (same bytes)"],
}


def make_inputs(shape: dict) -> dict:
    """Tensors of one shape: exactly `softmax_frac` of the blocks of every router head are softmax."""
    B, T, H, D, Hr = shape["B"], shape["T"], shape["H"], shape["D"], shape["Hr"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    lay = block_layout(T, shape["block_size"], device=DEVICE)
    soft = torch.zeros(B, lay.N, Hr, dtype=torch.bool, device=DEVICE)
    k = round(lay.N * shape["softmax_frac"])
    for b in range(B):
        for r in range(Hr):
            soft[b, torch.randperm(lay.N, generator=g, device=DEVICE)[:k], r] = True
    routes = token_routes(soft, lay)
    S, G, R = routes.num_tokens, H // Hr, B * T * Hr
    x = torch.randn(B, T, H, D, generator=g, device=DEVICE).to(DTYPE)
    y = torch.randn(S, G, D, generator=g, device=DEVICE).to(DTYPE)
    return dict(x=x, x_grad=x.detach().requires_grad_(), y=y, rows=x.view(R, G * D), y_rows=y.view(S, G * D),
                src=routes.src, dest=routes.dest, out=torch.zeros(R, G * D, dtype=DTYPE, device=DEVICE), S=S, R=R,
                W=G * D, Hr=Hr, B=B, T=T, H=H, D=D)


def num_bytes(inp: dict, op: str) -> int:
    es = inp["x"].element_size()
    if op == "scatter-dense":
        return (inp["S"] + inp["R"]) * inp["W"] * es
    return 2 * inp["S"] * inp["W"] * es


def setup(inp: dict, op: str, provider: str) -> Callable:
    x, y, rows, y_rows, src, dest, out, Hr = (inp[k] for k in ("x", "y", "rows", "y_rows", "src", "dest", "out", "Hr"))
    if provider.startswith("copy"):
        n = num_bytes(inp, op) // (2 * x.element_size())
        a, b = torch.empty(n, dtype=DTYPE, device=DEVICE).normal_(), torch.empty(n, dtype=DTYPE, device=DEVICE)
        return lambda: b.copy_(a)
    table = {
        ("gather", "natsl gather_tokens"): lambda: gather_tokens(x, src, Hr, dest=dest, validate=False),
        ("gather", "natsl gather_tokens (x.requires_grad)"):
            lambda: gather_tokens(inp["x_grad"], src, Hr, dest=dest, validate=False),
        ("gather", "torch index_select"): lambda: rows.index_select(0, src),
        ("scatter", "natsl scatter_rows(out=)"): lambda: scatter_rows(y_rows, src, inp["R"], out=out, validate=False),
        ("scatter", "torch index_copy_"): lambda: out.index_copy_(0, src, y_rows),
        ("scatter-dense", "natsl scatter_tokens"): lambda: scatter_tokens(y, dest, src=src, validate=False),
        ("scatter-dense", "torch zeros+index_copy_"):
            lambda: torch.zeros_like(rows).index_copy_(0, src, y_rows).view_as(x),
    }
    return table[(op, provider)]


def kernel_call(inp: dict, op: str, block_rows: int | None = None, num_warps: int | None = None) -> Callable:
    """The host function alone (no validation, no autograd), with tile overrides for the sweep."""
    kw = dict(block_rows=block_rows, num_warps=num_warps)
    if op == "gather":
        return lambda: gs.gather_rows_fwd(inp["rows"], inp["src"], **kw)
    if op == "scatter":
        return lambda: gs.scatter_rows_fwd(inp["y_rows"], inp["src"], inp["R"], inp["out"], **kw)
    return lambda: gs.gather_rows_fwd(inp["y_rows"], inp["dest"].view(-1), **kw)


def verify(inp: dict, configs) -> None:
    """Exact agreement with torch before any timing; raises (and so prints nothing) on a mismatch."""
    x, y, rows, y_rows, src, dest = (inp[k] for k in ("x", "y", "rows", "y_rows", "src", "dest"))
    G = inp["W"] // inp["D"]
    ref_gather = rows.index_select(0, src)
    ref_dense = torch.zeros_like(rows).index_copy_(0, src, y_rows)
    checks = {
        "gather_tokens": (gather_tokens(x, src, inp["Hr"], dest=dest).view_as(ref_gather), ref_gather),
        "scatter_tokens": (scatter_tokens(y, dest).view_as(ref_dense), ref_dense),
        "scatter_rows": (scatter_rows(y_rows, src, inp["R"], out=torch.zeros_like(rows)), ref_dense),
    }
    for block_rows, num_warps in configs:
        for op, ref in (("gather", ref_gather), ("scatter-dense", ref_dense)):
            checks[f"{op} BR={block_rows} warps={num_warps}"] = (kernel_call(inp, op, block_rows, num_warps)(), ref)
        o = torch.zeros_like(rows)
        gs.scatter_rows_fwd(y_rows, src, inp["R"], o, block_rows=block_rows, num_warps=num_warps)
        checks[f"scatter BR={block_rows} warps={num_warps}"] = (o, ref_dense)
    for name, (got, ref) in checks.items():
        if not torch.equal(got, ref):
            raise SystemExit(f"correctness check failed: {name} (G={G}); refusing to print timings")
    xg = x.detach().requires_grad_()
    (dx,) = torch.autograd.grad(gather_tokens(xg, src, inp["Hr"], dest=dest), xg, y)
    if not torch.equal(dx.view_as(ref_dense), ref_dense):
        raise SystemExit("correctness check failed: gather_tokens backward; refusing to print timings")


def sweep_configs(inp: dict) -> list[tuple[int, int]]:
    rows_per_kib = max(1, 1024 // (inp["W"] * inp["x"].element_size()))
    return [(max(1, kib * rows_per_kib), w) for kib in (4, 8, 16, 32) for w in (4, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time tile configs of the bare kernels")
    args = parser.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    inputs = {name: make_inputs(shape) for name, shape in SHAPES.items()}
    for inp in inputs.values():
        verify(inp, sweep_configs(inp) if args.sweep else [])
    report = [f"Gather / scatter bandwidth, {DTYPE}, {env_line()}", ""]
    if args.sweep:
        rows = []
        for name, inp in inputs.items():
            for block_rows, num_warps in [(None, None)] + sweep_configs(inp):
                row = dict(shape=name, BR=block_rows or "default", warps=num_warps or "default")
                for op in ("gather", "scatter", "scatter-dense"):
                    ms = bench_graph_ms(kernel_call(inp, op, block_rows, num_warps))[0]
                    row[f"{op} GB/s"] = gbps(num_bytes(inp, op), ms)
                rows.append(row)
        report += ["Tile sweep (bare host functions, CUDA-graph timing):", "",
                   markdown_table(rows, ["shape", "BR", "warps", "gather GB/s", "scatter GB/s", "scatter-dense GB/s"]),
                   ""]
    rows = []
    for name, inp in inputs.items():
        for op, providers in PROVIDERS.items():
            nb = num_bytes(inp, op)
            fns = {p: setup(inp, op, p) for p in providers}
            graph = {p: bench_graph_ms(fn) for p, fn in fns.items()}
            eager = {p: bench_ms(fn) for p, fn in fns.items()}
            copy_graph, copy_eager = graph["copy (same bytes)"][0], eager["copy (same bytes)"][0]
            for p, fn in fns.items():
                (ms, lo, hi), ms_eager = graph[p], eager[p][0]
                rows.append({"shape": name, "op": op, "provider": p, "MB moved": round(nb / 1e6, 1),
                             "graph ms": ms, "graph p20-p80": f"{lo:.4f}-{hi:.4f}", "graph GB/s": gbps(nb, ms),
                             "graph % copy": round(100 * copy_graph / ms, 1), "eager ms": ms_eager,
                             "eager GB/s": gbps(nb, ms_eager), "eager % copy": round(100 * copy_eager / ms_eager, 1),
                             "host µs/call": round(host_us_per_call(fn), 1)})
    report += [markdown_table(rows, ["shape", "op", "provider", "MB moved", "graph ms", "graph p20-p80", "graph GB/s",
                                     "graph % copy", "eager ms", "eager GB/s", "eager % copy", "host µs/call"])]
    text = "\n".join(report)
    print(text)  # noqa: T201
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gather_scatter.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
