"""Host-side cost of the linear branch on the CPU: natsl's masked chunk pass against one plain fla call, with every
Triton launch turned into a no-op, so what is timed is the Python and PyTorch dispatch work around the kernels (the
part that bounds an eager call below ~32k tokens on the GPU, RESULTS "Linear branch"). A proxy to compare host
changes without a GPU; the GPU's own launch cost per kernel is not in it (`bench_linear_branch.py --interleaved`
measures the real thing on the H200).

    python benchmarks/host_ops_cpu.py --backends gdn,mamba2

Prints per backend: µs per fwd+bwd (median of 3 rounds of `--calls`), natsl − plain, and the aten ops natsl
dispatches beyond plain fla (views included).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # fla's kernels need a Triton backend; they never run below
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from interpreter_shims import apply_interpreter_shims  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

apply_interpreter_shims()
import bench_linear_branch as bench  # noqa: E402

from natsl.layers.linear.branch import linear_branch  # noqa: E402
from natsl.layers.linear.fla_ops import FLA_LINEAR_OPS  # noqa: E402
from natsl.layers.routing import Routing  # noqa: E402


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def calls(backend: str, T: int = 128):
    """`(plain, natsl, leaves)`: one fwd+bwd of plain fla and of the branch (router gradient on, 50% softmax)."""
    shape = dict(B=1, H=2, Hr=2, K=32, V=32, C=64)
    x, routing = bench.make_inputs(backend, shape, T, 0.5, device="cpu", dtype=torch.bfloat16)
    do = torch.randn(1, T, 2, 32, dtype=torch.bfloat16)
    r = routing.requires_grad_()

    def plain():
        FLA_LINEAR_OPS[backend](x["q"], x["k"], x["v"], x.get("g"), x.get("beta"))[0].backward(do)

    def natsl():
        linear_branch(x["q"], x["k"], x["v"], Routing(r, 64), backend=backend, g=x.get("g"), beta=x.get("beta"),
                      impl="fla")[0].backward(do)
    return plain, natsl, [*x.values(), r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="gdn,mamba2")
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = interpreter.InterpretedFunction.run
    for backend in args.backends.split(","):
        plain, natsl, leaves = calls(backend)
        interpreter.InterpretedFunction.run = run
        for fn in (plain, natsl):  # interpreted once: fla's autotuner picks its (first) config
            fn()
        interpreter.InterpretedFunction.run = lambda self, *a, **k: None
        ops = {}
        for fn in (plain, natsl):
            with _CountOps() as mode:
                fn()
            ops[fn.__name__] = mode.ops
        us = collections.defaultdict(list)
        for _ in range(3):
            for fn in (plain, natsl):
                for _ in range(20):
                    fn()
                start = time.perf_counter()
                for _ in range(args.calls):
                    for t in leaves:
                        t.grad = None
                    fn()
                us[fn.__name__].append((time.perf_counter() - start) / args.calls * 1e6)
        med = {n: sorted(v)[1] for n, v in us.items()}
        extra = ops["natsl"] - ops["plain"]
        print(f"{backend}: plain {med['plain']:.0f} us, natsl {med['natsl']:.0f} us per fwd+bwd "  # noqa: T201
              f"(+{med['natsl'] - med['plain']:.0f}); aten ops beyond plain: {dict(extra)}")
    interpreter.InterpretedFunction.run = run


if __name__ == "__main__":
    main()
