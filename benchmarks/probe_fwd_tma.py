"""Probe: the block-sparse softmax forward (prefill, issue 22) with Hopper TMA tile loads (host tensor descriptors)
against natsl's kernel (`natsl.kernels.block_attention.block_attn_fwd_kernel`), in one process.

The variant reads q/k/v tiles through `TensorDescriptor`s of the `[B*T, H*D]` views (one TMA copy per tile instead
of per-thread address arithmetic and masks) and the past key blocks' start rows from one precomputed list (one
indirection instead of two). It assumes full head dims (`D`, `DV` powers of two >= 16) and unpacked rows. Paper heads
(H_A=12, d=64, d_v=128, H_R=6, blocks of 64), 12.5% softmax blocks, bf16, random routing; checks the output against
the library kernel, then times both at num_warps x num_stages. Usage (H200):
    python3 benchmarks/probe_fwd_tma.py [--shapes 1x131072,1x65536,8x4096]
CPU check under the interpreter: TRITON_INTERPRET=1 python3 benchmarks/probe_fwd_tma.py --device cpu --shapes 1x256
"""

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import natsl.kernels.block_attention as ba
from natsl.kernels.block_attention import LOG2E, block_sparse_plan, online_softmax_update

H, HR, D, DV, C = 12, 6, 64, 128, 64


@triton.jit
def fwd_tma_kernel(q_desc, k_desc, v_desc, OUT, LSE, KSTART, LO, HI, BSTART, BLEN, sob, sot, soh, qk_scale, T, N,
                   H, HR, G, C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, OWN: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    i = N - 1 - pid // (tl.num_programs(0) // N)
    bh = pid % (tl.num_programs(0) // N)
    b, h = bh // H, bh % H
    r = h // G
    q0, qn = tl.load(BSTART + i), tl.load(BLEN + i)
    row = b * T + q0
    b_q = q_desc.load([row, h * D])
    m_i = tl.full([C], float("-inf"), tl.float32)
    l_i = tl.zeros([C], tl.float32)
    acc = tl.zeros([C, DV], tl.float32)
    meta = (b * N + i) * HR + r
    lo, hi = tl.load(LO + meta), tl.load(HI + meta)
    ks = KSTART + (b * HR + r) * N
    for j in range(lo, hi):
        k_row = b * T + tl.load(ks + j)
        b_s = tl.dot(b_q, tl.trans(k_desc.load([k_row, h * D])), input_precision=PREC) * qk_scale
        m_i, l_i, acc = online_softmax_update(b_s, v_desc.load([k_row, h * DV]), m_i, l_i, acc, PREC)
    if OWN:
        rows = tl.arange(0, C)
        b_s = tl.dot(b_q, tl.trans(k_desc.load([row, h * D])), input_precision=PREC) * qk_scale
        b_s = tl.where((rows[None, :] <= rows[:, None]) & (rows[None, :] < qn), b_s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(b_s, v_desc.load([row, h * DV]), m_i, l_i, acc, PREC)
    empty = l_i == 0.
    o = acc / tl.where(empty, 1., l_i)[:, None]
    rows = tl.arange(0, C)
    cols = tl.arange(0, DV)
    o_ptr = OUT + b.to(tl.int64) * sob + h * soh + (q0 + rows).to(tl.int64)[:, None] * sot + cols[None, :]
    tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=(rows < qn)[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1., l_i)))
    tl.store(LSE + bh.to(tl.int64) * T + q0 + rows, lse, mask=rows < qn)


def fwd_tma(q, k, v, plan, kstart, scale, num_warps, num_stages):
    B, T, Hq, Dq = q.shape
    N = plan["hi"].shape[1]
    o = torch.empty(B, T, Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    descs = [TensorDescriptor.from_tensor(x.view(B * T, -1), [C, x.shape[-1]]) for x in (q, k, v)]
    fwd_tma_kernel[(N * B * Hq,)](*descs, o, lse, kstart, plan["lo"], plan["hi"], plan["block_start"],
                                  plan["block_len"], *o.stride()[:3], scale * LOG2E, T, N, Hq, HR, Hq // HR, C=C,
                                  D=Dq, DV=v.shape[-1], OWN=True,
                                  PREC="ieee" if q.dtype == torch.float32 else "tf32",
                                  num_warps=num_warps, num_stages=num_stages)
    return o, lse


def inputs(B, T, device, dtype, frac=0.125, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = -(-T // C)
    soft = torch.zeros(B, N, HR, dtype=torch.bool)
    for b in range(B):
        for r in range(HR):
            soft[b, torch.randperm(N, generator=g)[:round(N * frac)], r] = True
    q, k = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g).to(device=device, dtype=dtype)
    start = torch.arange(N) * C
    first = torch.zeros(N, dtype=torch.bool)
    first[0] = True
    plan = block_sparse_plan(soft.to(device), first.to(device), start.to(device), (T - start).clamp(max=C).to(device), C)
    kstart = plan["block_start"][plan["idx"].long()].contiguous()  # [B, Hr, N] start row of each listed block
    return q, k, v, plan, kstart, soft


def pairs(soft, T):
    """Visible (query, key) pairs over heads: the own block causally plus the past softmax blocks."""
    N = soft.shape[1]
    blen = (T - torch.arange(N) * C).clamp(max=C)
    s = soft.cpu().long()
    before = torch.cumsum(s * blen[None, :, None], 1) - s * blen[None, :, None]
    return int((H // HR) * ((blen * (blen + 1) // 2)[None, :, None] + blen[None, :, None] * before).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x131072,1x65536,8x4096")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(n) for n in shape.split("x"))
        q, k, v, plan, kstart, soft = inputs(B, T, args.device, dtype)
        scale = D ** -0.5
        with torch.no_grad():
            o_ref, lse_ref = ba.block_attention_fwd(q, k, v, plan, scale, HR, True)
            o, lse = fwd_tma(q, k, v, plan, kstart, scale, 4, 2)
        err = (o.float() - o_ref.float()).abs().max().item()
        lerr = (lse - lse_ref).abs().max().item()
        print(f"B={B} T={T}: max |o - o_lib| {err:.3e}, max |lse - lse_lib| {lerr:.3e}", flush=True)
        if not cuda:
            continue
        flops = 2 * (D + DV) * pairs(soft, T) * B
        lib = triton.testing.do_bench(lambda: ba.block_attention_fwd(q, k, v, plan, scale, HR, True))
        rows.append((B, T, "library (w4 s2)", lib, flops / lib / 1e9))
        print(f"B={B} T={T} library: {lib:.3f} ms, {flops / lib / 1e9:.0f} TFLOP/s", flush=True)
        for nw, ns in itertools.product((4, 8), (2, 3, 4)):
            try:
                ms = triton.testing.do_bench(lambda: fwd_tma(q, k, v, plan, kstart, scale, nw, ns))
            except Exception as e:  # a config that does not compile (shared memory)
                print(f"B={B} T={T} tma w{nw} s{ns}: failed ({type(e).__name__})", flush=True)
                continue
            rows.append((B, T, f"tma w{nw} s{ns}", ms, flops / ms / 1e9))
            print(f"B={B} T={T} tma w{nw} s{ns}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    if rows:
        print("\n| B | T | kernel | ms | TFLOP/s |\n|---|---|---|---|---|")
        for B, T, name, ms, tf in rows:
            print(f"| {B} | {T} | {name} | {ms:.3f} | {tf:.0f} |")


if __name__ == "__main__":
    main()
