"""Host issue time of one launch, on the GPU: natsl's two masked-chunk kernels against fla kernels and aten ops,
at tiny shapes (the GPU is idle between launches, so the time is the host's). Answers where the linear branch's
extra host time at mamba2 1 × 16k comes from (issue 19: 1.25× plain fla by wall time per call there, RESULTS
"Session 28"): `--interleaved` in `bench_linear_branch.py` times the whole call, this times each launch.
With `--breakdown BACKEND:BxT` it also takes one eager fwd+bwd apart on the host at that case: plain fla's call and
the branch's, each function they call timed by a wrapper (fla's chunk functions, natsl's two kernels), the rest is
Python, aten and autograd around them.

    python3 benchmarks/bench_launch_host.py [--calls 2000] [--breakdown mamba2:1x16384] [--out FILE]

Prints µs per call (median of 5 rounds of `--calls` back-to-back calls, no synchronisation inside a round).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from utils import allow_fla_gated_backward_on_hopper, env_line, host_us_per_call, markdown_table  # noqa: E402

from natsl.kernels.masked_write import masked_write_bwd, masked_write_fwd  # noqa: E402

PLAIN_LEAVES = {  # backend: (module of plain fla's chunk function, the names it calls)
    "mamba2": ("fla.ops.simple_gla.chunk", ("chunk_local_cumsum", "chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh",
                                            "chunk_bwd_dqkwg", "chunk_bwd_dv")),
    "gdn": ("fla.ops.gated_delta_rule.chunk", ("chunk_local_cumsum", "chunk_gated_delta_rule_fwd_intra",
                                               "chunk_gated_delta_rule_fwd_h", "chunk_fwd_o", "recompute_w_u_fwd",
                                               "chunk_bwd_dv_local", "chunk_gated_delta_rule_bwd_dhu",
                                               "chunk_bwd_dqkwg", "prepare_wy_repr_bwd", "l2norm_fwd",
                                               "l2norm_bwd")),
}
#: natsl's masked pass: (module, names) whose host time is taken apart (fla's functions as the pass reaches them)
NATSL_LEAVES = (
    ("natsl.layers.linear.masked", ("masked_write_fwd", "masked_write_bwd")),
    ("fla.ops.common.chunk_h", ("chunk_fwd_h", "chunk_bwd_dh")),
    ("fla.ops.common.chunk_o", ("chunk_fwd_o", "chunk_bwd_dqkwg", "chunk_bwd_dv_local")),
)


class _Clock:
    """Host time per wrapped function: `patch(module, names)` wraps them with a perf counter (undone by `undo`)."""

    def __init__(self):
        self.ns, self.calls, self._undo = collections.Counter(), collections.Counter(), []

    def _timed(self, fn, key: str):
        def timed(*a, **kw):
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **kw)
            finally:
                self.ns[key] += time.perf_counter_ns() - t0
                self.calls[key] += 1
        return timed

    def patch(self, module_name: str, names) -> None:
        mod = importlib.import_module(module_name)
        tag = module_name.rsplit(".", 1)[-1]
        for name in names:
            if hasattr(mod, name):
                fn = getattr(mod, name)
                setattr(mod, name, self._timed(fn, f"{tag}.{name}"))
                self._undo.append((mod, name, fn))

    def patch_dict(self, d: dict, names, tag: str) -> None:
        for name in names:
            fn = d[name]
            d[name] = self._timed(fn, f"{tag}.{name}")
            self._undo.append((d, name, fn))

    def undo(self) -> None:
        for obj, name, fn in reversed(self._undo):
            if isinstance(obj, dict):
                obj[name] = fn
            else:
                setattr(obj, name, fn)
        self._undo.clear()


def breakdown(backend: str, B: int, T: int, calls: int, rounds: int = 5) -> str:
    """The host time of one eager fwd+bwd taken apart (see the module docstring): markdown tables."""
    import bench_linear_branch as bench

    from natsl.layers.linear import masked

    providers, call = bench.eager_pair(backend, {**bench.SHAPES["paper-340M"], "B": B}, T, 0.125)
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            times[p].append(host_us_per_call(lambda p=p: call(p), n=calls, wait_for_gpu=False))
    rows = [{"call": p, "host issue us/call (median)": statistics.median(t), "min": min(t), "max": max(t)}
            for p, t in times.items()]
    text = (f"## host issue time of one fwd+bwd, {backend} B={B} T={T} ({calls} calls x {rounds} rounds, "
            f"alternated)\n\n" + markdown_table(rows, ["call", "host issue us/call (median)", "min", "max"]))
    # each function's share: wrapped (a perf counter around each call), one provider at a time
    for p in providers:
        clock = _Clock()
        if p == "fla-plain":
            clock.patch(*PLAIN_LEAVES[backend])
        else:
            for mod, names in NATSL_LEAVES:
                clock.patch(mod, names)
            f = masked._fla()
            clock.patch_dict(f, [k for k, v in f.items() if callable(v) and not isinstance(v, types.ModuleType)],
                             "fla")
        try:
            call(p)
            torch.cuda.synchronize()
            clock.ns.clear()
            clock.calls.clear()
            total = host_us_per_call(lambda p=p: call(p), n=calls, wait_for_gpu=False)
        finally:
            clock.undo()
        n = calls + 1  # host_us_per_call makes one warm call before its clock
        leaf_rows = [{"function": k, "calls per fwd+bwd": clock.calls[k] / n, "host us per fwd+bwd": v / n / 1e3}
                     for k, v in sorted(clock.ns.items(), key=lambda kv: -kv[1])]
        inside = sum(r["host us per fwd+bwd"] for r in leaf_rows)
        leaf_rows.append({"function": "everything else (Python, aten, autograd)", "calls per fwd+bwd": "",
                          "host us per fwd+bwd": total - inside})
        leaf_rows.append({"function": "total (wrapped)", "calls per fwd+bwd": "", "host us per fwd+bwd": total})
        text += (f"\n\n### {p}: host time by function\n\n"
                 + markdown_table(leaf_rows, ["function", "calls per fwd+bwd", "host us per fwd+bwd"]))
    return text + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--breakdown", default=None, metavar="BACKEND:BxT",
                    help="also take one eager fwd+bwd of plain fla and of the branch apart on the host")
    ap.add_argument("--breakdown-calls", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    allow_fla_gated_backward_on_hopper()
    from fla.ops.common.chunk_h import chunk_fwd_h
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
        "fla chunk_fwd_h": lambda: chunk_fwd_h(k=k, v=v, g=gc, chunk_size=C),
        "natsl masked_write_fwd (k*m, gate cumsum)": lambda: masked_write_fwd(k, m, g, chunk_size=C),
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
    if args.out:
        Path(args.out).write_text(text)
    if args.breakdown:
        backend, case = args.breakdown.split(":")
        B, T = map(int, case.split("x"))
        text += "\n" + breakdown(backend, B, T, args.breakdown_calls)
        if args.out:
            Path(args.out).write_text(text)
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
