"""Timing and reporting helpers shared by the benchmarks (never imported by natsl or the tests)."""

from __future__ import annotations

import os
import subprocess
import time

import torch
import triton


def bench_ms(fn, quantiles=(0.5, 0.2, 0.8)) -> tuple[float, float, float]:
    """`(median, p20, p80)` milliseconds of `fn()` by `triton.testing.do_bench` (L2 flushed between calls)."""
    return tuple(triton.testing.do_bench(fn, quantiles=list(quantiles)))


def bench_graph_ms(fn, quantiles=(0.5, 0.2, 0.8)) -> tuple[float, float, float]:
    """`bench_ms` of a CUDA-graph replay of `fn()`: the GPU time without the host's launch overhead (which
    `do_bench` measures too whenever the host cannot keep ahead of a short kernel). L2 is still flushed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, quantiles)


def host_us_per_call(fn, n: int = 200) -> float:
    """Wall time per call of `n` back-to-back eager calls: max(host overhead, GPU time) per call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def gbps(num_bytes: float, ms: float) -> float:
    return num_bytes / ms / 1e6


def git_sha() -> str:
    sha = os.environ.get("NATSL_GIT_SHA")
    if sha:
        return sha
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_line() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, natsl {git_sha()}"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
