"""Launch configurations of natsl's block-sparse softmax kernels (`natsl.kernels.block_attention.CONFIGS`).

For the kernels in turn (each keeping the best of the ones before), times the `triton` softmax backend (forward
under no_grad for the forward kernel, forward+backward with the router gradient for the others) at the given num_warps
(default 4, 8) × num_stages. Paper heads (H_A=12, d=64, d_v=128, H_R=6, blocks of 64), 12.5% softmax blocks,
bf16. Usage (GPU):
    python3 benchmarks/probe_triton_configs.py [--shapes 1x65536,8x4096] [--kinds fwd,dq,dkdv] [--stages 1,2,3]
        [--warps 4,8] [--descriptors] [--orders]
`--descriptors`: every configuration of a kernel with its tiles read through pointers and through tensor descriptors
(TMA; `block_attention.DESCRIPTORS`), the faster kept for the kernels after it; without it, the path
`DESCRIPTORS` gives at each length. `--orders`: every configuration with block-major and (batch, head)-major
program order (`block_attention.HEAD_MAJOR`), the faster kept.
"""

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_softmax_backends import SHAPE, make_inputs  # noqa: E402

import natsl.kernels.block_attention as ba  # noqa: E402
from natsl.layers.routing import Routing  # noqa: E402
from natsl.layers.softmax import SOFTMAX_BACKENDS  # noqa: E402

KINDS = ("fwd", "dq", "dkdv")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x65536,8x4096", help="comma-separated BxT")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {KINDS}")
    ap.add_argument("--stages", default="1,2,3", help="num_stages to try (comma-separated)")
    ap.add_argument("--warps", default="4,8", help="num_warps to try (comma-separated)")
    ap.add_argument("--orders", action="store_true", help="also try each kernel in (batch, head)-major order")
    ap.add_argument("--descriptors", action="store_true", help="also try each kernel with tensor-descriptor loads")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        raise SystemExit(f"--kinds must be of {KINDS}, got {args.kinds}")
    stages = [int(s) for s in args.stages.split(",")]
    warps = [int(s) for s in args.warps.split(",")]
    impl = SOFTMAX_BACKENDS["triton"]
    lengths, orders0 = dict(ba.DESCRIPTORS), dict(ba.HEAD_MAJOR)
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        ba.DESCRIPTORS.update(lengths)  # each shape starts from the library's choices
        ba.HEAD_MAJOR.update(orders0)
        SHAPE["B"] = B
        inp = make_inputs(T, 0.125)
        q, k, v, w = (inp[x].detach().requires_grad_() for x in ("q", "k", "v", "w"))
        route = Routing(w, SHAPE["block_size"])
        scale = SHAPE["d"] ** -0.5

        def fwd():
            with torch.no_grad():
                return impl.forward(q, k, v, route, scale=scale)

        def fwd_bwd():
            impl.forward(q, k, v, route, scale=scale).backward(inp["do"])

        for kind in kinds:
            best = None
            default = ba.DESCRIPTORS[kind] is not None and ba.DESCRIPTORS[kind] <= T
            descs = (False, True) if args.descriptors else (default,)
            orders = (False, True) if args.orders else (ba.HEAD_MAJOR[kind],)
            for nw, ns, desc, head_major in itertools.product(warps, stages, descs, orders):
                ba.CONFIGS[kind, desc] = dict(num_warps=nw, num_stages=ns)
                ba.DESCRIPTORS[kind] = 0 if desc else None
                ba.HEAD_MAJOR[kind] = head_major
                ms = triton.testing.do_bench(fwd if kind == "fwd" else fwd_bwd, grad_to_none=[q, k, v, w])
                print(f"B={B} T={T} {kind} w{nw} s{ns}{' tma' if desc else ''}{' head-major' if head_major else ''}: "
                      f"{ms:.3f} ms", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, nw, ns, desc, head_major)
            ba.CONFIGS[kind, best[3]] = dict(num_warps=best[1], num_stages=best[2])
            ba.DESCRIPTORS[kind], ba.HEAD_MAJOR[kind] = (0 if best[3] else None), best[4]
            print(f"BEST B={B} T={T} {kind}: {best}", flush=True)
        if any(kind != "fwd" for kind in kinds):
            ms = triton.testing.do_bench(fwd_bwd, grad_to_none=[q, k, v, w])
            print(f"B={B} T={T} fwd+bwd with the best configurations: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
