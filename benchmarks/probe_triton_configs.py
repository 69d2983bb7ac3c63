"""Launch configurations of natsl's block-sparse softmax kernels (`natsl.kernels.block_attention.CONFIGS`).

For the forward, dq and dk/dv kernels in turn (each keeping the best of the ones before), times the `triton`
softmax backend (forward under no_grad for the forward kernel, forward+backward with the router gradient for the
others) at num_warps in (4, 8) × num_stages in (1, 2, 3). Paper heads (H_A=12, d=64, d_v=128, H_R=6, blocks of
64), 12.5% softmax blocks, bf16, at B=1 × 64k and B=8 × 4k. Usage (GPU): python3 benchmarks/probe_triton_configs.py
"""

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


def main():
    impl = SOFTMAX_BACKENDS["triton"]
    for B, T in [(1, 65536), (8, 4096)]:
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

        for kind in ("fwd", "dq", "dkdv"):
            best = None
            for nw, ns in itertools.product((4, 8), (1, 2, 3)):
                ba.CONFIGS[kind] = dict(num_warps=nw, num_stages=ns)
                ms = triton.testing.do_bench(fwd if kind == "fwd" else fwd_bwd, grad_to_none=[q, k, v, w])
                print(f"B={B} T={T} {kind} w{nw} s{ns}: {ms:.3f} ms", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, nw, ns)
            ba.CONFIGS[kind] = dict(num_warps=best[1], num_stages=best[2])
            print(f"BEST B={B} T={T} {kind}: {best}", flush=True)
        ms = triton.testing.do_bench(fwd_bwd, grad_to_none=[q, k, v, w])
        print(f"B={B} T={T} fwd+bwd with the best configurations: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
