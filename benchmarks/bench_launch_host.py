"""Host issue time of one launch, on the GPU: natsl's two masked-chunk kernels against one fla kernel and one aten
op, at tiny shapes (the GPU is idle between launches, so the time is the host's). Answers where the linear
branch's extra host time at mamba2 1 × 16k comes from (issue 19: 1.25× plain fla by wall time per call there,
RESULTS "Session 28"): `--interleaved` in `bench_linear_branch.py` times the whole call, this times each launch.

    python3 benchmarks/bench_launch_host.py [--calls 2000] [--out FILE]

Prints µs per call (median of 5 rounds of `--calls` back-to-back calls, no synchronisation inside a round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from utils import env_line, host_us_per_call, markdown_table  # noqa: E402

from natsl.kernels.masked_write import mask_keys, masked_write_bwd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fla.ops.common.chunk_o import chunk_bwd_dv_local
    from fla.ops.utils import chunk_local_cumsum

    dev, bf = "cuda", torch.bfloat16
    B, T, H, K, V, C = 1, 64, 6, 128, 256, 64
    k = torch.randn(B, T, H, K, device=dev, dtype=bf)
    q = torch.randn_like(k)
    v = torch.randn(B, T, H, V, device=dev, dtype=bf)
    do = torch.randn_like(v)
    g = -torch.rand(B, T, H, device=dev)
    m = torch.ones(B, T // C, H, device=dev)
    gc = chunk_local_cumsum(g, chunk_size=C)
    dh = torch.randn(B, T // C, H, K, V, device=dev, dtype=bf)
    dk, dv, dg = torch.randn_like(k), torch.randn_like(v), torch.randn_like(g)
    cases = {
        "aten mul (k * 2)": lambda: k.mul(2),
        "aten new_zeros": lambda: m.new_zeros(B, T // C, H, 2),
        "fla chunk_local_cumsum": lambda: chunk_local_cumsum(g, chunk_size=C),
        "fla chunk_bwd_dv_local": lambda: chunk_bwd_dv_local(q=q, k=k, do=do, g=gc, scale=K ** -0.5, chunk_size=C),
        "natsl mask_keys": lambda: mask_keys(k, m, C),
        "natsl masked_write_bwd (mamba2's call)": lambda: masked_write_bwd(
            v, k, m.reshape(-1, H), dh, dk, dv=dv, dv_add=True, dg=dg, g=gc, chunk_size=C),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        issue = [host_us_per_call(fn, n=args.calls, wait_for_gpu=False) for _ in range(5)]
        wall = [host_us_per_call(fn, n=args.calls) for _ in range(5)]
        rows.append({"launch": name, "host issue us/call": statistics.median(issue),
                     "wall us/call": statistics.median(wall)})
        print(rows[-1], flush=True)  # noqa: T201
    text = (f"# bench_launch_host ({env_line()})\nshape B={B} T={T} H={H} K={K} V={V}, bf16, {args.calls} calls "
            f"x 5 rounds\n\n" + markdown_table(rows, ["launch", "host issue us/call", "wall us/call"]) + "\n")
    print(text)  # noqa: T201
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
