"""Probe cuDNN's ragged (varlen) attention through torch as a natsl varlen kernel: exactness, per-call cost, speed.

    PYTHONPATH=$PWD python3 benchmarks/probe_cudnn_varlen.py

`CudnnVarlen` below has natsl's varlen-kernel interface (`natsl.layers.softmax.flash`), so it can be tried as
`FlashSoftmax(kernel=CudnnVarlen())`. It is not part of natsl: on the H200 (torch 2.11.0+cu130, cuDNN 9.19) its
backward gave wrong dq/dk whenever q and k lengths differ, its forward returned NaN next to an empty sequence, and
every call took 50-180 ms (benchmarks/RESULTS.md, "Softmax branch: cuDNN ragged kernels"). Run this again on a newer
torch / cuDNN before reconsidering it.

1. out / lse / dq / dk / dv of a few varlen cases (d_qk=72, d_v=128; causal and not; empty sequences) against a
   float64 dense reference, next to torch's flash-attention 2 varlen kernels (q/k padded to 128) in bf16.
2. The first call of a new shape key (cuDNN builds and caches an execution graph per key) vs a cached call.
3. do_bench of single fwd / bwd varlen calls of natsl-like shapes, cuDNN vs FA2.
"""
import time

import torch
from triton.testing import do_bench

from natsl.layers.softmax.flash import TorchFlashVarlen, TorchVarlen

_HAS_CUDNN_VARLEN = hasattr(torch.ops.aten, "_cudnn_attention_forward") and \
    hasattr(torch.ops.aten, "_cudnn_attention_backward")
CUDNN_MIN_VERSION = 90000  # ragged (varlen) fused attention; verified with cuDNN 9.19 on the H200 (sm90)


def _bucket(n: int) -> int:
    """`n` rounded up to a power of two (at least 64): fewer distinct cuDNN graphs across routings."""
    return max(64, 1 << (max(int(n), 1) - 1).bit_length())


class CudnnVarlen:
    """cuDNN's fused attention over ragged sequences (`aten._cudnn_attention_forward/backward` with
    `cum_seq_q/k`, the kernels under SDPA-cuDNN on nested tensors), fp16/bf16 on sm80+.

    Unlike flash-attn 2 it takes `Dq != Dv` (any multiple of 8 up to 256), so q/k are not padded to `d_v`. cuDNN
    builds one execution graph per shape key (batch of sequences, maximum lengths, heads, dims) and caches it: the
    maximum lengths passed to it are rounded up to powers of two so that routings with similar shapes share graphs.
    Its LSE comes as `[Tq, H, 1]`; the adapter converts to and from the interface's `[H, Tq]`.
    """

    name = "cudnn"
    equal_head_dims = False

    def __init__(self, bucket: bool = True):
        self.bucket = bucket

    def _max(self, n: int) -> int:
        return _bucket(n) if self.bucket else int(n)

    def reasons(self, device: torch.device, dtype: torch.dtype, needs_grad: bool = False) -> list[str]:
        out = []
        if device.type != "cuda":
            out.append("cuDNN attention needs a CUDA device")
        elif torch.cuda.get_device_capability(device) < (8, 0):
            out.append("cuDNN attention needs compute capability >= 8.0")
        if not _HAS_CUDNN_VARLEN:
            out.append(f"torch {torch.__version__} has no ragged cuDNN attention ops (aten._cudnn_attention_forward)")
        elif device.type == "cuda":
            if not torch.backends.cudnn.is_available():
                out.append("this torch build has no cuDNN")
            elif (torch.backends.cudnn.version() or 0) < CUDNN_MIN_VERSION:
                out.append(f"ragged cuDNN attention needs cuDNN >= 9.0, found {torch.backends.cudnn.version()}")
        if dtype not in (torch.float16, torch.bfloat16):
            out.append(f"cuDNN attention needs float16/bfloat16 inputs, got {dtype}")
        return out

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, self._max(max_q), self._max(max_k), True,
                                                      0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        if lse.numel() != q.shape[0] * q.shape[1]:
            raise RuntimeError(f"torch {torch.__version__}: unexpected cuDNN varlen LSE shape {tuple(lse.shape)}, "
                               f"want [total_q, H, 1] = {[q.shape[0], q.shape[1], 1]}")
        return out, lse.view(q.shape[0], q.shape[1]).T

    def bwd(self, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: the philox state is unused
        lse_c = lse.T.contiguous().unsqueeze(-1)  # [Tq, H, 1]
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(do.contiguous(), q, k, v, out.contiguous(), lse_c, seed,
                                                              seed, None, cu_q, cu_k, self._max(max_q), self._max(max_k),
                                                              0.0, causal, scale=scale)
        return dq, dk, dv


torch.manual_seed(0)
dev = "cuda"
H, D72, Dv = 12, 72, 128
KERNELS = {"cudnn": (CudnnVarlen(), D72), "cudnn-exact-max": (CudnnVarlen(bucket=False), D72),
           "fa2-pad128": (TorchFlashVarlen(), 128)}


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

print("first call of a new shape key vs cached (cudnn fwd+bwd, exact maxima, ms):")
kern = CudnnVarlen(bucket=False)
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
