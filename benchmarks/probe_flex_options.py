"""Probe (issue 5): the `flex` softmax backend's Triton kernel options and where its time goes, on the H200.

    PYTHONPATH=$PWD python3 benchmarks/probe_flex_options.py [--T 65536] [--frac 0.125] [--variants NAME ...]

Every option set is a `FlexSoftmax(kernel_options=...)`, registered as a provider of `bench_softmax_backends.py`:
checked there against the float64 reference at T=4096 (outputs, q/k/v and routing gradients, 2x rule) before it is
timed (fwd no-grad with its host time, fwd+bwd with and without the router gradient) at `--T` next to dense causal
SDPA-cuDNN. A name ending in `+eager-plan` runs the backend's routing-derived tensors (`flex._plan`) eagerly instead
of compiled with static shapes (the backend's default on CUDA). Then `flex._plan` alone (eager, compiled) and
torch.profiler tables of the base options.
(The earlier probe of this design with a hand-built mask, `benchmarks/probe_flex_compact.py`, is at 29e19b0.)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_softmax_backends as bench  # noqa: E402

import natsl.layers.softmax.flex as fx  # noqa: E402
from natsl.layers.routing import Routing  # noqa: E402
from natsl.layers.softmax.flex import KERNEL_OPTIONS, FlexSoftmax, _static_compiled  # noqa: E402

FWD = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4}
VARIANTS = {
    "base": dict(KERNEL_OPTIONS),  # backward (64, 64, 64, 64), stages 3, warps 4
    # the options of natsl 29e19b0 (num_stages / num_warps shared by forward and backward)
    "natsl-29e19b0": {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4,
                      "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    # backward: torch's sm90 default (64, 128, 128, 64, stages 3, warps 8)
    "bwd-default": dict(FWD),
    "bwd-64-128-s2w8": {**FWD, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64,
                        "bwd_num_stages": 2, "bwd_num_warps": 8},
    "bwd-64-64-s2w4": {**FWD, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64,
                       "bwd_num_stages": 2, "bwd_num_warps": 4},
    "bwd-64-64-s4w4": {**FWD, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64,
                       "bwd_num_stages": 4, "bwd_num_warps": 4},
    "bwd-32-128-s3w4": {**FWD, "BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32,
                        "bwd_num_stages": 3, "bwd_num_warps": 4},
    "bwd-32-64-s3w4": {**FWD, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                       "bwd_num_stages": 3, "bwd_num_warps": 4},
    "fwd-128-64-s2w8": {**{k: v for k, v in KERNEL_OPTIONS.items() if not k.startswith("fwd_")},
                        "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8},
    "tma": {**KERNEL_OPTIONS, "USE_TMA": True},
    "no-tma-fwd": {**KERNEL_OPTIONS, "fwd_USE_TMA": False},
    "fwd-64-128-s2w4": {**KERNEL_OPTIONS, "fwd_BLOCK_N": 128},
    "fwd-64-64-s3w4": {**KERNEL_OPTIONS, "fwd_num_stages": 3},
}


def plan_time(w: torch.Tensor, T: int, compiled: bool) -> float:
    """ms (do_bench) of the backend's routing-derived tensors for one call (`flex._plan`: layout, tile lists both
    ways, gather rows; gate-gradient lists included), eager or compiled with static shapes."""
    import triton
    route = Routing(w, bench.SHAPE["block_size"])
    plan = _static_compiled(fx._plan) if compiled else fx._plan
    args = (*fx.routing_tensors(route, T), T, 128, bench.SHAPE["block_size"], bench.SHAPE["H"], True, True)
    return triton.testing.do_bench(lambda: plan(*args))


def host_ms(fn, n: int = 10) -> float:
    """Host time per call of `fn` without a sync in between (ms)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    ms = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--frac", type=float, default=0.125)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="option sets; a name ending in '+eager-plan' runs flex._plan eagerly")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    inp = bench.make_inputs(args.T, args.frac)
    dense = bench.measure(bench.make_inputs(args.T, 1.0), "dense-sdpa-cudnn")
    print(f"T={args.T} dense-sdpa-cudnn: fwd {dense['fwd ms'][0]:.2f} ms, fwd+bwd {dense['fwd+bwd ms'][0]:.2f} ms",
          flush=True)
    for name in args.variants:
        p = f"natsl-flex-{name}"
        opts = VARIANTS[name.removesuffix("+eager-plan")]
        bench.NATSL[p] = bench.NATSL[p + "-frozen"] = (lambda o: lambda: FlexSoftmax(kernel_options=o))(opts)
        bench.FROZEN_ROUTER.add(p + "-frozen")
        fx._compiled_plan_ok = not name.endswith("+eager-plan")
        t0 = time.time()
        try:
            err = bench.verify(p)
            if err is not None:
                print(f"{name}: FAILED the reference check: {err}", flush=True)
                continue
            r, rf = bench.measure(inp, p), bench.measure(inp, p + "-frozen")
            fwd, fb, fbf = r["fwd ms"][0], r["fwd+bwd ms"][0], rf["fwd+bwd ms"][0]
            host = host_ms(bench.setup(inp, p, False)[0])
            print(f"{name}: fwd {fwd:.2f} ms ({dense['fwd ms'][0] / fwd:.2f}x dense, host {host:.2f} ms), fwd+bwd "
                  f"{fb:.2f} ms ({dense['fwd+bwd ms'][0] / fb:.2f}x), router frozen {fbf:.2f} ms "
                  f"({dense['fwd+bwd ms'][0] / fbf:.2f}x), {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # an option set that does not compile is reported, not fatal
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], flush=True)
    fx._compiled_plan_ok = True
    if args.no_profile:
        return
    for compiled in (False, True):
        print(f"flex._plan alone ({'compiled' if compiled else 'eager'}): {plan_time(inp['w'], args.T, compiled):.3f} ms",
              flush=True)
    print(bench.profile("natsl-flex-base", inp, train=False), flush=True)
    print(bench.profile("natsl-flex-base", inp), flush=True)


if __name__ == "__main__":
    main()
