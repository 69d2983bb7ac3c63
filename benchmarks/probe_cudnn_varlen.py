"""Probe natsl's cuDNN varlen adapter (`CudnnVarlen`) on this GPU: exactness, shape-key cost, speed vs FA2.

    PYTHONPATH=$PWD python3 benchmarks/probe_cudnn_varlen.py

1. out / lse / dq / dk / dv of a few varlen cases (d_qk=72, d_v=128; causal and not; empty sequences) against a
   float64 dense reference, next to torch's flash-attention 2 varlen kernels (q/k padded to 128) in bf16.
2. The first call of a new shape key (cuDNN builds and caches an execution graph per key) vs a cached call.
3. do_bench of single fwd / bwd varlen calls of natsl-like shapes, cuDNN vs FA2.
"""
import time

import torch
from triton.testing import do_bench

from natsl.layers.softmax.flash import CudnnVarlen, TorchFlashVarlen, TorchVarlen

torch.manual_seed(0)
dev = "cuda"
H, D72, Dv = 12, 72, 128
KERNELS = {"cudnn": (CudnnVarlen(), D72), "fa2-pad128": (TorchFlashVarlen(), 128)}


def cu(lens):
    return torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)


def inputs(lq, lk, Dq, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(sum(lq), H, 64, generator=g, device=dev)
    k = torch.randn(sum(lk), H, 64, generator=g, device=dev)
    v = torch.randn(sum(lk), H, Dv, generator=g, device=dev)
    do = torch.randn(sum(lq), H, Dv, generator=g, device=dev)
    pad = lambda x: torch.nn.functional.pad(x, (0, Dq - 64))  # noqa: E731
    return pad(q), pad(k), v, do


def check(lq, lk, causal):
    print(f"case lq={lq} lk={lk} causal={causal}")
    cq, ck, scale = cu(lq), cu(lk), 0.125
    q, k, v, do = inputs(lq, lk, 64)
    ref = TorchVarlen(False)
    o_r, l_r = ref.fwd(q.double(), k.double(), v.double(), cq, ck, max(lq), max(lk), causal, scale)
    g_r = ref.bwd(do.double(), q.double(), k.double(), v.double(), o_r, l_r, cq, ck, max(lq), max(lk), causal, scale)
    for name, (kern, Dq) in KERNELS.items():
        qp, kp, v_, dop = (x.bfloat16() for x in inputs(lq, lk, Dq))
        try:
            o, lse = kern.fwd(qp, kp, v_, cq, ck, max(lq), max(lk), causal, scale)
            g = kern.bwd(dop, qp, kp, v_, o, lse.contiguous(), cq, ck, max(lq), max(lk), causal, scale)
        except Exception as e:
            print(f"   {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        fin = torch.isfinite(l_r)
        errs = [(o.double() - o_r).abs().max(), (lse.double()[fin] - l_r[fin]).abs().max(),
                *((a[..., :64 if i < 2 else Dv].double() - b[..., :64 if i < 2 else Dv]).abs().max()
                  for i, (a, b) in enumerate(zip(g, g_r)))]
        nan = any(not torch.isfinite(x).all() for x in (o, *g))
        print(f"   {name}: " + " ".join(f"{n} {e.item():.2e}" for n, e in zip(("o", "lse", "dq", "dk", "dv"), errs))
              + (" NON-FINITE" if nan else ""))


for args in [([64, 64, 32], [64, 64, 32], True), ([100, 7, 64], [256, 128, 64], False),
             ([128, 0, 64], [128, 192, 192], False), ([1, 64, 1], [64, 0, 640], False), ([300], [2000], False)]:
    check(*args)

print("first call of a new shape key vs cached (cudnn fwd+bwd, ms):")
kern = CudnnVarlen()
for n_seq, lq, lk in [(8, 256, 1024), (9, 256, 1024), (8, 300, 1024), (8, 256, 1500), (16, 300, 1500)]:
    q, k, v, do = (x.bfloat16() for x in inputs([lq] * n_seq, [lk] * n_seq, D72))
    cq, ck = cu([lq] * n_seq), cu([lk] * n_seq)

    def once():
        o, lse = kern.fwd(q, k, v, cq, ck, lq, lk, False, 0.125)
        kern.bwd(do, q, k, v, o, lse.contiguous(), cq, ck, lq, lk, False, 0.125)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    once()
    t1 = time.perf_counter()
    once()
    t2 = time.perf_counter()
    print(f"   seqs={n_seq} max_q={lq} max_k={lk}: first {1e3 * (t1 - t0):.1f}, second {1e3 * (t2 - t1):.2f}")


def bench(lq, lk, causal, label):
    cq, ck = cu(lq), cu(lk)
    row = []
    for name, (kern, Dq) in KERNELS.items():
        q, k, v, do = (x.bfloat16() for x in inputs(lq, lk, Dq))
        o, lse = kern.fwd(q, k, v, cq, ck, max(lq), max(lk), causal, 0.125)
        lse = lse.contiguous()
        f = lambda: kern.fwd(q, k, v, cq, ck, max(lq), max(lk), causal, 0.125)  # noqa: E731
        b = lambda: kern.bwd(do, q, k, v, o, lse, cq, ck, max(lq), max(lk), causal, 0.125)  # noqa: E731
        row.append(f"{name} fwd {do_bench(f):.3f} bwd {do_bench(b):.3f}")
    print(f"{label}: " + "  ".join(row) + " ms")


bench([64] * 1024, [64] * 1024, True, "diag: 1024 causal blocks of 64")
bench([4096] * 16, [8192] * 16, False, "16 x (4096 q, 8192 k)")
bench([1024] * 64, [2048] * 64, False, "64 x (1024 q, 2048 k)")
bench([16384], [16384], True, "one causal 16k")
