"""Pure-PyTorch twins of the gather/scatter kernels (spec §3.4): the test oracle and the fallback on devices
without a Triton backend. Differentiable through PyTorch's own indexing ops."""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def naive_gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`[S, W]`: `x_rows[idx[j]]` for `0 <= idx[j] < R`, else a zero row (`x` is `[*R, W]`)."""
    rows = _rows(x)
    R = rows.shape[0]
    idx = idx.long()
    valid = (idx >= 0) & (idx < R)
    picked = rows[idx.clamp(0, max(R - 1, 0))] if R else rows.new_zeros(idx.shape[0], rows.shape[1])
    return torch.where(valid[:, None], picked, picked.new_zeros(()))


def _scatter(y: torch.Tensor, idx: torch.Tensor, num_rows: int, accumulate: bool) -> torch.Tensor:
    rows = _rows(y)
    idx = idx.long()
    keep = (idx >= 0) & (idx < num_rows)
    dtype = rows.dtype if not accumulate or rows.dtype == torch.float64 else torch.float32
    out = rows.new_zeros(num_rows, rows.shape[1], dtype=dtype)
    return out.index_put((idx[keep],), rows[keep].to(dtype), accumulate=accumulate).to(rows.dtype)


def naive_scatter_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows, W]`: zero, with `y_rows[j]` written to row `idx[j]` where `0 <= idx[j] < num_rows`."""
    return _scatter(y, idx, num_rows, accumulate=False)


def naive_scatter_add_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows, W]`: zero, with `y_rows[j]` added to row `idx[j]` (float32 accumulation for half types)."""
    return _scatter(y, idx, num_rows, accumulate=True)


def naive_gather_tokens(x: torch.Tensor, src: torch.Tensor, num_router_heads: int) -> torch.Tensor:
    """`[S, G, D]`: rows `src` of the `[B*T*Hr, G*D]` view of `x [B, T, H, D]` (`G = H / Hr`)."""
    B, T, H, D = x.shape
    G = H // num_router_heads
    return x.reshape(B * T * num_router_heads, G, D)[src.long()]


def naive_scatter_tokens(y: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """`[B, T, Hr*G, D]`: `y[dest[b, t, r]]` in the heads of router head `r`, zero where `dest < 0`."""
    S, G, D = y.shape
    B, T, Hr = dest.shape
    routed = dest >= 0
    out = y.new_zeros(B, T, Hr, G, D)
    return out.index_put(torch.nonzero(routed, as_tuple=True), y[dest[routed].long()]).view(B, T, Hr * G, D)


def naive_copy_blocks(src: torch.Tensor, dst: torch.Tensor, order: torch.Tensor, first: torch.Tensor,
                      count: torch.Tensor, block_size: int) -> None:
    """Twin of `gather_scatter.copy_blocks` (in place): block `first + t` of `dst[b, h]` gets block `order[b, h, t]`
    of `src[b, :, h]` for `t < count[b, h]`; the slots `t >= count` all write into block `first + count` (the
    kernel leaves it untouched; its content is unspecified either way). `dst` must be contiguous."""
    B, H, w = order.shape
    C, W = block_size, dst.shape[-1]
    nb = dst.shape[2] // C
    blocks = dst[:, :, :nb * C].view(B, H, nb, C, W)
    slot = first[..., None] + torch.minimum(torch.arange(w, device=dst.device), count[..., None])
    b = torch.arange(B, device=dst.device)[:, None, None]
    h = torch.arange(H, device=dst.device)[None, :, None]
    blocks[b, h, slot] = src.reshape(B, src.shape[1] // C, C, H, src.shape[-1])[b, order, :, h].to(dst.dtype)


def _chunk_spans(B: int, T: int, cu_seqlens, chunk_size: int):
    """`(b, start, end, block)` of every chunk in fla's order (dense: block `c` of row `b`; packed: the global
    block, the chunks of every sequence in turn)."""
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    spans, i_tg = [], 0
    for b, bos, eos in bounds:
        for c, s in enumerate(range(bos, eos, chunk_size)):
            spans.append((b, s, min(s + chunk_size, eos), c if cu_seqlens is None else i_tg))
            i_tg += 1
    return spans


def naive_masked_write_fwd(k: torch.Tensor, m: torch.Tensor, g: torch.Tensor | None = None, *, chunk_size: int = 64,
                           scale: float = 1.0, cu_seqlens: torch.Tensor | None = None):
    """Twin of `masked_write.masked_write_fwd`: `k·m` in `k`'s dtype (`k [B, T, H, K]` times its block's
    `m [B, N, H]`) and the chunk-local cumulative gate `scale · cumsum(g)` in float32 (float64 for float64 `g`),
    `None` without `g`."""
    B, T = k.shape[:2]
    k_m = torch.empty_like(k)
    gc = None if g is None else torch.empty(g.shape, dtype=torch.promote_types(g.dtype, torch.float32),
                                            device=g.device)
    for b, s, e, blk in _chunk_spans(B, T, cu_seqlens, chunk_size):
        mc = m[b, blk]  # [H]
        k_m[b, s:e] = (k[b, s:e] * mc[:, None]).to(k.dtype)
        if g is not None:
            gc[b, s:e] = g[b, s:e].to(gc.dtype).cumsum(0) * scale
    return k_m, gc


def naive_masked_write_bwd(x, k, m, dh, dk, *, dv=None, dv_add=False, dg=None, dg2=None, g=None, gk=None, z=None,
                           h=None, cu_seqlens=None, chunk_size=64, select=False, dm_out=None):
    """PyTorch twin of `natsl.kernels.masked_write.masked_write_bwd` (same arguments, same in-place updates of `dk`,
    `dv`, `dg`; returns `dm [B * NT, H]` float32, written into `dm_out` if given), one chunk at a time."""
    from natsl.kernels.masked_write import _check_gate_grads

    _check_gate_grads(dg, dg2, g, gk, z, h)
    B, T, H, K = k.shape
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    dm = torch.zeros(m.shape, dtype=torch.float32, device=k.device)
    for i_tg, (b, s, e, c) in enumerate(_chunk_spans(B, T, cu_seqlens, chunk_size)):
        idx = (b, c) if cu_seqlens is None else (0, c)
        D = dh[idx].to(f)  # [H, K, V]
        mh = m[i_tg].to(f)  # [H]
        mc = mh[:, None]
        xc, kc = x[b, s:e].to(f), k[b, s:e].to(f)  # [C, H, *]
        if gk is not None:
            gam = torch.exp2(gk[b, e - 1][None] - gk[b, s:e]).to(f)  # [C, H, K]
        elif g is not None:
            gam = torch.exp2(g[b, e - 1][None] - g[b, s:e]).to(f)[..., None]
        else:
            gam = torch.ones_like(kc[..., :1])
        dkw = torch.einsum("chv,hkv->chk", xc, D) * gam
        kdk = kc * dkw
        dm[i_tg] = (kdk.sum((0, 2)) * (mh if select else 1)).float()
        dk[b, s:e] -= ((1 - mc) * dkw).to(dk.dtype)
        if dv is not None:
            coef = mc if dv_add else mc - 1
            dv[b, s:e] += (coef * torch.einsum("chk,hkv->chv", kc * gam, D)).to(dv.dtype)
        if dg is not None:
            base = dg[b, s:e].to(f)
            if gk is None:  # scalar gates: fla's raw gradient, reverse cumsum here
                base = (base + (0 if dg2 is None else dg2[b, s:e].to(f))).flip(0).cumsum(0).flip(0)
            c_ = (1 - mc) * kdk if gk is not None else (1 - mh) * kdk.sum(-1)
            corr = c_.cumsum(0) - c_
            if z is not None:  # the carried decay's term of chunks that do not decay the carried state
                hdh = (h[idx].to(f) * D).sum(-1)  # [H, K]
                zc = z[i_tg].to(f)[:, None]
                last = gk[b, e - 1].to(f) if gk is not None else g[b, e - 1].to(f)[:, None]
                lt = (1 - zc) * hdh * torch.exp2(last)  # [H, K]
                corr = corr + (lt if gk is not None else lt.sum(-1))
            dg[b, s:e] = (base - corr).to(dg.dtype)
    return dm if dm_out is None else dm_out.copy_(dm)


def naive_norm_merge(o_s: torch.Tensor, o_l: torch.Tensor, w: torch.Tensor, g: torch.Tensor, gamma_s: torch.Tensor,
                     gamma_l: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Twin of `merge.norm_merge`: `(ω_0 γ_s ⊙ RMS(o_s) + ω_1 γ_l ⊙ RMS(o_l)) ⊙ SiLU(g)`, `ω = softmax(w)`,
    computed in at least float32 and returned in `o_s`'s dtype (shapes as there)."""
    ct = torch.promote_types(o_s.dtype, torch.float32)

    def rms(x, gamma):
        x = x.to(ct)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma.to(ct)

    omega = torch.softmax(w.to(ct), dim=-1)
    y = omega[..., 0:1] * rms(o_s, gamma_s) + omega[..., 1:2] * rms(o_l, gamma_l)
    return (y * torch.nn.functional.silu(g.to(ct))).to(o_s.dtype)


def naive_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, soft: torch.Tensor,
                          token_block: torch.Tensor, token_seq: torch.Tensor, *, scale: float,
                          gate: torch.Tensor | None = None, own: bool = True) -> torch.Tensor:
    """Twin of `natsl.kernels.block_attention.block_attention`: dense masked attention, differentiable.

    `q, k [B, T, H, D]`, `v [B, T, H, DV]`, `soft [B, N, Hr]`, `token_block`/`token_seq [T]` (the `BlockLayout`
    fields). A query sees the keys of the softmax blocks of its router head before its block in its sequence, each
    weighted by `gate` (`[B, N, Hr]`, value 1; its gradient is the router gradient), and its own block causally
    (`own`). Rows that see no key give 0. Computed in the inputs' dtype, O(T²) memory.
    """
    B, T, H, _ = q.shape
    Hr = soft.shape[2]
    G = H // Hr
    tb, ts = token_block.to(q.device), token_seq.to(q.device)
    past = (tb[None, :] < tb[:, None]) & (ts[None, :] == ts[:, None])  # [T(q), T(k)]
    w = soft.to(q.dtype) if gate is None else gate.to(q.dtype) * soft.to(q.dtype)
    key_w = w[:, tb].permute(0, 2, 1).repeat_interleave(G, dim=1)  # [B, H, T(k)]
    weight = past * key_w[:, :, None, :]
    if own:
        weight = weight + ((tb[None, :] == tb[:, None]) & torch.ones(T, T, dtype=torch.bool, device=q.device).tril())
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(weight == 0, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m))) * weight
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z == 0, torch.ones_like(z), z)
    return torch.einsum("bhts,bshd->bthd", p, v)
