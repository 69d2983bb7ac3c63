"""Split-KV attention read of decode steps (flash-decoding style) over per-head K/V row buffers (spec §1.8).

A decode step's query `t` of head `h` attends to rows `[0, limit[b, h, t])` of `k_rows[b, h]` / `v_rows[b, h]`
(the committed softmax rows of its router head, then its block so far; or a softmax layer's whole past). At batch
1 a kernel with one program per (batch, head) reads the whole context serially; here the rows are split into
`num_splits` ranges, one program per (range, batch, head) computes a partial output and its log-sum-exp for all
`T` queries, and a second kernel merges the ranges (`o = Σ_s exp(lse_s − lse) o_s`), one program per query.
Lengths are read on the device: no host sync, and one launch configuration per buffer capacity, so a captured
decode step (CUDA graph) replays it at every length. Ranges past a query's limit contribute nothing. PyTorch twin
(test oracle and default path): `natsl.layers.state.attend_rows` with `impl="sdpa"`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from natsl.kernels.block_attention import LOG2E, online_softmax_update

BLOCK_N = 64


@triton.jit
def decode_attn_split_kernel(Q, K, V, LIMIT, OUT, LSE, sqb, sqt, sqh, skb, skh, skr, svb, svh, svr, T, H, R, D, DV,
                             qk_scale, SPLIT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                             BN: tl.constexpr, PREC: tl.constexpr):
    s = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    rows_t = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    cols_v = tl.arange(0, BDV)
    m_t = rows_t < T
    q = tl.load(Q + b * sqb + h * sqh + rows_t[:, None] * sqt + cols[None, :], mask=m_t[:, None] & (cols < D)[None, :],
                other=0.)
    lim = tl.load(LIMIT + bh.to(tl.int64) * T + rows_t, mask=m_t, other=0)  # [BT]
    m_i = tl.full([BT], float("-inf"), tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BDV], tl.float32)
    start = s * SPLIT
    end = tl.minimum(tl.minimum(start + SPLIT, R), tl.max(lim, 0))  # rows past every query's limit: skipped
    for n0 in range(start, end, BN):
        rn = n0 + tl.arange(0, BN)
        m_n = rn < end
        k = tl.load(K + b * skb + h * skh + rn.to(tl.int64)[:, None] * skr + cols[None, :],
                    mask=m_n[:, None] & (cols < D)[None, :], other=0.)
        v = tl.load(V + b * svb + h * svh + rn.to(tl.int64)[:, None] * svr + cols_v[None, :],
                    mask=m_n[:, None] & (cols_v < DV)[None, :], other=0.)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        sc = tl.where(rn[None, :] < lim[:, None], sc, float("-inf"))
        m_i, l_i, acc = online_softmax_update(sc, v, m_i, l_i, acc, PREC)
    empty = l_i == 0.
    o = acc / tl.where(empty, 1., l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1., l_i)))  # log2 units
    NS = tl.num_programs(0)
    out_row = (bh.to(tl.int64) * T + rows_t) * NS + s  # [BT] rows of the [B, H, T, NS] partials
    tl.store(OUT + out_row[:, None] * DV + cols_v[None, :], o, mask=m_t[:, None] & (cols_v < DV)[None, :])
    tl.store(LSE + out_row, lse, mask=m_t)


@triton.jit
def decode_attn_combine_kernel(OP, LSE, OUT, sob, sot, soh, T, H, NS, DV, BS: tl.constexpr, BDV: tl.constexpr):
    """One program per (batch, head, query): merge its `NS` partial outputs `o_s` (log-sum-exps `lse_s`, log2 units)
    into `o = Σ_s 2^(lse_s − max) o_s / Σ_s 2^(lse_s − max)` (0 for a query that sees nothing), stored at `OUT[b, t,
    h]` in the output dtype."""
    pid = tl.program_id(0)
    bh, t = pid // T, pid % T
    b, h = (bh // H).to(tl.int64), bh % H
    s = tl.arange(0, BS)
    m_s = s < NS
    row = pid.to(tl.int64) * NS + s
    lse = tl.load(LSE + row, mask=m_s, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0., top))  # ranges that saw nothing weigh 0
    z = tl.sum(w, 0)
    cols = tl.arange(0, BDV)
    part = tl.load(OP + row[:, None] * DV + cols[None, :], mask=m_s[:, None] & (cols < DV)[None, :], other=0.)
    o = tl.sum(w[:, None] * part, 0) / tl.where(z == 0., 1., z)
    tl.store(OUT + b * sob + t * sot + h * soh + cols, o.to(OUT.dtype.element_ty), mask=cols < DV)


def num_splits(R: int, B: int, H: int, num_sms: int = 132) -> tuple[int, int]:
    """`(splits, rows per split)` for `R` rows and `B·H` heads: about two programs per SM, at least 256 rows (a
    multiple of `BLOCK_N`) per split."""
    target = max(1, -(-2 * num_sms // max(B * H, 1)))
    split = max(256, -(-R // target))
    split = -(-split // BLOCK_N) * BLOCK_N
    return -(-R // split), split


def decode_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, limit: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Query `t` of head `h` attends to rows `[0, limit[b, h, t])` of its head, split over the rows.

    Args:
        q (torch.Tensor): `[B, T, H, d]`, `T <= 128` (decode steps and in-block chunks).
        k_rows (torch.Tensor): `[B, H, R, d]` (last dim contiguous).
        v_rows (torch.Tensor): `[B, H, R, d_v]`.
        limit (torch.Tensor): `[B, H, T]` integer in `[0, R]` (0: the query sees nothing and gets 0).
        scale (float): score scale.

    Returns:
        `o [B, T, H, d_v]` in the dtype of `q`. No autograd (inference).
    """
    B, T, H, D = q.shape
    R, DV = k_rows.shape[2], v_rows.shape[-1]
    if T > 128:
        raise ValueError(f"decode_attention takes at most 128 queries per head, got T={T}")
    if k_rows.shape[:2] != (B, H) or v_rows.shape[:3] != k_rows.shape[:3] or limit.shape != (B, H, T):
        raise ValueError(f"k_rows [B, H, R, d], v_rows [B, H, R, d_v] and limit [B, H, T] must match q {tuple(q.shape)}, "
                         f"got {tuple(k_rows.shape)}, {tuple(v_rows.shape)}, {tuple(limit.shape)}")
    if k_rows.dtype != v_rows.dtype:
        raise TypeError(f"k_rows and v_rows must have one dtype, got {k_rows.dtype}, {v_rows.dtype}")
    q = q.to(k_rows.dtype)
    k_rows, v_rows = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_rows, v_rows))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    ns, split = num_splits(R, B, H, sms)
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    if not (B * H and T):
        return o
    if not R:
        return o.zero_()
    o_part = torch.empty(B, H, T, ns, DV, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H, T, ns, dtype=torch.float32, device=q.device)
    bdv = max(16, triton.next_power_of_2(DV))
    decode_attn_split_kernel[(ns, B * H)](
        q, k_rows, v_rows, limit.contiguous(), o_part, lse_part, *q.stride()[:3], *k_rows.stride()[:3],
        *v_rows.stride()[:3], T, H, R, D, DV, scale * LOG2E, SPLIT=split, BT=max(16, triton.next_power_of_2(T)),
        BD=max(16, triton.next_power_of_2(D)), BDV=bdv, BN=BLOCK_N, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2)
    # the merge of the ranges in one launch (it was ~12 small torch kernels, more than the split kernel's time at
    # batch 1)
    decode_attn_combine_kernel[(B * H * T,)](o_part, lse_part, o, *o.stride()[:3], T, H, ns, DV,
                                             BS=max(2, triton.next_power_of_2(ns)), BDV=bdv, num_warps=4)
    return o
