"""`flex` softmax backend: one FlexAttention call over compacted keys (spec §1.3, §1.5, §1.7, §3.3).

Layout: per head, the keys/values of the softmax blocks of its router head are gathered in block order into a
"compact" segment (`NC` rows: `ceil(N·C / M)·M`, so its length depends on T only, with masked padding slots), and
all keys follow it: `kv = [K_compact | K]`. A query of block `n` sees the compact rows of rank `lo(n) <= j < p(n)`
(the softmax blocks before `n` in its sequence) and, in the second segment, its own block causally (unless
`diagonal="linear"`). That is the whole softmax branch in ONE flex call: no log-sum-exp merge, and no host sync (the
BlockMask comes from `p`, `lo` on the device). The mask tiles are `M`-token squares; tiles of the compact segment
that every query of a tile sees are "full" (no `mask_mod`). natsl builds the BlockMask's tile lists in both
directions itself (cumsum + scatter per router head, no sort) and the `[compact | own]` rows with one fused gather
whose backward is a gather too (each token has at most one compact slot).

Measured on the H200 (benchmarks/RESULTS.md, "the `flex` backend on the H200" and "compiled plan"): T=64k, 12.5%
softmax blocks, paper heads, fwd+bwd 5.28–5.51× faster than dense causal cuDNN attention with q/k/v gradients,
4.27–4.39× with the router gradient (the transposed pass is 3.2 of its ~18 ms); at 16k 1.3–1.5× (router frozen); at
4k the per-call overhead dominates.

Router gradient (`router_grad="selected"`): the softmax gate gradient of spec §1.7 for block `j` is
`Σ_{s∈j} (dv_s·v_s − Σ_t P_ts Δ_t)` over the compact (past) segment, `Δ_t = dO_t·O_t`. The first term comes from the
compact values' gradient (an identity autograd tap on them); the second from a transposed pass (compact keys as
queries, queries as keys, `Δ` as the value, `score − lse_t` as score) whose output times `exp(its lse)` is the sum.
No score bias, so no per-score atomic adds in the backward.

Mask tiles are 128 tokens (or the routing block size when that is a multiple of 128): on torch 2.11 64-token
BlockMask blocks fail to lower (`NoValidChoicesError`, measured on the H200). On CPU the forward without autograd
runs FlexAttention eagerly; with autograd (FlexAttention has no CPU backward) the same layout and mask run as dense
masked attention in PyTorch (O(T·(NC+T)) memory: for tests and small inputs).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

from natsl.kernels.index import blocks_before
from natsl.layers.routing import Routing

logger = logging.getLogger(__name__)
MASK_BLOCK = 128
# Triton tiles for the CUDA kernels (`fwd_` keys: forward only). torch 2.11's default forward tiles for (d=64,
# d_v=128) ask for 234 KB of shared memory on the H200 (limit 227 KB); TMA loads in the forward (-0.3 ms at T=64k)
# and the backward tiles are the fastest of the sets measured there (benchmarks/probe_flex_options.py; each checked
# against the reference). Where TMA cannot be used (alignment), Inductor falls back to plain loads.
KERNEL_OPTIONS = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4, "fwd_USE_TMA": True,
                  "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64,
                  "bwd_num_stages": 3, "bwd_num_warps": 4}
# FlexAttention compiles once per (T, grad mode, output kind): dynamo's default limit of 8 recompiles is reached by
# two sequence lengths in training, after which it runs flex_attention eagerly (dense scores: 40 GB at T=16k)
RECOMPILE_LIMIT = 256
_compiled: dict = {}


def _compiled_fn(fn, dynamic: bool):
    """`fn` compiled by torch.compile (`dynamic` shapes or one graph per shape), cached, under `RECOMPILE_LIMIT`."""
    if (fn, dynamic) not in _compiled:
        compiled = torch.compile(fn, dynamic=dynamic)

        def call(*args, **kwargs):
            with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
                return compiled(*args, **kwargs)
        _compiled[(fn, dynamic)] = call
    return _compiled[(fn, dynamic)]


def _static_compiled(fn):
    """`fn` compiled with static shapes (one graph per T)."""
    return _compiled_fn(fn, dynamic=False)


def _flex_fn(device: torch.device):
    """FlexAttention: compiled (static shapes) on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention
    return _static_compiled(flex_attention) if device.type == "cuda" else flex_attention


_fa4_backend = None  # None: not tried yet; False: unavailable or failed once


def _use_fa4_backend() -> bool:
    """Whether to ask FlexAttention for flash-attn-4's kernels (`kernel_options={"BACKEND": "FLASH"}`)."""
    global _fa4_backend
    if _fa4_backend is None:
        _fa4_backend = (importlib.util.find_spec("flash_attn") is not None
                        and importlib.util.find_spec("flash_attn.cute") is not None)
    return _fa4_backend


def _disable_fa4_backend(err: Exception) -> None:
    global _fa4_backend
    _fa4_backend = False
    logger.warning("FlexAttention with BACKEND='FLASH' (flash-attn-4) failed (%s: %s); using its Triton kernels",
                   type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def mask_block_size(block_size: int) -> int:
    """BlockMask tile for a routing block size: the block itself if a multiple of 128, else 128."""
    return block_size if block_size % MASK_BLOCK == 0 else MASK_BLOCK


def _tile_reduce(x: torch.Tensor, M: int, op: str, pad_value) -> torch.Tensor:
    """Reduce the last dim `[.., T]` over tiles of `M` (the trailing partial tile padded with `pad_value`)."""
    T = x.shape[-1]
    n = -(-T // M)
    if n * M != T:
        x = torch.cat([x, x.new_full((*x.shape[:-1], n * M - T), pad_value)], -1)
    x = x.view(*x.shape[:-1], n, M)
    return getattr(x, op)(-1) if op in ("any", "all") else getattr(x, op)(-1).values


def _layout(routing: Routing, T: int, M: int):
    """Compact-segment metadata (no host sync): per (batch, router head) `p`, `lo [B, Hr, T]` (softmax blocks before
    the token's block, and before its sequence's first block), the compact slots' source tokens `tok` (any token for
    padding slots) and validity `valid [B, Hr, NC]`, the slot ranks' blocks `inv [B, Hr, NC // C + 1]` (`N` =
    padding), every token's compact slot `slot [B, Hr, T]` (`-1` for tokens of linear blocks) and `NC`."""
    NC = _compact_len(routing.layout(T).N, routing.block_size, M)
    return (*_layout_t(*routing_tensors(routing, T), T, M, routing.block_size), NC)


def routing_tensors(routing: Routing, T: int) -> tuple:
    """The routing's tensors that `_layout_t` and `_plan` start from: `(soft [B, N, Hr], block_first, block_len,
    block_start, token_block)` (the last four from its `BlockLayout` of `T` tokens)."""
    lay = routing.layout(T)
    return routing.is_softmax(), lay.block_first, lay.block_len, lay.block_start, lay.token_block


def _compact_len(N: int, C: int, M: int) -> int:
    """Compact slots `NC = ceil(N·C / M)·M`: static (depends on T only)."""
    return -(-N * C // M) * M


def _layout_t(soft, block_first, block_len, block_start, token_block, T: int, M: int, C: int):
    """`_layout` on tensors: `soft [B, N, Hr]` and the routing's `BlockLayout` fields."""
    B, N, Hr = soft.shape
    dev = soft.device
    si = soft.long()
    excl = blocks_before(si)  # [B, N, Hr] softmax blocks before n in its batch row
    nb = torch.arange(N, device=dev)
    first = torch.where(block_first, nb, torch.zeros_like(nb)).cummax(0).values  # first block of n's sequence
    NC = _compact_len(N, C, M)
    R = -(-NC // C)  # slot ranks
    inv = torch.full((B, Hr, R + 1), N, dtype=torch.long, device=dev)
    inv.scatter_(2, torch.where(soft, excl, R).permute(0, 2, 1), nb.view(1, 1, N).expand(B, Hr, N).contiguous())
    inv = inv[..., :R]
    slot = torch.arange(NC, device=dev)
    blk = inv[..., slot // C]  # [B, Hr, NC]
    blk_c = blk.clamp(max=N - 1)
    off = slot % C
    valid = (blk < N) & (off < block_len[blk_c])
    # padding slots read distinct tokens (never visible): one shared source row serialises the gather on the GPU
    tok = torch.where(valid, block_start[blk_c] + off, slot % T)
    tb = token_block
    p = excl[:, tb].permute(0, 2, 1).contiguous()  # [B, Hr, T]
    lo = excl[:, first][:, tb].permute(0, 2, 1).contiguous()
    tok_slot = p * C + (torch.arange(T, device=dev) - block_start[tb])
    tok_slot = torch.where(soft[:, tb].permute(0, 2, 1), tok_slot, -1)
    return p, lo, tok, valid, inv, tok_slot


def _mask_fn(routing: Routing, T: int, G: int, NC: int, p, lo, valid, own_on: bool):
    """`mask_mod(b, h, q_idx, kv_idx)` over `[compact | own]` keys; also works on broadcast index grids."""
    tb = routing.layout(T).token_block
    C = routing.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        r = h // G
        qi = q_idx.clamp(max=T - 1)
        sl = kv_idx.clamp(max=NC - 1)
        j = sl // C
        vis = (kv_idx < NC) & valid[b, r, sl] & (j >= lo[b, r, qi]) & (j < p[b, r, qi])
        if own_on:
            jj = (kv_idx - NC).clamp(min=0, max=T - 1)
            vis = vis | ((kv_idx >= NC) & (tb[jj] == tb[qi]) & (jj <= q_idx))
        return vis

    return mask_mod


def block_mask_tensors(routing: Routing, T: int, M: int):
    """`(partial, full)` bool `[B, Hr, nq, nk]` over `M`-token tiles of queries × `[compact | own]` keys (no host sync).

    `partial | full` covers every visible (query, key) pair; `full` tiles are visible in every pair. `nq =
    ceil(T/M)`, `nk = NC/M + ceil(T/M)` (`NC/M` without the own segment, `diagonal="linear"`).
    """
    p, lo, _, valid, _, _, NC = _layout(routing, T, M)
    lay = routing.layout(T)
    return _tiles_t(p, lo, valid, lay.block_start, lay.token_block, T, M, routing.block_size, NC,
                    routing.diagonal != "linear")


def _tiles_t(p, lo, valid, block_start, token_block, T: int, M: int, C: int, NC: int, own_on: bool):
    """`block_mask_tensors` on tensors. One elementwise expression over all `nk` key tiles (the compact tiles, then
    the own ones), no `torch.cat`: Inductor (torch 2.11, CUDA) failed to generate code for the concatenated form at
    T=65536 ("list indices must be integers or slices, not NoneType"), measured on the H200."""
    big = torch.iinfo(torch.long).max
    dev = p.device
    nq, nkc = -(-T // M), NC // M
    p_max, p_min = _tile_reduce(p, M, "max", 0), _tile_reduce(p, M, "min", big)
    lo_max, lo_min = _tile_reduce(lo, M, "max", -1), _tile_reduce(lo, M, "min", big)
    col = torch.arange(nkc + nq if own_on else nkc, device=dev)  # key tile
    m = col.clamp(max=nkc - 1)  # its compact tile (own tiles: any, masked below)
    r0, r1 = m * M // C, ((m + 1) * M - 1) // C  # slot ranks a compact tile holds
    v_any, v_all = _tile_reduce(valid, M, "any", False)[..., m], _tile_reduce(valid, M, "all", True)[..., m]
    complete = torch.arange(nq, device=dev) * M + M <= T
    anyv = (r0 < p_max[..., None]) & (r1 >= lo_min[..., None]) & v_any[:, :, None, :]
    full = ((r0 >= lo_max[..., None]) & (r1 < p_min[..., None]) & v_all[:, :, None, :]
            & complete[None, None, :, None])
    if own_on:
        is_c = col < nkc
        first_tile = block_start[_tile_reduce(token_block, M, "min", big)] // M  # [nq]
        k = (col - nkc).clamp(min=0)  # own tile
        qt = torch.arange(nq, device=dev)[:, None]
        own = (k[None, :] <= qt) & (k[None, :] >= first_tile[:, None])  # [q tile, key tile]
        anyv = torch.where(is_c, anyv, own)
        full = full & is_c
    return anyv & ~full, full


def _flex_lse(flex, q, k, v, **kw):
    """`(o, lse)` of a FlexAttention call: `return_aux=AuxRequest(lse=True)` where torch has it, else the older
    `return_lse=True`."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, return_lse=True, **kw)
    out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **kw)
    return out, aux.lse


def _kv_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(num [.., R] int32, indices [.., R, n] int32)`: the true columns of every row of `mask [.., R, n]` first, in
    order (the rest 0). A cumsum and a scatter: no sort."""
    n = mask.shape[-1]
    pos = torch.cumsum(mask, -1, dtype=torch.int32)
    num = pos[..., -1].contiguous()
    idx = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    cols = torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape)
    idx.scatter_(-1, torch.where(mask, pos - 1, n).long(), cols)  # the false entries all land in column n
    return num, idx[..., :n]


def _tile_lists(partial, full, G: int, nkc: int, with_t: bool):
    """The BlockMask lists of `partial`/`full` `[B, Hr, nq, nk]` tiles, per router head and repeated for its `G`
    heads: `kv` and `qs` (`[num, idx, full_num, full_idx]` each direction) and, with `with_t`, those of the transposed
    gate pass over the first `nkc` key tiles (cut from the same lists), else `None, None`."""
    kv = _kv_lists(partial) + _kv_lists(full)
    qs = _kv_lists(partial.transpose(-1, -2)) + _kv_lists(full.transpose(-1, -2))
    kv, qs = [[x.repeat_interleave(G, dim=1) for x in lists] for lists in (kv, qs)]
    if not with_t:
        return kv, qs, None, None
    # transposed: queries = the compact tiles (rows :nkc of the q lists), keys = the query tiles; its q lists are
    # the kv lists cut to the compact columns (they come first in each sorted row)
    c_num = [partial[..., :nkc].sum(-1, dtype=torch.int32), full[..., :nkc].sum(-1, dtype=torch.int32)]
    c_num = [x.repeat_interleave(G, dim=1) for x in c_num]
    t_kv = [qs[0][..., :nkc], qs[1][..., :nkc, :], qs[2][..., :nkc], qs[3][..., :nkc, :]]
    t_qs = [c_num[0], kv[1][..., :nkc], c_num[1], kv[3][..., :nkc]]
    return kv, qs, t_kv, t_qs


def _make_block_mask(kv, qs, M: int, mask_mod, seq_lengths):
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask(seq_lengths=seq_lengths, kv_num_blocks=kv[0], kv_indices=kv[1], full_kv_num_blocks=kv[2],
                     full_kv_indices=kv[3], q_num_blocks=qs[0], q_indices=qs[1], full_q_num_blocks=qs[2],
                     full_q_indices=qs[3], BLOCK_SIZE=(M, M), mask_mod=mask_mod)


def _plan(soft, block_first, block_len, block_start, token_block, T: int, M: int, C: int, H: int, own_on: bool,
          with_t: bool):
    """Every tensor one flex call derives from the routing (layout, tile lists, gather rows): a pure function of
    tensors (~250 small ops eager; Inductor compiles it to the same result, tested on CPU; see `_run_plan`)."""
    p, lo, tok, valid, inv, tok_slot = _layout_t(soft, block_first, block_len, block_start, token_block, T, M, C)
    NC = _compact_len(soft.shape[1], C, M)
    G = H // soft.shape[2]
    partial, full = _tiles_t(p, lo, valid, block_start, token_block, T, M, C, NC, own_on)
    kv, qs, t_kv, t_qs = _tile_lists(partial, full, G, NC // M, with_t)
    src, back_comp, back_own = _row_plan(tok, tok_slot, T, H, G, own_on)
    return p, lo, valid, inv, kv, qs, t_kv, t_qs, src, back_comp, back_own


_compiled_plan_ok = True  # False after a compile failure: `_plan` runs eagerly from then on


def _run_plan(compiled: bool, *args):
    """`_plan(*args)`, compiled by Inductor (static shapes: one graph per T) when `compiled` (natsl does so on CUDA:
    ~250 small ops become a few kernels; measured on the H200 at T=16k, fwd+bwd 6.01 -> 2.92 ms). If compiling
    fails, logs a warning and runs `_plan` eagerly (the same function) for this and every later call."""
    global _compiled_plan_ok
    if compiled and _compiled_plan_ok:
        try:
            return _static_compiled(_plan)(*args)
        except Exception as e:  # an Inductor/dynamo failure: the eager function gives the same tensors
            _compiled_plan_ok = False
            logger.warning("flex: compiling the routing plan failed (%s: %s); running it eagerly (slower per call)",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return _plan(*args)


def _dense_attention(q, k, v, mask_mod, scale, key_bias=None):
    """Dense masked attention with FlexAttention's semantics: `(o, lse)`, zero / −inf for rows without keys.
    `key_bias [B, H, Lk]` is added to every score of its key (what the transposed gate pass's `score_mod` does)."""
    B, H, Lq, _ = q.shape
    ar = torch.arange
    dev = q.device
    vis = mask_mod(ar(B, device=dev).view(B, 1, 1, 1), ar(H, device=dev).view(1, H, 1, 1),
                   ar(Lq, device=dev).view(1, 1, Lq, 1), ar(k.shape[2], device=dev).view(1, 1, 1, -1))
    s = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias[:, :, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    lse = s.logsumexp(-1)
    fin = torch.isfinite(lse)
    pr = torch.exp(s - torch.where(fin, lse, torch.zeros_like(lse))[..., None])
    return pr @ v, lse


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dt = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dt) * b.to(dt)).sum(-1)


def _cuda_compiled(fn):
    """`fn` fused by torch.compile (dynamic shapes) for CUDA tensors; `fn` itself elsewhere."""
    def call(*args):
        return _compiled_fn(fn, dynamic=True)(*args) if args[0].device.type == "cuda" else fn(*args)
    return call


def _head_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_d a·b` of `[.., D]` tensors → `[..]` in at least float32: one fused kernel on CUDA (no full-size float32
    temporaries), eager elsewhere."""
    return _cuda_compiled(_dots)(a, b)


class _Rows(torch.autograd.Function):
    """`x [B, T, H, D]` → `[B, H, L, D]` (a transposed view of `[B, L, H, D]`): row `src[(b·L + l)·H + h]` of `x`
    viewed as `[B·T·H, D]`, one gather for the compact and own segments (token-major, so `x` is read nearly
    contiguously). Each row of `x` lands in at most one compact slot
    (`back_comp`, `-1`: none) and at most once in the own segment (`back_own`, or `None`), so the backward is two
    gathers, not torch.gather's scatter-add (which serialised on padding slots: 19.7 ms at T=64k on the H200)."""

    @staticmethod
    def forward(ctx, x, src, back_comp, back_own, L):
        B, T, H, D = x.shape
        ctx.save_for_backward(back_comp, back_own)
        ctx.x_shape = x.shape
        return _cuda_compiled(_rows_fwd)(x, src).view(B, L, H, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        back_comp, back_own = ctx.saved_tensors
        dx = _cuda_compiled(_rows_back)(dout.transpose(1, 2), back_comp, back_own)
        return dx.view(ctx.x_shape), None, None, None, None


def _rows_fwd(x, src):
    """Rows `src` of `x [.., D]` viewed as `[R, D]` (fused by Inductor on CUDA: aten's index_select ran at ~0.6 TB/s
    here on the H200)."""
    return x.reshape(-1, x.shape[-1])[src]


def _rows_back(d, back_comp, back_own):
    """`d [B, L, H, D]` → `[B·T·H, D]`: rows `back_comp` of `d` (zero where `-1`) `+` rows `back_own` (if not None)."""
    d = d.reshape(-1, d.shape[-1])
    dx = torch.where((back_comp >= 0)[:, None], d[back_comp.clamp(min=0)], 0)
    return dx if back_own is None else dx + d[back_own]


def _row_plan(tok, tok_slot, T: int, H: int, G: int, own_on: bool):
    """Row indices of `_Rows` for `[compact | own]` keys: `(src [B·L·H], back_comp [B·T·H], back_own [B·T·H] | None)`
    from the compact slots' tokens `tok [B, Hr, NC]` and the tokens' slots `tok_slot [B, Hr, T]`."""
    B, _, NC = tok.shape
    dev = tok.device
    L = NC + T if own_on else NC
    b = torch.arange(B, device=dev).view(B, 1, 1)
    h = torch.arange(H, device=dev).view(1, 1, H)
    t = torch.arange(T, device=dev).view(1, T, 1)
    seg = tok.repeat_interleave(G, 1).transpose(1, 2)  # [B, NC, H]
    if own_on:
        seg = torch.cat([seg, t.expand(B, T, H)], 1)
    src = ((b * T + seg) * H + h).reshape(-1)
    slot = tok_slot.repeat_interleave(G, 1).transpose(1, 2)  # [B, T, H]
    back_comp = torch.where(slot >= 0, (b * L + slot) * H + h, -1).reshape(-1)
    back_own = ((b * L + NC + t) * H + h).expand(B, T, H).reshape(-1) if own_on else None
    return src, back_comp, back_own


class _Shared:
    """What the two gate-gradient taps pass each other within one backward."""

    term2 = None


class _GateOut(torch.autograd.Function):
    """Identity on the output; its backward (run before the attention's) computes `Σ_t P_ts Δ_t` per compact key."""

    @staticmethod
    def forward(ctx, o, lse, shared, transposed):
        ctx.save_for_backward(o, lse)
        ctx.shared, ctx.transposed = shared, transposed
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        o, lse = ctx.saved_tensors
        with torch.no_grad():
            delta = _head_dots(do, o)  # [B, H, T]
            ctx.shared.term2 = ctx.transposed(delta, lse.to(delta.dtype))  # [B, H, NC]
        return do, None, None, None


class _GateTap(torch.autograd.Function):
    """Identity on the `[compact | own]` values; its backward (run after the attention's) forms the softmax gate gradient
    `Σ_{s∈j} (dv_s·v_s − Σ_t P_ts Δ_t)` per (batch, block, router head)."""

    @staticmethod
    def forward(ctx, v_all, gate, shared, inv, G, C, NC):
        ctx.save_for_backward(v_all, inv)
        ctx.shared, ctx.G, ctx.C, ctx.NC, ctx.gate_shape, ctx.gate_dtype = shared, G, C, NC, gate.shape, gate.dtype
        return v_all.view_as(v_all)

    @staticmethod
    def backward(ctx, dv_all):
        v_all, inv = ctx.saved_tensors
        B, N, Hr = ctx.gate_shape
        NC = ctx.NC
        with torch.no_grad():
            # dv_s·v_s − Σ_t P_ts Δ_t over the compact slots [B, H, NC]
            per_slot = _head_dots(dv_all[:, :, :NC], v_all[:, :, :NC]).double() - ctx.shared.term2.double()
            per_rank = torch.nn.functional.pad(per_slot, (0, inv.shape[-1] * ctx.C - NC))
            per_rank = per_rank.view(B, Hr, ctx.G, -1, ctx.C).sum((2, 4))  # [B, Hr, R]
            dgate = torch.zeros(B, Hr, N + 1, dtype=torch.float64, device=dv_all.device)
            dgate.scatter_add_(2, inv, per_rank)
            dgate = dgate[..., :N].permute(0, 2, 1).to(ctx.gate_dtype)
        ctx.shared.term2 = None
        return dv_all, dgate, None, None, None, None, None


class FlexSoftmax:
    """Softmax branch over FlexAttention: one block-sparse call over `[compacted softmax keys | all keys]`.

    Args:
        mask_block (int, Optional): BlockMask tile in tokens. Default: `mask_block_size(block_size)` (128 unless
            the routing block is a multiple of 128).
        kernel_options (dict, Optional): FlexAttention kernel options on CUDA. Default: `KERNEL_OPTIONS` for
            fp16/bf16 inputs (measured on the H200), FlexAttention's own per-dtype defaults for float32 (natsl's
            tiles were sized for 16-bit shared memory; float32 flex has not run on the H200).
        use_fa4 (bool): for forward-only calls (no grad), ask FlexAttention for flash-attn-4's kernels
            (`kernel_options={"BACKEND": "FLASH"}`) when flash-attn-4 is installed, falling back to Triton on a
            lowering error. Off by default: not verified on the H200 (flash-attn-4 4.0.0b36's sm90 backward failed
            natsl's checks elsewhere). Default: `False`.
    """

    name = "flex"

    def __init__(self, mask_block: int | None = None, kernel_options: dict | None = None, use_fa4: bool = False):
        if mask_block is not None and (not isinstance(mask_block, int) or mask_block < 1):
            raise ValueError(f"mask_block must be a positive int or None, got {mask_block!r}")
        self.mask_block = mask_block
        self.kernel_options = None if kernel_options is None else dict(kernel_options)
        self.use_fa4 = use_fa4

    def not_supported_reasons(self, q, k, v, routing: Routing, router_grad: str = "selected") -> list[str]:
        reasons = []
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError:
            reasons.append(f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)")
        if q.device.type not in ("cpu", "cuda"):
            reasons.append(f"FlexAttention does not run on {q.device.type}")
        M = self.mask_block or mask_block_size(routing.block_size)
        if q.device.type == "cuda" and M % MASK_BLOCK:
            reasons.append(f"BlockMask blocks of {M} tokens fail to lower on CUDA (torch 2.11: NoValidChoicesError); "
                           f"use a multiple of {MASK_BLOCK}")
        if router_grad == "both" and routing.weights.requires_grad and torch.is_grad_enabled():
            reasons.append("flex computes the softmax-gate gradient of selected (softmax) blocks only: "
                           "router_grad='both' also needs it for unselected blocks (use backend='sdpa')")
        return reasons

    def options_for(self, dtype: torch.dtype) -> dict | None:
        """The kernel options of a CUDA call in `dtype` (`None`: FlexAttention's defaults)."""
        if self.kernel_options is not None:
            return self.kernel_options
        return dict(KERNEL_OPTIONS) if dtype in (torch.float16, torch.bfloat16) else None

    def _attend(self, q, k, v, mask_mod, block_mask, scale, needs_grad, return_lse=False):
        """FlexAttention (CUDA, or CPU without autograd) or its dense twin (CPU with autograd): `o` or `(o, lse)`."""
        if q.device.type != "cuda" and needs_grad:
            o, lse = _dense_attention(q, k, v, mask_mod, scale)
            return (o, lse) if return_lse else o
        flex = _flex_fn(q.device)
        call = (lambda *a, **kw: _flex_lse(flex, *a, **kw)) if return_lse else flex
        kw = dict(block_mask=block_mask, scale=scale)
        if self.use_fa4 and q.device.type == "cuda" and not needs_grad and _use_fa4_backend():
            try:
                return call(q, k, v, **kw, kernel_options={"BACKEND": "FLASH"})
            except Exception as e:  # any lowering failure: fall back to the Triton kernels, once
                _disable_fa4_backend(e)
        opts = self.options_for(q.dtype)
        if q.device.type == "cuda" and opts is not None:
            kw["kernel_options"] = opts
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return call(q, k, v, **kw)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]` (no host sync)."""
        B, T, H, d = q.shape
        Hr = routing.num_router_heads
        G = H // Hr
        C = routing.block_size
        M = self.mask_block or mask_block_size(C)
        own_on = routing.diagonal != "linear"
        gate = routing.gates(router_grad)[0]
        gate_grad = torch.is_grad_enabled() and gate.requires_grad
        needs_grad = torch.is_grad_enabled() and (gate_grad or any(x.requires_grad for x in (q, k, v)))
        lay = routing.layout(T)
        NC = _compact_len(lay.N, C, M)
        L = NC + T if own_on else NC
        p, lo, valid, inv, kv, qs, t_kv, t_qs, src, back_comp, back_own = _run_plan(
            q.device.type == "cuda", *routing_tensors(routing, T), T, M, C, H, own_on, gate_grad)
        mask_mod = _mask_fn(routing, T, G, NC, p, lo, valid, own_on)
        block_mask = _make_block_mask(kv, qs, M, mask_mod, (T, L))
        t_mask = _transposed_mask(mask_mod) if gate_grad else None
        t_block = _make_block_mask(t_kv, t_qs, M, t_mask, (NC, T)) if gate_grad else None

        qt = q.transpose(1, 2)  # [B, H, T, d]
        k_all, v_all = (_Rows.apply(x, src, back_comp, back_own, L) for x in (k, v))  # [B, H, L, *]
        shared = _Shared()
        if not gate_grad:
            return self._attend(qt, k_all, v_all, mask_mod, block_mask, scale, needs_grad).transpose(1, 2)
        v_all = _GateTap.apply(v_all, gate, shared, inv, G, C, NC)
        o, lse = self._attend(qt, k_all, v_all, mask_mod, block_mask, scale, needs_grad, return_lse=True)
        kc_d, qt_d = k_all[:, :, :NC].detach(), qt.detach()
        use_flex = q.device.type == "cuda"

        def transposed(delta, lse_f):
            return gate_key_sums(kc_d, qt_d, delta, lse_f, t_mask, t_block, scale, use_flex)

        o = _GateOut.apply(o, lse.detach(), shared, transposed)
        return o.transpose(1, 2)


def gate_key_sums(kc, qt, delta, lse, t_mask, t_block, scale: float, use_flex: bool) -> torch.Tensor:
    """`Σ_t exp(q_t·k_s·scale − lse_t) Δ_t` over the queries `t` that see compact key `s` (`t_mask(b, h, s, t)`):
    `[B, H, NC]`. One attention pass with the compact keys `kc [B, H, NC, d]` as queries, the queries `qt [B, H, T,
    d]` as keys, `Δ [B, H, T]` as the value and `−lse_t` added to the scores: its output times `exp(its LSE)` is the
    sum. FlexAttention in the inputs' dtype (`t_block` its BlockMask) or dense attention in float64."""
    fin = torch.isfinite(lse)
    lse_safe = torch.where(fin, lse, torch.zeros_like(lse))
    vals = torch.nn.functional.pad(torch.where(fin, delta, torch.zeros_like(delta))[..., None], (0, 15))
    if use_flex:
        T = lse.shape[-1]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - lse_safe[b, h, kv_idx.clamp(max=T - 1)]

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out, l2 = _flex_lse(_flex_fn(kc.device), kc, qt, vals.to(kc.dtype), score_mod=score_mod,
                                block_mask=t_block, scale=scale)
    else:
        out, l2 = _dense_attention(kc.double(), qt.double(), vals.double(), t_mask, scale, -lse_safe.double())
    fin2 = torch.isfinite(l2)
    sums = out[..., 0].to(l2.dtype) * torch.exp(torch.where(fin2, l2, torch.zeros_like(l2)))
    return torch.where(fin2, sums, torch.zeros_like(sums))


def _transposed_mask(mask_mod):
    def t_mask(b, h, s_idx, t_idx):
        return mask_mod(b, h, t_idx, s_idx)
    return t_mask
