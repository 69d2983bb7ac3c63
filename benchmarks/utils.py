"""Timing and reporting helpers shared by the benchmarks (never imported by natsl or the tests)."""

from __future__ import annotations

import os
import subprocess
import time

import torch
import triton


def capture_cuda_graph(fn, *, warmup: int = 2, pool=None):
    """`(graph, out)`: `fn()` run `warmup` times on a side stream (compiles, autotuning and allocator warm-up stay
    outside the graph), then captured into a `torch.cuda.CUDAGraph` (in the memory pool `pool`, if given). `out` is
    what the captured call returned: static tensors that every `graph.replay()` overwrites. CUDA only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def bench_ms(fn, quantiles=(0.5, 0.2, 0.8)) -> tuple[float, float, float]:
    """`(median, p20, p80)` milliseconds of `fn()` by `triton.testing.do_bench` (L2 flushed between calls)."""
    return tuple(triton.testing.do_bench(fn, quantiles=list(quantiles)))


def bench_graph_ms(fn, quantiles=(0.5, 0.2, 0.8)) -> tuple[float, float, float]:
    """`bench_ms` of a CUDA-graph replay of `fn()`: the GPU time without the host's launch overhead (which
    `do_bench` measures too whenever the host cannot keep ahead of a short kernel). L2 is still flushed."""
    graph, _ = capture_cuda_graph(fn)
    return bench_ms(graph.replay, quantiles)


def host_us_per_call(fn, n: int = 200, wait_for_gpu: bool = True) -> float:
    """Wall time per call of `n` back-to-back eager calls: max(host overhead, GPU time) per call, or with
    `wait_for_gpu=False` the host's issue time alone (no synchronisation before the clock stops)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if wait_for_gpu:
        torch.cuda.synchronize()
    end = time.perf_counter()
    torch.cuda.synchronize()
    return (end - start) / n * 1e6


def gbps(num_bytes: float, ms: float) -> float:
    return num_bytes / ms / 1e6


def git_sha() -> str:
    """The commit benchmarked: ``$NATSL_GIT_SHA`` if set, else ``git rev-parse`` with ``+changes`` when tracked files
    differ from it (a device copy of the working tree can carry an older ``.git`` than its files)."""
    sha = os.environ.get("NATSL_GIT_SHA")
    if sha:
        return sha
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + "+changes" if changed else sha


def env_line() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, natsl {git_sha()}"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def force_router(layer, frac: float, seed: int = 0) -> None:
    """Replace the decision of `layer.router` (a natsl `BlockRouter`) by random blocks with softmax fraction `frac`
    (each block independently, fixed per shape): the weights stay exactly one-hot and the router's
    straight-through gradient still flows, so the training path (router gradients included) is what runs."""
    router = layer.router
    cache: dict = {}

    def decide(xm):  # the training forward and the cached path (prefill, decode) both decide here
        w, p = type(router).decide(router, xm)
        key = (tuple(w.shape), w.device)
        if key not in cache:
            g = torch.Generator(device="cpu").manual_seed(seed)
            soft = torch.rand(w.shape[:-1], generator=g) < frac
            cache[key] = torch.stack([soft, ~soft], -1).to(device=w.device, dtype=w.dtype)
        return cache[key] + (w - w.detach()), p

    router.decide = decide


def time_ms(fn, warmup: int = 2, rep: int = 5) -> float:
    """Median wall milliseconds of `fn()` with device syncs (a whole training step; CPU smoke runs too)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def allow_fla_gated_backward_on_hopper() -> None:
    """Explicit harness opt-in: fla refuses its gated backward on Triton >= 3.4, < 3.7.1 on Hopper (fla #640); the
    H200 image has Triton 3.6, so set fla's own flag `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`.
    tests/gpu/test_linear_branch_gpu.py compares every gradient with the float64 reference under this bypass."""
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True


def add_common_args(ap) -> None:
    """`--device`, `--out`, `--fla-hopper-bypass`, `--fla-configs`: shared by the layer and model benchmarks."""
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--fla-hopper-bypass", action="store_true",
                    help="set fla's #640 guard flag (Triton < 3.7.1 on Hopper; see allow_fla_gated_backward_on_hopper)")
    ap.add_argument("--fla-configs", default=None,
                    help="folder of fla kernel configurations to read instead of autotuning (natsl.tuning."
                         "use_fla_configs; 'auto': natsl's set for this GPU)")


def parse_common(ap):
    """`ap.parse_args()`, applying `--fla-configs` (before fla is imported) and `--fla-hopper-bypass`."""
    args = ap.parse_args()
    if args.fla_configs is not None:
        from natsl.tuning import use_fla_configs

        folder = use_fla_configs(args.fla_configs)
        print(f"# fla kernel configurations from {folder} ({os.environ.get('FLA_CACHE_MODE')})", flush=True)
    if args.fla_hopper_bypass:
        allow_fla_gated_backward_on_hopper()
    return args
