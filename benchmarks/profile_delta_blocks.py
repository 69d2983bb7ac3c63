"""Profile of the delta rule's per-block work in the linear branch (no fla needed): the WY solves of the softmax
blocks (`_delta_blocks`, fwd+bwd incl. the gathers) and the router-gradient correction (`_delta_in_block_gate_grad`,
no grad), compiled (`NATSL_COMPILE=auto`) and eager (`off`), at the paper head config with 12.5% softmax blocks.

Reports per part: do_bench median (ms), host issue time per call (ms; back-to-back calls without synchronising,
so it is the host's launch cost whenever that exceeds the GPU time) and the top CPU ops / GPU kernels
(torch.profiler). Run on the H200:
    python benchmarks/profile_delta_blocks.py --out $OUT/profile_delta_blocks.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear_branch import SHAPES, delta_parts  # noqa: E402
from utils import bench_ms, env_line, host_us_per_call, markdown_table  # noqa: E402


def top(prof, key: str, n: int = 10) -> str:
    rows = [{"op": e.key[:80], "calls": e.count, "ms": getattr(e, key) / 1e3}
            for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:n]]
    return markdown_table(rows, ["op", "calls", "ms"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="16384,65536")
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--modes", default="auto,off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = [f"# profile_delta_blocks ({env_line()})", ""]

    def emit(line=""):
        print(line, flush=True)  # noqa: T201
        report.append(line)
        if args.out:
            Path(args.out).write_text("\n".join(report) + "\n")

    rows, profiles = [], []
    ts = [int(t) for t in args.ts.split(",")]
    for T in ts:
        for mode in args.modes.split(","):
            os.environ["NATSL_COMPILE"] = mode
            for name, fn in delta_parts("gdn", SHAPES["paper-340M"], T, args.fraction).items():
                fn()  # compile
                rows.append({"T": T, "compile": mode, "part": name, "do_bench ms": bench_ms(fn)[0],
                             "host issue ms": host_us_per_call(fn, 30, wait_for_gpu=False) / 1e3})
                print(rows[-1], flush=True)  # noqa: T201
                if max(ts) == T:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                    profiles.append((f"T={T}, NATSL_COMPILE={mode}, {name}", prof))
    emit(markdown_table(rows, ["T", "compile", "part", "do_bench ms", "host issue ms"]))
    for title, prof in profiles:
        emit(f"\n### {title}: top CPU ops (self time)\n")
        emit(top(prof, "self_cpu_time_total"))
        emit(f"\n### {title}: top GPU kernels\n")
        emit(top(prof, "device_time_total"))


if __name__ == "__main__":
    main()
