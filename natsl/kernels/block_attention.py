"""Block-sparse softmax attention of the NAtS-L softmax branch, forward and backward with the router gradient
(spec §1.3, §1.5, §1.7), in three Triton kernels.

A query of block `i` (router head `r = h // G` of softmax head `h`) sees the softmax blocks of `r` before `i` in
its sequence, and its own block causally (unless `own=False`, the `diagonal="linear"` policy). Per program one
query block (forward, dq) or one key block (dk/dv) of one (batch, head), tiles of `C = block_size` tokens:

- forward: online softmax over the `p(i) - lo(i)` past softmax blocks (read from a per-(batch, router head) sorted
  list of their first rows, no gather of K/V), then the own block with its causal mask; writes `o` and the row LSE.
  Power-of-two head dims read tiles through tensor descriptors (TMA copies on Hopper), others through pointers.
- dq: the same loop, with `dS = P ∘ (dP − Δ)`, `Δ_t = dO_t·o_t` (flash-attention 2's backward; the dq kernel computes
  `Δ` from its `dO` and `o` tiles and stores it for the dk/dv kernel, launched after it).
- dk/dv: per key block `j`, its own block and, if `j` is a softmax block, every later query block of its
  sequence; it also sums `dS` over those past queries: the router gradient `∂L/∂m(j)` of spec §1.7
  (`router_grad="selected"`), a column sum of the score gradient accumulated in the attention backward, as in the
  paper's kernels (no extra pass).

Every index list is built on the device from the block types (`block_sparse_plan`): no host sync, no
data-dependent shapes, one launch per kernel. Work per call is the visible (query, key) block pairs only: at a
softmax fraction `f` about `f/2 · N²` tile pairs plus `N` own blocks, against `N²/2` for dense causal attention.

Why natsl's own kernel: FlexAttention (the `flex` backend) has no column sums of `dS`, so its router gradient needs
a transposed pass, and its per-call host work (BlockMask, guards) dominates below ~16k tokens
(benchmarks/RESULTS.md). PyTorch twin (test oracle and CPU path): `naive.naive_block_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from natsl.kernels.index import blocks_before

LOG2E = 1.4426950408889634
#: the routing block sizes the kernels take (one `C × C` tile per block pair)
BLOCK_SIZES = (16, 32, 64, 128)
# where each kernel reads its q/k/v/dO tiles through tensor descriptors (TMA; `_tile_descriptors`): from this
# sequence length (the `T` of the `[B, T, H, D]` inputs) on, `None` never. Measured on the H200
# (`probe_triton_configs.py --descriptors`, benchmarks/RESULTS.md, session 24): the forward is faster with them at
# every length (13% at 128k); dq and dk/dv are 11% and 9% faster at 64k but slower at 16k and 8 × 4k
DESCRIPTORS = {"fwd": 0, "dq": 32768, "dkdv": 32768}
# the order of each kernel's programs: block-major (False: the (batch, head) pairs of one block side by side) or
# (batch, head)-major (True: one head's blocks side by side, sharing its tiles in L2). Measured on the H200
# (`probe_triton_configs.py --orders`, benchmarks/RESULTS.md, session 25): the forward is faster head-major at
# 128k, 64k and 8 × 4k (12.55 -> 11.97 ms at 128k); dq and dk/dv are slower head-major at 64k and 8 × 4k
HEAD_MAJOR = {"fwd": True, "dq": False, "dkdv": False}
# launch configurations (warps, pipeline stages) per kernel with pointer loads (False) and descriptors (True), from
# the same probe
CONFIGS = {("fwd", False): dict(num_warps=4, num_stages=2), ("fwd", True): dict(num_warps=4, num_stages=2),
           ("dq", False): dict(num_warps=4, num_stages=2), ("dq", True): dict(num_warps=4, num_stages=1),
           ("dkdv", False): dict(num_warps=4, num_stages=1), ("dkdv", True): dict(num_warps=4, num_stages=2)}
# two query blocks per forward program (one [2C, ·] query tile over the pair's shared past blocks) measured no faster
# on the H200 (benchmarks/RESULTS.md, session 22: 14.26 vs 14.07 ms at 128k, 3.68 vs 3.48 at 64k) and was removed
# dq has its own kernel, which recomputes the scores and dP (7 matmuls per visible tile pair in the backward): dq by
# float32 atomic adds in the dk/dv kernel (5 matmuls) measured 1.9x slower on the H200 (benchmarks/RESULTS.md,
# session 21) and was removed


@triton.jit
def _tile_ptrs(X, b, h, row0, n_rows, stride_b, stride_t, stride_h, C: tl.constexpr, D, BD: tl.constexpr):
    """Pointers and mask of the `[C, BD]` tile of rows `row0 + [0, C)` (valid: `< n_rows`) of `X[b, :, h, :D]`."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, BD)
    ptr = X + b * stride_b + h * stride_h + (row0 + rows).to(tl.int64)[:, None] * stride_t + cols[None, :]
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    return ptr, mask


@triton.jit
def _load_tile(X, b, h, row0, n_rows, stride_b, stride_t, stride_h, T, D, C: tl.constexpr, BD: tl.constexpr,
               DESC: tl.constexpr):
    """The `[C, BD]` tile of rows `row0 + [0, C)` of `X[b, :, h, :D]`: through the tensor descriptor `X` of the
    `[B*T, H*BD]` view (`DESC`; rows past `n_rows` hold the next rows' values or zeros), or masked pointer loads
    (rows past `n_rows` and columns past `D` are 0)."""
    # one return after a constexpr if/else: Triton's compiler also generates what follows an early `return` in a
    # static `if`, and the pointer path does not compile for a descriptor
    if DESC:
        tile = X.load([(b * T + row0).to(tl.int32), h * BD])
    else:
        ptr, mask = _tile_ptrs(X, b, h, row0, n_rows, stride_b, stride_t, stride_h, C, D, BD)
        tile = tl.load(ptr, mask=mask, other=0.)
    return tile


@triton.jit
def _softmax_step(b_q, K, V, b, h, k0, kn, skb, skt, skh, svb, svt, svh, qk_scale, m_i, l_i, acc, T, D, DV,
                  C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                  DESC: tl.constexpr):
    """One key tile (rows `k0 + [0, C)`, valid `< kn`) of the online softmax, scores in log2 units: the new
    `(m, l, acc)`. `CAUSAL`: the own block (key `<=` query); rows that see nothing keep `m = -inf`. `DESC`: `K`, `V`
    are tensor descriptors of the `[B*T, H*D]` views (TMA copies; rows past `kn` are masked by `CAUSAL` or absent)."""
    b_k = _load_tile(K, b, h, k0, kn, skb, skt, skh, T, D, C, BD, DESC)
    b_v = _load_tile(V, b, h, k0, kn, svb, svt, svh, T, DV, C, BDV, DESC)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if CAUSAL:
        rows = tl.arange(0, C)
        b_s = tl.where((rows[None, :] <= rows[:, None]) & (rows[None, :] < kn), b_s, float("-inf"))
    return online_softmax_update(b_s, b_v, m_i, l_i, acc, PREC)


@triton.jit
def online_softmax_update(b_s, b_v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold the scores `b_s [M, N]` (log2 units, `-inf` = not visible) of one key tile with its values `b_v [N, DV]`
    into the running `(max m, sum l, output acc)`; rows that have seen nothing keep `m = -inf`, `l = 0`."""
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(b_p, 1), acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v,
                                                                              input_precision=PREC)


@triton.jit
def _program_block(N, HEAD_MAJOR: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """`(block, bh)` of this program among `N` blocks × `num_programs / N` (batch, head) pairs. Block-major (the
    (batch, head) pairs of one block side by side), or `HEAD_MAJOR`: the blocks of one (batch, head) side by side,
    so that the programs in flight share that head's K/V (forward, dq) or q/dO (dk/dv) tiles in L2. Blocks in
    descending order with `LONGEST_FIRST` (the forward's and dq's last query blocks have the most past blocks)."""
    pid = tl.program_id(0)
    BH = tl.num_programs(0) // N
    if HEAD_MAJOR:
        blk, bh = pid % N, pid // N
    else:
        blk, bh = pid // BH, pid % BH
    if LONGEST_FIRST:
        blk = N - 1 - blk
    return blk, bh


@triton.jit
def block_attn_fwd_kernel(Q, K, V, OUT, LSE, KSTART, LO, HI, BSTART, BLEN, sqb, sqt, sqh, skb, skt, skh, svb, svt,
                          svh, sob, sot, soh, qk_scale, T, N, H, HR, G, D, DV, C: tl.constexpr, BD: tl.constexpr,
                          BDV: tl.constexpr, OWN: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr,
                          HEAD_MAJOR: tl.constexpr):
    i, bh = _program_block(N, HEAD_MAJOR, True)  # longest query blocks (most past blocks) first
    b, h = (bh // H).to(tl.int64), bh % H
    r = h // G
    q0, qn = tl.load(BSTART + i), tl.load(BLEN + i)
    b_q = _load_tile(Q, b, h, q0, qn, sqb, sqt, sqh, T, D, C, BD, DESC)
    m_i = tl.full([C], float("-inf"), tl.float32)
    l_i = tl.zeros([C], tl.float32)
    acc = tl.zeros([C, BDV], tl.float32)
    meta = (b * N + i) * HR + r
    lo, hi = tl.load(LO + meta), tl.load(HI + meta)
    ks = KSTART + (b * HR + r) * N
    for j in range(lo, hi):  # past softmax blocks: full blocks, every pair visible
        m_i, l_i, acc = _softmax_step(b_q, K, V, b, h, tl.load(ks + j), C, skb, skt, skh, svb, svt, svh, qk_scale,
                                      m_i, l_i, acc, T, D, DV, C, BD, BDV, False, PREC, DESC)
    if OWN:  # own block, causal
        m_i, l_i, acc = _softmax_step(b_q, K, V, b, h, q0, qn, skb, skt, skh, svb, svt, svh, qk_scale, m_i, l_i, acc,
                                      T, D, DV, C, BD, BDV, True, PREC, DESC)
    empty = l_i == 0.  # no visible key (a padding row, or diagonal="linear" with no past softmax block)
    o = acc / tl.where(empty, 1., l_i)[:, None]
    o_ptr, o_mask = _tile_ptrs(OUT, b, h, q0, qn, sob, sot, soh, C, DV, BDV)
    tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=o_mask)
    # LSE in log2 units of the scaled scores; +inf for empty rows makes their backward probabilities exactly 0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1., l_i)))
    rows = tl.arange(0, C)
    tl.store(LSE + bh.to(tl.int64) * T + q0 + rows, lse, mask=rows < qn)


@triton.jit
def _row_values(X, bh, q0, qn, T, C: tl.constexpr, other):
    """`X[bh, q0 + [0, C)]` of a `[B*H, T]` per-row tensor (LSE, `Δ`), `other` past `qn`."""
    rows = tl.arange(0, C)
    return tl.load(X + bh.to(tl.int64) * T + q0 + rows, mask=rows < qn, other=other)


@triton.jit
def _query_rows(Q, DO, LSE, b, h, bh, q0, qn, sqb, sqt, sqh, sdb, sdt, sdh, T, D, DV, C: tl.constexpr,
                BD: tl.constexpr, BDV: tl.constexpr, DESC: tl.constexpr):
    """The backward's tiles of query rows `q0 + [0, C)` (valid: `< qn`): `q`, `dO`, LSE (`+inf` past `qn`)."""
    return (_load_tile(Q, b, h, q0, qn, sqb, sqt, sqh, T, D, C, BD, DESC),
            _load_tile(DO, b, h, q0, qn, sdb, sdt, sdh, T, DV, C, BDV, DESC),
            _row_values(LSE, bh, q0, qn, T, C, float("inf")))


@triton.jit
def _dq_step(b_q, b_do, lse, delta, K, V, b, h, k0, kn, skb, skt, skh, svb, svt, svh, qk_scale, T, D, DV,
             C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
             DESC: tl.constexpr):
    """`dS K` of one key tile (`CAUSAL`: the own block, keys `<= ` query and `< kn`) for the query tile."""
    b_k = _load_tile(K, b, h, k0, kn, skb, skt, skh, T, D, C, BD, DESC)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - lse[:, None])
    if CAUSAL:
        rows = tl.arange(0, C)
        b_p = tl.where((rows[None, :] <= rows[:, None]) & (rows[None, :] < kn), b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(_load_tile(V, b, h, k0, kn, svb, svt, svh, T, DV, C, BDV, DESC)),
                  input_precision=PREC)
    b_ds = b_p * (b_dp - delta[:, None])
    return tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)


@triton.jit
def _dkdv_step(b_k, b_v, b_q, b_do, lse, delta, qk_scale, qn, C: tl.constexpr, CAUSAL: tl.constexpr,
               PREC: tl.constexpr):
    """`(Pᵀ dO, dSᵀ q, dSᵀ)` of one query tile for the key tile (keys on rows; `CAUSAL`: the own block)."""
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale - lse[None, :])
    if CAUSAL:
        rows = tl.arange(0, C)
        b_pt = tl.where((rows[:, None] <= rows[None, :]) & (rows[None, :] < qn), b_pt, 0.)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
    b_dst = b_pt * (b_dpt - delta[None, :])
    return (tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC),
            tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC), b_dst)


@triton.jit
def _dkdv_query_block(b_k, b_v, Q, DO, LSE, DELTA, b, h, bh, q0, qn, sqb, sqt, sqh, sdb, sdt, sdh, qk_scale, T, D, DV,
                      C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                      DESC: tl.constexpr):
    """`_dkdv_step` of the key tile with the query rows `q0 + [0, C)` (valid `< qn`), their LSE and `Δ` read here."""
    b_q, b_do, lse = _query_rows(Q, DO, LSE, b, h, bh, q0, qn, sqb, sqt, sqh, sdb, sdt, sdh, T, D, DV, C, BD, BDV, DESC)
    delta = _row_values(DELTA, bh, q0, qn, T, C, 0.)
    return _dkdv_step(b_k, b_v, b_q, b_do, lse, delta, qk_scale, qn, C, CAUSAL, PREC)


@triton.jit
def block_attn_bwd_dq_kernel(Q, K, V, DO, OUT, LSE, DELTA, DQ, KSTART, LO, HI, BSTART, BLEN, sqb, sqt, sqh, skb, skt,
                             skh, svb, svt, svh, sdb, sdt, sdh, qk_scale, scale, T, N, H, HR, G, D, DV,
                             C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, OWN: tl.constexpr,
                             PREC: tl.constexpr, DESC: tl.constexpr,
                             HEAD_MAJOR: tl.constexpr):
    # (`OUT`, the forward's output, has the strides of `DO`)
    i, bh = _program_block(N, HEAD_MAJOR, True)
    b, h = (bh // H).to(tl.int64), bh % H
    r = h // G
    q0, qn = tl.load(BSTART + i), tl.load(BLEN + i)
    b_q, b_do, lse = _query_rows(Q, DO, LSE, b, h, bh, q0, qn, sqb, sqt, sqh, sdb, sdt, sdh, T, D, DV, C, BD, BDV,
                                 DESC)
    # Δ = rowsum(dO ∘ O) of the block's rows, here and stored for the dk/dv kernel (launched after this one)
    b_o = _load_tile(OUT, b, h, q0, qn, sdb, sdt, sdh, T, DV, C, BDV, DESC)
    rows = tl.arange(0, C)
    delta = tl.where(rows < qn, tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1), 0.)
    tl.store(DELTA + bh.to(tl.int64) * T + q0 + rows, delta, mask=rows < qn)
    acc = tl.zeros([C, BD], tl.float32)
    meta = (b * N + i) * HR + r
    lo, hi = tl.load(LO + meta), tl.load(HI + meta)
    ks = KSTART + (b * HR + r) * N
    for j in range(lo, hi):
        acc += _dq_step(b_q, b_do, lse, delta, K, V, b, h, tl.load(ks + j), C, skb, skt, skh, svb, svt, svh,
                        qk_scale, T, D, DV, C, BD, BDV, False, PREC, DESC)
    if OWN:
        acc += _dq_step(b_q, b_do, lse, delta, K, V, b, h, q0, qn, skb, skt, skh, svb, svt, svh, qk_scale, T, D, DV,
                        C, BD, BDV, True, PREC, DESC)
    dq_ptr, dq_mask = _tile_ptrs(DQ, b, h, q0, qn, sqb, sqt, sqh, C, D, BD)
    tl.store(dq_ptr, (acc * scale).to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def block_attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, DM, SOFT, SEQ_END, BSTART, BLEN, sqb, sqt, sqh,
                               skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, qk_scale, scale, T, N, H, HR, G, D, DV,
                               C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, OWN: tl.constexpr,
                               PREC: tl.constexpr, DESC: tl.constexpr,
                               HEAD_MAJOR: tl.constexpr):
    j, bh = _program_block(N, HEAD_MAJOR, False)  # earliest key blocks (most later queries) first
    b, h = (bh // H).to(tl.int64), bh % H
    r = h // G
    k0, kn = tl.load(BSTART + j), tl.load(BLEN + j)
    rows = tl.arange(0, C)
    b_k = _load_tile(K, b, h, k0, kn, skb, skt, skh, T, D, C, BD, DESC)
    b_v = _load_tile(V, b, h, k0, kn, svb, svt, svh, T, DV, C, BDV, DESC)
    dk = tl.zeros([C, BD], tl.float32)
    dv = tl.zeros([C, BDV], tl.float32)
    if OWN:  # the queries of the own block, causal
        d_v, d_k, _ = _dkdv_query_block(b_k, b_v, Q, DO, LSE, DELTA, b, h, bh, k0, kn, sqb, sqt, sqh, sdb, sdt, sdh,
                                        qk_scale, T, D, DV, C, BD, BDV, True, PREC, DESC)
        dv += d_v
        dk += d_k
    is_soft = tl.load(SOFT + (b * N + j) * HR + r) != 0
    i_end = tl.where(is_soft, tl.load(SEQ_END + j), j + 1)
    colsum = tl.zeros([C], tl.float32)
    for i in range(j + 1, i_end):  # later query blocks of the sequence: they all see softmax block j
        q0, qn = tl.load(BSTART + i), tl.load(BLEN + i)
        d_v, d_k, b_dst = _dkdv_query_block(b_k, b_v, Q, DO, LSE, DELTA, b, h, bh, q0, qn, sqb, sqt, sqh, sdb, sdt,
                                            sdh, qk_scale, T, D, DV, C, BD, BDV, False, PREC, DESC)
        dv += d_v
        dk += d_k
        colsum += tl.sum(b_dst, 1)
    dk_ptr, dk_mask = _tile_ptrs(DK, b, h, k0, kn, skb, skt, skh, C, D, BD)
    dv_ptr, dv_mask = _tile_ptrs(DV_, b, h, k0, kn, svb, svt, svh, C, DV, BDV)
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptr, dv.to(DV_.dtype.element_ty), mask=dv_mask)
    tl.store(DM + bh.to(tl.int64) * N + j, tl.sum(tl.where(rows < kn, colsum, 0.), 0))


def block_sparse_plan(soft: torch.Tensor, block_first: torch.Tensor, block_start: torch.Tensor,
                      block_len: torch.Tensor, block_size: int) -> dict:
    """The kernels' index tensors from the block types, on the device, without a host sync.

    Args:
        soft (torch.BoolTensor): `[B, N, Hr]` whether block `n` is softmax for router head `r`.
        block_first, block_start, block_len: `[N]` the `BlockLayout` fields (blocks restart at sequence starts).
        block_size (int): `C`, the kernels' tile.

    Returns:
        dict: `C` and int32 tensors `kstart [B, Hr, N]` (the first rows of each pair's softmax blocks, in increasing
        order, then padding), `lo`, `hi [B, N, Hr]` (the ranks `[lo, hi)` of the past softmax blocks that block `n`
        sees), `soft [B, N, Hr]`, `seq_end [N]` (one past the last block of `n`'s sequence), `block_start`,
        `block_len [N]`.
    """
    B, N, Hr = soft.shape
    dev = soft.device
    si = soft.to(torch.int32)
    excl = blocks_before(si)  # softmax blocks before n in its batch row
    nb = torch.arange(N, device=dev, dtype=torch.int32)
    first = torch.where(block_first.to(dev), nb, 0).cummax(0).values.long()  # first block of n's sequence
    pos = torch.where(soft, excl, N).permute(0, 2, 1).long()  # [B, Hr, N]; N = the discard slot
    start = block_start.to(device=dev, dtype=torch.int32)
    kstart = torch.zeros(B, Hr, N + 1, dtype=torch.int32, device=dev)
    kstart.scatter_(2, pos, start.view(1, 1, N).expand(B, Hr, N).contiguous())
    nxt = torch.where(block_first.to(dev), nb, N)  # the next sequence start after n: a reversed running minimum
    nxt = torch.cat([nxt[1:], nxt.new_full((min(N, 1),), N)])
    seq_end = nxt.flip(0).cummin(0).values.flip(0)
    return {"C": block_size, "kstart": kstart[..., :N].contiguous(), "lo": excl[:, first].contiguous(),
            "hi": excl.contiguous(), "soft": si.contiguous(), "seq_end": seq_end.to(torch.int32).contiguous(),
            "block_start": start.contiguous(), "block_len": block_len.to(device=dev, dtype=torch.int32).contiguous()}


def _launch_args(q, k, v, C: int):
    B, T, H, D = q.shape
    DV = v.shape[-1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    const = dict(C=C, BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)), PREC=prec)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    return B, T, H, D, DV, const, strides


def _tile_descriptors(kind: str, C: int, const: dict, *xs):
    """Tensor descriptors (TMA on Hopper and newer) of the `[B*T, H*W]` views of the `[B, T, H, W]` tensors `xs`
    with `[C, W]` tiles for the kernel `kind`, or `None` where they do not apply: below the kernel's length
    `DESCRIPTORS[kind]` (or where that is `None`), a width that is not its tile (`BD`, `BDV`: not a power of two in
    [16, 256]), views that are not dense or 16-byte aligned, GPUs before sm90 (their pointer loads are the same as
    the fallback)."""
    start = DESCRIPTORS[kind]
    if start is None or xs[0].shape[1] < start:
        return None
    if xs[0].device.type == "cuda" and torch.cuda.get_device_capability(xs[0].device)[0] < 9:
        return None
    if any(x.shape[-1] not in (const["BD"], const["BDV"]) or x.shape[-1] > 256 for x in xs):
        return None
    if any(not x.is_contiguous() or x.data_ptr() % 16 for x in xs):
        return None
    return [TensorDescriptor.from_tensor(x.view(x.shape[0] * x.shape[1], -1), [C, x.shape[-1]]) for x in xs]


def block_attention_fwd(q, k, v, plan: dict, scale: float, num_router_heads: int, own: bool):
    """`q, k [B, T, H, D]`, `v [B, T, H, DV]` (last dim contiguous) → `(o [B, T, H, DV], lse [B, H, T])`; the LSE is
    in log2 units of the scaled scores, `+inf` for rows that see no key (their `o` is 0). No autograd.

    Where the head dims are powers of two, the tiles are read through tensor descriptors (Hopper's TMA): 13% faster
    than pointer loads at 128k on the H200 (benchmarks/RESULTS.md, session 23)."""
    B, T, H, D, DV, const, strides = _launch_args(q, k, v, plan["C"])
    N = plan["hi"].shape[1]
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if N and B * H:
        descs = _tile_descriptors("fwd", plan["C"], const, q, k, v)
        qkv = (q, k, v) if descs is None else descs
        block_attn_fwd_kernel[(N * B * H,)](
            *qkv, o, lse, plan["kstart"], plan["lo"], plan["hi"], plan["block_start"], plan["block_len"], *strides,
            *o.stride()[:3], scale * LOG2E, T, N, H, num_router_heads, H // num_router_heads, D, DV, OWN=own,
            DESC=descs is not None, HEAD_MAJOR=HEAD_MAJOR["fwd"], **const, **CONFIGS["fwd", descs is not None])
    return o, lse


def block_attention_bwd(do, q, k, v, o, lse, plan: dict, scale: float, num_router_heads: int, own: bool):
    """The gradients `(dq, dk, dv, dm [B, N, Hr] float32)` of :func:`block_attention_fwd`; `dm` is the softmax gate
    gradient of spec §1.7 (zero for linear blocks). No autograd."""
    B, T, H, D, DV, const, strides = _launch_args(q, k, v, plan["C"])
    N = plan["hi"].shape[1]
    Hr = num_router_heads
    do, o = do.contiguous(), o.contiguous()  # (one set of strides for both)
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # Δ = rowsum(dO ∘ O), by the dq kernel
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.empty_like(q)
    dm = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
    if N and B * H:
        C = plan["C"]
        common = (plan["block_start"], plan["block_len"], *strides, *do.stride()[:3], scale * LOG2E, scale, T, N, H,
                  Hr, H // Hr, D, DV)
        descs = _tile_descriptors("dq", C, const, q, k, v, do, o)
        block_attn_bwd_dq_kernel[(N * B * H,)](
            *((q, k, v, do, o) if descs is None else descs), lse, delta, dq, plan["kstart"], plan["lo"], plan["hi"],
            *common, OWN=own, DESC=descs is not None, HEAD_MAJOR=HEAD_MAJOR["dq"], **const,
            **CONFIGS["dq", descs is not None])
        descs = _tile_descriptors("dkdv", C, const, q, k, v, do)
        block_attn_bwd_dkdv_kernel[(N * B * H,)](
            *((q, k, v, do) if descs is None else descs), lse, delta, dk, dv, dm, plan["soft"], plan["seq_end"],
            *common, OWN=own, DESC=descs is not None, HEAD_MAJOR=HEAD_MAJOR["dkdv"], **const,
            **CONFIGS["dkdv", descs is not None])
    dm = dm.view(B, Hr, H // Hr, N).sum(2).permute(0, 2, 1)
    return dq, dk, dv, dm


class BlockAttentionFunction(torch.autograd.Function):
    """`o = block-sparse attention(q, k, v)`; the softmax gate `gate [B, N, Hr]` enters only the backward (its value
    is the hard routing), which returns its gradient `∂L/∂m` for the softmax blocks (spec §1.7, "selected")."""

    @staticmethod
    def forward(ctx, q, k, v, gate, plan, scale, num_router_heads, own):
        o, lse = block_attention_fwd(q, k, v, plan, scale, num_router_heads, own)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale, ctx.hr, ctx.own = plan, scale, num_router_heads, own
        ctx.gate_dtype = None if gate is None else gate.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, dm = block_attention_bwd(do, q, k, v, o, lse, ctx.plan, ctx.scale, ctx.hr, ctx.own)
        dgate = None if ctx.gate_dtype is None else dm.to(ctx.gate_dtype)
        return dq, dk, dv, dgate, None, None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, soft: torch.Tensor, block_first: torch.Tensor,
                    block_start: torch.Tensor, block_len: torch.Tensor, block_size: int, *, scale: float | None = None,
                    gate: torch.Tensor | None = None, own: bool = True) -> torch.Tensor:
    """The softmax branch over the Triton kernels.

    Args:
        q, k (torch.Tensor): `[B, T, H, D]` float16/bfloat16/float32 on one device (CUDA, or CPU under
            `TRITON_INTERPRET=1`).
        v (torch.Tensor): `[B, T, H, DV]`.
        soft (torch.BoolTensor): `[B, N, Hr]` block types (`H % Hr == 0`; head `h` belongs to router head `h // (H/Hr)`).
        block_first, block_start, block_len (torch.Tensor): `[N]` the routing's `BlockLayout` fields.
        block_size (int): `C`, a power of two in [16, 128].
        scale (float, Optional): score scale. Default: `D ** -0.5`.
        gate (torch.Tensor, Optional): `[B, N, Hr]` the softmax gate; its gradient is the router gradient of the
            softmax blocks.
        own (bool): the own block is seen causally (`diagonal="both"`). Default: `True`.

    Returns:
        `o [B, T, H, DV]` in the dtype of `q`.
    """
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device == soft.device:
        raise ValueError(f"q, k, v and soft must be on one device, got {q.device}, {k.device}, {v.device}, {soft.device}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} for the Triton kernels, got {block_size}")
    H, Hr = q.shape[2], soft.shape[2]
    if H % Hr:
        raise ValueError(f"heads H={H} must be a multiple of the router heads {Hr}")
    # the backward writes dq/dk/dv with the strides of q/k/v: views with gaps (slices of a fused projection) are
    # copied to dense tensors first
    q, k, v = (x.contiguous() for x in (q, k, v))
    plan = block_sparse_plan(soft, block_first, block_start, block_len, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return BlockAttentionFunction.apply(q, k, v, gate, plan, scale, Hr, own)
