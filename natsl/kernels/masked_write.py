"""The masked chunk pass's own pieces (spec §1.7, §3.2): the masked keys of its state write with fla's chunk-local
gate cumsum in the same launch (`masked_write_fwd`), and the routed share of the state-write gradient with the gate
gradient's reverse cumsum in the same launch (`masked_write_bwd`).

In the masked chunk pass the state write of chunk `c` uses keys `m_c·k` (`m_c` per (chunk, head): 1 in linear
blocks, 0 in softmax blocks) while every read uses the real `k`. fla's backward kernels take one `k`, so natsl runs
them with the real `k` (for the reads) and this kernel removes the write term of the chunks with `m_c < 1`, per
(chunk, head):

    dk_w[t] = γ_t ⊙ (dS_c x_t)            γ_t = exp(G_last − G_t) (scalar gates, or per key for gla)
    dm_c    = Σ_t k_t · dk_w[t]           the router gradient (§1.7: ⟨dS', W⟩, W the chunk's write)
    dk[t]  −= (1 − m_c) dk_w[t]
    dv[t]  −= (1 − m_c) dS_cᵀ (γ_t ⊙ k_t)  (additive backends only: gla's dv holds the write term of the real k;
                                            with `dv_add`, dv holds none and gets `+= m_c dS_cᵀ (γ_t ⊙ k_t)`)
    dg[t]  −= (1 − m_c) Σ_{s<t in c} k_s · dk_w[s]  (⊙ per key for gla: the write term's share of the decay
                                            gradient, after the reverse cumsum)

Scalar gates: the kernel also takes fla's raw per-token gate gradient (and the delta rule's second term) and
applies the chunk-local reverse cumsum itself, `dg[t] = Σ_{s≥t in c} (dg + dg2)[s]`, before the correction: fla's
`chunk_local_cumsum` launch saved (the pass is bound by host launches below ~32k tokens). gla's `dg` comes from fla
with its reverse cumsum done.

With `z` (decay_through_softmax=False: the carried state decays only in chunks with `z_c = 1`), fla's gate
gradient also holds the carried decay's term `Σ h_c ⊙ dS_c · exp(G_last)` for every chunk; it is removed where
`z_c = 0` (`dg[t] −= (1 − z_c) Σ_v h_c ⊙ dS_c · exp(G_last)`, summed over keys for scalar gates).

`x` is fla's `v_new` (delta rule) or `v`, `dS_c = dh[c]` the gradient of the state after chunk `c` (fla's layout
`[B, NT, H, K, V]`), `G` fla's chunk-local cumulative log2 gate. Maths: `natsl/layers/README.md`, "Linear branch".
Pure-PyTorch twins (test oracles and CPU path): `naive.naive_masked_write_fwd`, `naive.naive_masked_write_bwd`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from natsl.kernels.naive import naive_masked_write_bwd, naive_masked_write_fwd


@triton.heuristics({
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "USE_G": lambda args: args["g"] is not None,
    "USE_GK": lambda args: args["gk"] is not None,
    "USE_DV": lambda args: args["dv"] is not None,
    "USE_DG": lambda args: args["dg"] is not None,
    "USE_DG2": lambda args: args["dg2"] is not None,
    "USE_Z": lambda args: args["z"] is not None,
})
@triton.jit(do_not_specialize=["T"])
def masked_write_bwd_kernel(
    x, k, m, z, g, gk, h, dh, dk, dv, dg, dg2, dm, cu_seqlens, chunk_indices, T, s_mt, s_mh, s_dmt, s_dmh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_G: tl.constexpr, USE_GK: tl.constexpr, USE_DV: tl.constexpr, USE_DG: tl.constexpr,
    USE_DG2: tl.constexpr, DV_ADD: tl.constexpr, USE_Z: tl.constexpr, SELECT: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = eos - bos
    else:
        i_t = i_t.to(tl.int64)
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
        bos = i_b.to(tl.int64) * T
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_t = o_t < T
    o_k = tl.arange(0, BK).to(tl.int64)
    m_k = o_k < K
    last = tl.minimum(i_t * BT + BT, T) - 1
    row = (bos + o_t) * H + i_h  # [BT] token-head rows
    m_tk = m_t[:, None] & m_k[None, :]

    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)  # [BT, BK]
    b_m = tl.load(m + i_tg * s_mt + i_h * s_mh).to(tl.float32)  # this chunk's write mask
    # γ: the decay from each token to the chunk's end, zero past the chunk
    if USE_GK:
        b_gk = tl.load(gk + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_gkl = tl.load(gk + ((bos + last) * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_gam = tl.where(m_tk, tl.exp2(b_gkl[None, :] - b_gk), 0.)  # [BT, BK]
    elif USE_G:
        b_g = tl.load(g + row, mask=m_t, other=0.).to(tl.float32)
        b_gl = tl.load(g + (bos + last) * H + i_h).to(tl.float32)
        b_gam = tl.where(m_t, tl.exp2(b_gl - b_g), 0.)[:, None] + tl.zeros([BT, BK], dtype=tl.float32)
    else:
        b_gam = tl.where(m_tk, 1., 0.)
    b_off = 1. - b_m  # the share of the write that the real-k kernels counted but the masked pass does not have
    b_kg = (b_k * b_gam).to(x.dtype.element_ty)

    dh += (i_tg * H + i_h) * K * V
    b_dkw = tl.zeros([BT, BK], dtype=tl.float32)
    if USE_Z:
        h += (i_tg * H + i_h) * K * V
        b_hdh = tl.zeros([BK], dtype=tl.float32)
    # the chunks whose corrections are zero skip their read-modify-writes (most chunks: m = 1 in linear blocks):
    # dv's where its term is (DV_ADD: m = 0; else 1 − m = 0), dk's where 1 − m = 0, dg's also where z = 1
    fix = b_off != 0.
    fix_dv = (b_m != 0.) if DV_ADD else fix
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV).to(tl.int64)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        b_x = tl.load(x + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)  # [BT, BV]
        b_dh = tl.load(dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)  # [BK, BV]
        if USE_Z:
            b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        b_dh = b_dh.to(b_x.dtype)
        b_dkw = tl.dot(b_x, tl.trans(b_dh), b_dkw)
        if USE_DV:  # noqa: SIM102 (a constexpr and a runtime condition)
            if fix_dv:
                p_dv = dv + row[:, None] * V + o_v[None, :]
                b_dvw = tl.dot(b_kg, b_dh)  # [BT, BV]
                if DV_ADD:
                    b_dv = tl.load(p_dv, mask=m_tv, other=0.).to(tl.float32) + b_m * b_dvw
                else:
                    b_dv = tl.load(p_dv, mask=m_tv, other=0.).to(tl.float32) - b_off * b_dvw
                tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_tv)
    b_dkw = b_dkw * b_gam
    b_kdk = b_k * b_dkw  # [BT, BK]
    b_dm = tl.sum(b_kdk)
    if SELECT:  # the router gradient of the blocks routed linear only (m = 1 there, 0 elsewhere)
        b_dm = b_dm * b_m
    tl.store(dm + i_tg * s_dmt + i_h * s_dmh, b_dm)
    if fix:
        p_dk = dk + row[:, None] * K + o_k[None, :]
        b_dk = tl.load(p_dk, mask=m_tk, other=0.).to(tl.float32) - b_off * b_dkw
        tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m_tk)
    if USE_DG:
        if USE_GK:  # fla's dg, reverse cumsum done: corrected where the correction is not zero
            fix_dg = fix
            if USE_Z:
                b_z = tl.load(z + i_tg * H + i_h).to(tl.float32)
                fix_dg = fix | (b_z != 1.)
            if fix_dg:
                b_c = b_off * b_kdk  # [BT, BK]
                p_dg = dg + row[:, None] * K + o_k[None, :]
                b_dg = tl.load(p_dg, mask=m_tk, other=0.).to(tl.float32) - (tl.cumsum(b_c, axis=0) - b_c)
                if USE_Z:  # the carried decay's term of chunks that do not decay the carried state
                    b_dg -= tl.where(m_tk, (1. - b_z) * (b_hdh * tl.exp2(b_gkl))[None, :], 0.)
                tl.store(p_dg, b_dg.to(p_dg.dtype.element_ty), mask=m_tk)
        else:  # fla's raw per-token dg (+ dg2): the chunk-local reverse cumsum, then the correction, every chunk
            p_dg = dg + row
            b_dg = tl.load(p_dg, mask=m_t, other=0.).to(tl.float32)
            if USE_DG2:
                b_dg += tl.load(dg2 + row, mask=m_t, other=0.).to(tl.float32)
            b_dg = tl.sum(b_dg, axis=0) - tl.cumsum(b_dg, axis=0) + b_dg
            b_c = b_off * tl.sum(b_kdk, axis=1)  # [BT]
            b_dg -= tl.cumsum(b_c, axis=0) - b_c
            if USE_Z:
                b_z = tl.load(z + i_tg * H + i_h).to(tl.float32)
                b_dg -= tl.where(m_t, (1. - b_z) * tl.sum(b_hdh) * tl.exp2(b_gl), 0.)
            tl.store(p_dg, b_dg.to(p_dg.dtype.element_ty), mask=m_t)


def _check_gate_grads(dg, dg2, g, gk, z, h) -> None:
    """The gate-gradient arguments of `masked_write_bwd` that go together (shared with its twin)."""
    if dg is not None and g is None and gk is None:
        raise ValueError("dg needs the gate it is the gradient of: g (scalar) or gk (per key)")
    if dg2 is not None and (dg is None or g is None):
        raise ValueError("dg2 needs dg and a scalar gate g")
    if z is not None and (h is None or dg is None):
        raise ValueError("z (decay_through_softmax=False) needs h and dg")


def masked_write_bwd(x: torch.Tensor, k: torch.Tensor, m: torch.Tensor, dh: torch.Tensor, dk: torch.Tensor, *,
                     dv: torch.Tensor | None = None, dv_add: bool = False, dg: torch.Tensor | None = None,
                     dg2: torch.Tensor | None = None, g: torch.Tensor | None = None, gk: torch.Tensor | None = None,
                     z: torch.Tensor | None = None, h: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
                     chunk_size: int = 64, select: bool = False, dm_out: torch.Tensor | None = None) -> torch.Tensor:
    r"""Remove the write term of chunks with `m < 1` from fla's real-k gradients, in place; return the router
    gradient per (chunk, head).

    Args:
        x (torch.Tensor): `[B, T, H, V]` the written values (fla's `v_new` for the delta rule, `v` otherwise).
        k (torch.Tensor): `[B, T, H, K]` the real keys.
        m (torch.Tensor): `[B * NT, H]` float32, the write mask of every chunk (value 0 or 1), in fla's global chunk
            order (dense: `b * NT + c`; packed: the chunks of every sequence in turn); any strides (e.g. a view
            of the routing weights).
        dh (torch.Tensor): `[B, NT, H, K, V]` gradient of the state after each chunk (fla's `dh`).
        dk (torch.Tensor): `[B, T, H, K]` fla's key gradient, corrected in place.
        dv (torch.Tensor, Optional): `[B, T, H, V]` fla's value gradient (additive backends), corrected in place.
        dv_add (bool): `dv` holds the intra-chunk term only (fla's `chunk_bwd_dv_local`): add the masked write
            term `m·dv_w` instead of removing `(1 − m)·dv_w`. Default: `False`.
        dg (torch.Tensor, Optional): the gate gradient, overwritten in place by the final one. With `g` (scalar
            gates) `[B, T, H]` fla's raw per-token gradient, before the chunk-local reverse cumsum (as
            `chunk_bwd_dqkwg` returns it): the kernel applies that cumsum (to `dg + dg2`), then the correction. With
            `gk` `[B, T, H, K]` gla's gradient, reverse cumsum done: corrected only. Needs `g` or `gk`.
        dg2 (torch.Tensor, Optional): `[B, T, H]` a second raw term added to `dg` before the cumsum (the delta
            rule's WY gradient of the gate); scalar gates only.
        g (torch.Tensor, Optional): `[B, T, H]` fla's chunk-local cumulative log2 gate (scalar decay).
        gk (torch.Tensor, Optional): `[B, T, H, K]` the same per key (gla).
        z (torch.Tensor, Optional): `[B * NT, H]` whether each chunk decays the carried state (decay_through_softmax
            =False; needs `g` or `gk`, `dg` and `h`).
        h (torch.Tensor, Optional): `[B, NT, H, K, V]` the chunk-start states fla's backward used (with `z`).
        cu_seqlens, chunk_indices (torch.LongTensor, Optional): fla's packed-sequence offsets and chunk indices.
        chunk_size (int): fla's chunk size. Default: `64`.
        select (bool): return `dm · m`, the router gradient of the chunks with `m = 1` only (spec §1.7,
            `router_grad="selected"`; `m` is 0/1). Default: `False`.
        dm_out (torch.Tensor, Optional): `[B * NT, H]` float32, any strides (e.g. a view into a gradient of the
            routing weights' shape): where `dm` is written. Default: a new tensor.

    Returns:
        `dm [B * NT, H]` float32 (`dm_out` if given): `Σ_t k_t · dk_w[t]`, the gradient of the loss with respect
        to `m` (times `m` with `select`).
    """
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":  # no Triton backend: the PyTorch twin
        return naive_masked_write_bwd(x, k, m, dh, dk, dv=dv, dv_add=dv_add, dg=dg, dg2=dg2, g=g, gk=gk, z=z, h=h,
                                      cu_seqlens=cu_seqlens, chunk_size=chunk_size, select=select, dm_out=dm_out)
    B, T, H, K = k.shape
    V = x.shape[-1]
    if K > 256:
        raise ValueError(f"masked_write_bwd supports key dims up to 256, got {K}")
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    BK = triton.next_power_of_2(K)
    BV = 64 if BK <= 128 else 32
    _check_gate_grads(dg, dg2, g, gk, z, h)
    if m.shape != (B * NT, H):
        raise ValueError(f"m must have shape [B * NT, H] = [{B * NT}, {H}], got {tuple(m.shape)}")
    if dm_out is None:
        dm = torch.empty(B * NT, H, dtype=torch.float32, device=k.device)
    elif dm_out.shape != (B * NT, H) or dm_out.dtype != torch.float32:
        raise ValueError(f"dm_out must be float32 [B * NT, H] = [{B * NT}, {H}], got {dm_out.dtype} "
                         f"{tuple(dm_out.shape)}")
    else:
        dm = dm_out
    masked_write_bwd_kernel[(NT, B * H)](
        x, k, m, z, g, gk, h, dh, dk, dv, dg, dg2, dm, cu_seqlens, chunk_indices, T, m.stride(0), m.stride(1),
        dm.stride(0), dm.stride(1),
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, DV_ADD=dv_add, SELECT=select, num_warps=4 if BK <= 64 else 8,
    )
    return dm



@triton.heuristics({"IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
                    "USE_G": lambda args: args["g"] is not None})
@triton.jit(do_not_specialize=["T"])
def masked_write_fwd_kernel(k, m, g, k_m, gc, cu_seqlens, chunk_indices, T, s_mb, s_mn, s_mh, scale,
                            H: tl.constexpr, K: tl.constexpr, GK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            BG: tl.constexpr, IS_VARLEN: tl.constexpr, USE_G: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    if IS_VARLEN:
        i_blk = i_t.to(tl.int64)  # the global block: fla's global chunk order
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_t = i_t.to(tl.int64)
        i_blk = i_t
        bos = i_b * T
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    m_t = o_t < T
    row = (bos + o_t) * H + i_h
    b_m = tl.load(m + i_b * s_mb + i_blk * s_mn + i_h * s_mh).to(tl.float32)
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p = row[:, None] * K + o_k[None, :]
    b_k = tl.load(k + p, mask=m_tk, other=0.).to(tl.float32)
    tl.store(k_m + p, (b_k * b_m).to(k_m.dtype.element_ty), mask=m_tk)
    if USE_G:  # fla's chunk-local cumsum of the gate (scaled after the sum, as fla's kernel does)
        o_g = tl.arange(0, BG)
        m_tg = m_t[:, None] & (o_g < GK)[None, :]
        p_g = row[:, None] * GK + o_g[None, :]
        b_g = tl.cumsum(tl.load(g + p_g, mask=m_tg, other=0.).to(tl.float32), axis=0) * scale
        tl.store(gc + p_g, b_g.to(gc.dtype.element_ty), mask=m_tg)


def masked_write_fwd(k: torch.Tensor, m: torch.Tensor, g: torch.Tensor | None = None, *, chunk_size: int = 64,
                     scale: float = 1.0, cu_seqlens: torch.Tensor | None = None,
                     chunk_indices: torch.Tensor | None = None):
    """`(k·m, cumsum(g))` in one launch: the keys of the masked pass's state write and fla's chunk-local cumulative
    gate (`chunk_local_cumsum(g, chunk_size, scale=scale)`, float32), one program per (chunk, head). PyTorch's
    broadcast `k·m` over `[B, N, C, H, K]` takes a strided, unvectorised kernel (0.26 ms at 64k tokens on the H200
    against fla's 4.7 ms call); one launch for both saves fla's cumsum launch, where the pass is host-bound
    (`benchmarks/RESULTS.md`, sessions 28 and 31).

    Args:
        k (torch.Tensor): `[B, T, H, K]` contiguous keys.
        m (torch.Tensor): `[B, N, H]` per (block, head), block = chunk, any strides and float dtype (a view of the
            routing weights); packed input: `[1, N_total, H]` over the global blocks (fla's chunk order).
        g (torch.Tensor, Optional): `[B, T, H]` or `[B, T, H, K]` the per-token log gate, contiguous.
        chunk_size (int): tokens per block = fla's chunk. Default: `64`.
        scale (float): multiplies the cumulative gate (fla: `RCP_LN2` for its `exp2` kernels). Default: `1.0`.
        cu_seqlens, chunk_indices (torch.LongTensor, Optional): fla's packed-sequence offsets and chunk indices.

    Returns:
        `k·m [B, T, H, K]` in `k`'s dtype, and the cumulative gate in float32 with `g`'s shape (`None` without `g`).
    """
    if not k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return naive_masked_write_fwd(k, m, g, chunk_size=chunk_size, scale=scale, cu_seqlens=cu_seqlens)
    B, T, H, K = k.shape
    if not k.is_contiguous() or (g is not None and not g.is_contiguous()):
        raise ValueError("masked_write_fwd needs contiguous keys k and gate g")
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    if m.dim() != 3 or m.shape[0] != B or m.shape[2] != H or m.shape[1] != NT:
        raise ValueError(f"m must have shape [B={B}, N={NT}, H={H}], got {tuple(m.shape)}")
    if K > 256:
        raise ValueError(f"masked_write_fwd supports key dims up to 256, got {K}")
    if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must have shape [B, T, H] or [B, T, H, K] = {(B, T, H, K)}, got {tuple(g.shape)}")
    k_m = torch.empty_like(k)
    gc = None if g is None else torch.empty(g.shape, dtype=torch.float32, device=g.device)
    GK = 1 if g is None or g.dim() == 3 else K
    if T:
        masked_write_fwd_kernel[(NT, B * H)](
            k, m, g, k_m, gc, cu_seqlens, chunk_indices, T, m.stride(0), m.stride(1), m.stride(2), scale,
            H=H, K=K, GK=GK, BT=chunk_size, BK=triton.next_power_of_2(K), BG=triton.next_power_of_2(GK),
            num_warps=4 if chunk_size * triton.next_power_of_2(K) <= 8192 else 8)
    return k_m, gc
