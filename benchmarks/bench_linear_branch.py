"""Benchmark: the NAtS-L linear branch (spec §3.2) against one plain fla call of the same backend.

Paper head config (H=6, K=128, V=256, block 64, bf16), (B, T) in {1 x 16k, 1 x 64k, 8 x 4k} (the issue's targets),
softmax-block fractions {12.5%} by default; no-grad fwd, fwd and fwd+bwd by `triton.testing.do_bench` in one
process, routing frozen and with the router gradient; first-call (compile + autotune) times; the top GPU kernels;
correctness-gated against the float64 reference first.

Run on the H200 (fla brought as wheels, see shared/gpu/README.md):
    python benchmarks/bench_linear_branch.py --backends gdn,mamba2 --out $OUT/bench_linear_branch.md

Harness opt-in (explicit, only here and in the GPU test): fla refuses its gated backward on Triton >= 3.4,
< 3.7.1 on Hopper (fla #640); the H200 image has Triton 3.6, so `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` is set
to True. The correctness gate below (and tests/gpu/test_linear_branch_gpu.py) compare every gradient with the
float64 reference, so timings are only printed for a backward that is right.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_softmax_backends as softmax_bench  # noqa: E402
from utils import (  # noqa: E402
    allow_fla_gated_backward_on_hopper,
    bench_graph_ms,
    bench_ms,
    env_line,
    host_us_per_call,
    markdown_table,
)

from natsl.layers.linear import TORCH_LINEAR_OPS  # noqa: E402
from natsl.layers.linear.branch import linear_branch  # noqa: E402
from natsl.layers.routing import Routing, routing_gates  # noqa: E402
from natsl.reference import linear_branch_reference  # noqa: E402

PROVIDERS = ["fla-plain", "natsl-branch", "natsl-branch-frozen-routing"]
SHAPES = {"paper-340M": dict(B=1, H=6, Hr=6, K=128, V=256, C=64)}
CASES = [(1, 16384), (1, 65536), (8, 4096)]
FRACTIONS = [0.125]
GATE = dict(T=256, atol=2e-3)
WALL_BLOCKS = 10  # --interleaved: the wall time per call is the median over this many alternated blocks


def make_inputs(backend, shape, T, frac, seed=0, device="cuda", dtype=torch.bfloat16):
    """Random bf16 inputs requiring grad and a routing with exactly `round(frac * N)` softmax blocks per
    (batch, router head)."""
    B, H, Hr, K, V, C = (shape[n] for n in ("B", "H", "Hr", "K", "V", "C"))
    gn = torch.Generator(device=device).manual_seed(seed)
    x = dict(q=F.normalize(torch.randn(B, T, H, K, generator=gn, device=device), dim=-1),
             k=F.normalize(torch.randn(B, T, H, K, generator=gn, device=device), dim=-1),
             v=torch.randn(B, T, H, V, generator=gn, device=device))
    if backend in ("gdn", "mamba2"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, generator=gn, device=device) + 3)
    if backend == "gla":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, K, generator=gn, device=device) + 3) / 4
    if backend in ("gdn", "deltanet"):
        x["beta"] = torch.rand(B, T, H, generator=gn, device=device).sigmoid()
    x = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    N = -(-T // C)
    n_soft = round(frac * N)
    scores = torch.rand(B, N, Hr, generator=gn, device=device)
    soft = torch.zeros(B, N, Hr, dtype=torch.bool, device=device)
    if n_soft:
        soft.scatter_(1, scores.topk(n_soft, dim=1).indices, True)
    routing = torch.stack([soft, ~soft], -1).float()
    return x, routing


def setup(backend, shape, T, frac, provider, mode):
    """`fn()` running `provider` once (`mode` "inference" (fwd under `torch.no_grad()`), "fwd" (inputs requiring
    grad) or "fwd+bwd"), and the tensors whose grads to reset."""
    x, routing = make_inputs(backend, shape, T, frac)
    C = shape["C"]
    do = torch.randn(shape["B"], T, shape["H"], shape["V"], device="cuda", dtype=torch.bfloat16)
    if provider == "fla-plain":
        from natsl.layers.linear.fla_ops import FLA_LINEAR_OPS

        op = FLA_LINEAR_OPS[backend]

        def fwd():
            return op(x["q"], x["k"], x["v"], x.get("g"), x.get("beta"))[0]
        leaves = list(x.values())
    else:
        r = routing.requires_grad_(provider == "natsl-branch")

        def fwd():  # a new Routing per call, as in a layer
            return linear_branch(x["q"], x["k"], x["v"], Routing(r, C), backend=backend, g=x.get("g"),
                                 beta=x.get("beta"), impl="fla")[0]
        leaves = list(x.values()) + ([r] if r.requires_grad else [])
    if mode == "fwd":
        return fwd, leaves
    if mode == "inference":
        def inference():
            with torch.no_grad():
                return fwd()
        return inference, leaves

    def fn():
        fwd().backward(do)
    return fn, leaves


def correctness_gate(backend, shape) -> tuple[bool, str]:
    """natsl (bf16, fla) vs the float64 reference at small T, with the rule of the GPU test."""
    from natsl.layers.linear.fla_ops import FLA_LINEAR_OPS

    T = GATE["T"]
    x, routing = make_inputs(backend, shape, T, 0.25, seed=1)
    B, H, V, K, C = shape["B"], shape["H"], shape["V"], shape["K"], shape["C"]
    cot = torch.randn(B, T, H, V, device="cuda")

    def grads(o, leaves):
        return torch.autograd.grad((o.float() * cot).sum(), leaves)

    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    r64 = routing.double().requires_grad_()
    _, gate = routing_gates(r64)
    o_ref, _ = linear_branch_reference(x64["q"], x64["k"], x64["v"], x64.get("g"), x64.get("beta"), Routing(r64, C),
                                       gate, backend=backend, scale=K ** -0.5, decay_through_softmax=True)
    ref = [o_ref, *grads(o_ref, [*x64.values(), r64])]
    r = routing.clone().requires_grad_()
    o, _ = linear_branch(x["q"], x["k"], x["v"], Routing(r, C), backend=backend, g=x.get("g"), beta=x.get("beta"),
                         impl="fla")
    got = [o, *grads(o, [*x.values(), r])]
    ob, _ = FLA_LINEAR_OPS[backend](x["q"], x["k"], x["v"], x.get("g"), x.get("beta"))
    o64, _ = TORCH_LINEAR_OPS[backend](x64["q"], x64["k"], x64["v"], x64.get("g"), x64.get("beta"))
    base = [ob, *grads(ob, list(x.values()))]
    base_ref = [o64, *grads(o64, list(x64.values()))]
    base_err = [(a.double() - b.double()).abs().max().item() for a, b in zip(base, base_ref)]
    base_err.append(max(base_err[1:]))  # routing: no plain counterpart
    names = ["o", *[f"d{n}" for n in x], "drouting"]
    lines, ok = [], True
    for n, a, b, e0 in zip(names, got, ref, base_err):
        err = (a.double() - b.double()).abs().max().item()
        bound = 2 * e0 + GATE["atol"] * max(1.0, b.abs().max().item())
        ok &= err <= bound
        lines.append(f"{n}: {err:.2e} (plain {e0:.2e}, bound {bound:.2e})")
    return ok, "; ".join(lines)


def first_call_s(backend, shape, provider, T=1024) -> float:
    fn, _ = setup(backend, shape, T, 0.25, provider, "fwd+bwd")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _profile(backend, shape, T, frac, provider, activity):
    """`key_averages()` of one profiled fwd+bwd of `provider` (after one warm call)."""
    fn, _ = setup(backend, shape, T, frac, provider, "fwd+bwd")
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def profile_table(backend, shape, T, frac, provider="natsl-branch", top=15) -> str:
    """The `top` GPU kernels (by total device time) of one fwd+bwd of the branch, and the sum over all kernels."""
    events = [e for e in _profile(backend, shape, T, frac, provider, torch.profiler.ProfilerActivity.CUDA)
              if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = [{"kernel": e.key[:70], "calls": e.count, "ms": e.device_time_total / 1e3}
            for e in sorted(events, key=lambda e: -e.device_time_total)[:top]]
    total = sum(e.self_device_time_total for e in events) / 1e3
    return markdown_table(rows, ["kernel", "calls", "ms"]) + f"\nsum of all GPU kernels: {total:.2f} ms"


def host_rows(backend, shape, T, frac) -> list[dict]:
    """Host issue time per fwd+bwd call (no wait for the GPU) and wall time per call, plain fla vs the branch."""
    rows = []
    for p in PROVIDERS:
        fn = setup(backend, shape, T, frac, p, "fwd+bwd")[0]
        rows.append({"provider": p, "host issue us/call": host_us_per_call(fn, 50, wait_for_gpu=False),
                     "wall us/call": host_us_per_call(fn, 50)})
    return rows


def cpu_profile_table(backend, shape, T, frac, provider="natsl-branch", top=25) -> str:
    """The `top` host-side ops (self CPU time) of one fwd+bwd: where the launch overhead goes."""
    events = _profile(backend, shape, T, frac, provider, torch.profiler.ProfilerActivity.CPU)
    rows = [{"op": e.key[:70], "calls": e.count, "self CPU us": e.self_cpu_time_total}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return markdown_table(rows, ["op", "calls", "self CPU us"])


def op_setup(backend, shape, T, frac, provider, train=False):
    """fwd+bwd of the whole op with the `flex` softmax branch (routing frozen, or with its gradient if `train`):
    `"op"` (`natsl.natsl_attention`) or `"softmax-only"` (the softmax branch alone)."""
    from natsl import natsl_attention
    from natsl.layers.softmax import softmax_branch

    x, routing = make_inputs(backend, shape, T, frac)
    routing.requires_grad_(train)
    s = softmax_bench.make_inputs(T, frac, seed=1)  # the softmax branch's paper heads; its own routing is unused
    qs, ks, vs = (s[n].requires_grad_() for n in ("q", "k", "v"))
    do_s = s["do"]
    do_l = torch.randn(shape["B"], T, shape["H"], shape["V"], device="cuda", dtype=torch.bfloat16)
    C, lin = shape["C"], dict(g=x.get("g"), beta=x.get("beta"))

    def fn():
        if provider == "op":
            o_s, o_l, _ = natsl_attention(qs, ks, vs, x["q"], x["k"], x["v"], routing, linear_backend=backend,
                                          block_size=C, softmax_backend="flex", linear_impl="fla", **lin)
        else:
            softmax_branch(qs, ks, vs, Routing(routing, C), backend="flex").backward(do_s)
            return
        torch.autograd.backward([o_s, o_l], [do_s, do_l])
    return fn


def op_rows(backend, shape, T, frac) -> list[dict]:
    """The linear branch's cost inside the op: op fwd+bwd minus the softmax branch alone, against one plain fla call;
    routing frozen and with the router gradient."""
    plain = bench_ms(setup(backend, shape, T, 0.0, "fla-plain", "fwd+bwd")[0])[0]
    rows = []
    for train in (False, True):
        ms = {p: bench_ms(op_setup(backend, shape, T, frac, p, train))[0]
              for p in ("softmax-only", "op")}
        rows += [{"T": T, "softmax": f"{frac:.1%}", "routing": "train" if train else "frozen", "variant": p,
                  "plain fla fwd+bwd": plain, "softmax branch alone": ms["softmax-only"], "op fwd+bwd": ms[p],
                  "op − softmax": ms[p] - ms["softmax-only"],
                  "(op − softmax) / plain": (ms[p] - ms["softmax-only"]) / plain} for p in ("op",)]
    return rows


def eager_pair(backend, shape, T, frac, warm=3):
    """`(providers, call)`: plain fla (no routing) and the branch with the router gradient (`frac` softmax blocks),
    fwd+bwd; `call(provider)` resets the leaves' grads and runs one. Each is called `warm` times first (fla tunes
    at the case itself)."""
    fns = {p: setup(backend, shape, T, 0.0 if p == "fla-plain" else frac, p, "fwd+bwd")
           for p in ("fla-plain", "natsl-branch")}

    def call(p):
        fn, leaves = fns[p]
        for t in leaves:
            t.grad = None
        fn()
    for p in fns:
        for _ in range(warm):
            call(p)
    return tuple(fns), call


def interleaved_rows(backend, shape, cases, frac, reps) -> list[dict]:
    """Eager fwd+bwd of plain fla and of the branch with the router gradient, alternated call by call (`reps` each,
    the order swapped every pair) so that both see the same host and GPU conditions; no L2 flush, no sync between
    calls. The first calls run at the case itself (fla tunes there). Per provider: the median of the CUDA-event time
    of each call (when the host cannot keep ahead this is its issue time) and the wall time per call of back-to-back
    calls: the median over `WALL_BLOCKS` blocks of `reps // WALL_BLOCKS` calls, the providers' blocks alternated (one
    long loop per provider drifted by up to ±0.15× between the two loops where the call is host-bound, session 31)."""
    rows = []
    for B, T in cases:
        providers, call = eager_pair(backend, {**shape, "B": B}, T, frac)
        torch.cuda.synchronize()
        events = {p: [] for p in providers}
        for i in range(reps):
            for p in (("fla-plain", "natsl-branch") if i % 2 == 0 else ("natsl-branch", "fla-plain")):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(p)
                end.record()
                events[p].append((start, end))
        torch.cuda.synchronize()
        med = {p: sorted(s.elapsed_time(e) for s, e in ev)[reps // 2] for p, ev in events.items()}
        blocks = {p: [] for p in providers}
        for i in range(WALL_BLOCKS):
            for p in (providers if i % 2 == 0 else providers[::-1]):
                blocks[p].append(host_us_per_call(lambda p=p: call(p), n=max(1, reps // WALL_BLOCKS)) / 1e3)
        wall = {p: statistics.median(b) for p, b in blocks.items()}
        rows.append({"B": B, "T": T, "softmax": f"{frac:.1%}", "plain (events)": med["fla-plain"],
                     "train (events)": med["natsl-branch"],
                     "train / plain (events)": med["natsl-branch"] / med["fla-plain"],
                     "plain (wall/call)": wall["fla-plain"], "train (wall/call)": wall["natsl-branch"],
                     "train / plain (wall)": wall["natsl-branch"] / wall["fla-plain"]})
        print(rows[-1], flush=True)  # noqa: T201
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="gdn,mamba2")
    ap.add_argument("--cases", default=",".join(f"{b}x{t}" for b, t in CASES), help="BxT, comma-separated")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--profile", action="store_true", help="top GPU kernels of one fwd+bwd at the largest case")
    ap.add_argument("--host", action="store_true", help="host time per call and a CPU profile at the smallest case")
    ap.add_argument("--op", action="store_true",
                    help="also time the whole op (flex softmax branch + this branch) at B=1: the branch's cost inside it")
    ap.add_argument("--interleaved", type=int, default=0, metavar="N",
                    help="only the eager fwd+bwd of plain fla and the branch (router gradient on), N calls each, "
                         "alternated (no correctness gate, no first-call rows: the GPU tests hold the gradients)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    allow_fla_gated_backward_on_hopper()
    shape_name, shape = next(iter(SHAPES.items()))
    report = [f"# bench_linear_branch ({env_line()})", f"shape {shape_name}: {shape}, bf16", ""]

    def emit(line=""):
        print(line, flush=True)  # noqa: T201
        report.append(line)
        if args.out:
            Path(args.out).write_text("\n".join(report) + "\n")

    cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    for backend in args.backends.split(","):
        if args.interleaved:
            emit(f"## {backend}: eager fwd+bwd, plain fla and the branch alternated, {args.interleaved} calls each")
            for frac in map(float, args.fractions.split(",")):
                emit(markdown_table(interleaved_rows(backend, shape, cases, frac, args.interleaved),
                                    ["B", "T", "softmax", "plain (events)", "train (events)", "train / plain (events)",
                                     "plain (wall/call)", "train (wall/call)", "train / plain (wall)"]))
            continue
        compile_rows = [{"provider": p, "first fwd+bwd call at T=1024 (s)": first_call_s(backend, shape, p)}
                        for p in PROVIDERS[:2]]
        ok, msg = correctness_gate(backend, shape)
        emit(f"## {backend}: correctness gate at T={GATE['T']} vs float64 reference: {'PASS' if ok else 'FAIL'}")
        emit(msg)
        emit(markdown_table(compile_rows, ["provider", "first fwd+bwd call at T=1024 (s)"]))
        if not ok:
            emit("correctness gate failed: no timings")
            continue
        rows = []
        for (B, T), frac in itertools.product(cases, map(float, args.fractions.split(","))):
            sh = {**shape, "B": B}
            plain = {m: bench_ms(setup(backend, sh, T, 0.0, "fla-plain", m)[0])[0] for m in ("inference", "fwd", "fwd+bwd")}
            row = {"B": B, "T": T, "softmax": f"{frac:.1%}", "plain no-grad fwd": plain["inference"],
                   "no-grad fwd": bench_ms(setup(backend, sh, T, frac, "natsl-branch", "inference")[0])[0],
                   "plain fwd": plain["fwd"], "plain fwd+bwd": plain["fwd+bwd"]}
            for p, tag in (("natsl-branch-frozen-routing", "frozen"), ("natsl-branch", "train")):
                for m in ("fwd", "fwd+bwd"):
                    row[f"{tag} {m}"] = bench_ms(setup(backend, sh, T, frac, p, m)[0])[0]
            row["frozen fwd+bwd / plain"] = row["frozen fwd+bwd"] / plain["fwd+bwd"]
            row["train fwd+bwd / plain"] = row["train fwd+bwd"] / plain["fwd+bwd"]
            # the GPU's work alone: one CUDA-graph replay of the whole fwd+bwd (no host launch overhead)
            try:
                g_plain = bench_graph_ms(setup(backend, sh, T, 0.0, "fla-plain", "fwd+bwd")[0])[0]
                g_train = bench_graph_ms(setup(backend, sh, T, frac, "natsl-branch", "fwd+bwd")[0])[0]
                row.update({"graphed plain fwd+bwd": g_plain, "graphed train fwd+bwd": g_train,
                            "graphed train / plain": g_train / g_plain})
            except Exception as e:  # noqa: BLE001 (report, keep the eager rows)
                row["graphed train / plain"] = f"capture failed: {type(e).__name__}"
            for p, tag in (("fla-plain", "plain"), ("natsl-branch", "train")):
                fn = setup(backend, sh, T, frac, p, "fwd+bwd")[0]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                row[f"peak MiB ({tag})"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            print(row, flush=True)  # noqa: T201
        emit(markdown_table(rows, ["B", "T", "softmax", "plain no-grad fwd", "no-grad fwd", "plain fwd", "plain fwd+bwd",
                                   "frozen fwd", "frozen fwd+bwd", "train fwd", "train fwd+bwd",
                                   "frozen fwd+bwd / plain", "train fwd+bwd / plain", "graphed plain fwd+bwd",
                                   "graphed train fwd+bwd", "graphed train / plain", "peak MiB (plain)",
                                   "peak MiB (train)"]))
        if args.op:
            op_tab = [r for (B, T) in cases if B == 1 for frac in map(float, args.fractions.split(","))
                      for r in op_rows(backend, shape, T, frac)]
            emit(f"whole op, flex softmax branch (heads {softmax_bench.SHAPE}), ms:")
            emit(markdown_table(op_tab, ["T", "softmax", "routing", "variant", "plain fla fwd+bwd",
                                         "softmax branch alone", "op fwd+bwd", "op − softmax", "(op − softmax) / plain"]))
        if args.host:
            B, T = min(cases, key=lambda c: c[0] * c[1])
            emit(f"\nhost time per fwd+bwd at B={B}, T={T}:")
            emit(markdown_table(host_rows(backend, {**shape, "B": B}, T, 0.125),
                                ["provider", "host issue us/call", "wall us/call"]))
            for p in ("fla-plain", "natsl-branch"):
                emit(f"\nhost ops of one fwd+bwd ({p}) at B={B}, T={T}:")
                emit(cpu_profile_table(backend, {**shape, "B": B}, T, 0.125, p))
        if args.profile:
            B, T = max(cases, key=lambda c: c[0] * c[1])
            for p in ("fla-plain", "natsl-branch"):  # side by side: what the branch adds, kernel by kernel
                emit(f"\ntop GPU kernels of one training fwd+bwd ({p}) at B={B}, T={T}, 12.5% softmax blocks "
                     f"(torch.profiler):")
                emit(profile_table(backend, {**shape, "B": B}, T, 0.125 if p != "fla-plain" else 0.0, p))
        emit()


if __name__ == "__main__":
    main()
