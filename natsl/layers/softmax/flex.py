"""`flex` softmax backend: one FlexAttention call over compacted keys (spec §1.3, §1.5, §1.7, §3.3).

Layout: per head, the keys/values of the softmax blocks of its router head are gathered in block order into a
"compact" segment (`NC` rows: `ceil(N·C / M)·M`, so its length depends on T only, with masked padding slots), and
all keys follow it: `kv = [K_compact | K]`. A query of block `n` sees the compact rows of rank `lo(n) <= j < p(n)`
(the softmax blocks before `n` in its sequence) and, in the second segment, its own block causally (unless
`diagonal="linear"`). That is the whole softmax branch in ONE flex call: no log-sum-exp merge, and no host sync (the
BlockMask comes from `p`, `lo` on the device). The mask tiles are `M`-token squares; tiles of the compact segment
that every query of a tile sees are "full" (no `mask_mod`).

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

from natsl.layers.routing import Routing

logger = logging.getLogger(__name__)
MASK_BLOCK = 128
# Triton tiles for the CUDA kernels: torch 2.11's default forward tiles for (d=64, d_v=128) ask for 234 KB of
# shared memory on the H200 (limit 227 KB); these run (bf16 fwd + bwd checked against the reference there).
KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4,
                  "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
_compiled_flex = None


def _flex_fn(device: torch.device):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


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
    the token's block, and before its sequence's first block), the compact slots' source tokens `tok` and validity
    `valid [B, Hr, NC]`, the slot ranks' blocks `inv [B, Hr, NC // C + 1]` (`N` = padding) and `NC`."""
    lay = routing.layout(T)
    soft = routing.is_softmax()  # [B, N, Hr]
    B, N, Hr = soft.shape
    C = routing.block_size
    dev = soft.device
    si = soft.long()
    excl = torch.cumsum(si, 1) - si  # [B, N, Hr] softmax blocks before n in its batch row
    nb = torch.arange(N, device=dev)
    first = torch.where(lay.block_first, nb, torch.zeros_like(nb)).cummax(0).values  # first block of n's sequence
    NC = -(-N * C // M) * M
    R = -(-NC // C)  # slot ranks
    inv = torch.full((B, Hr, R + 1), N, dtype=torch.long, device=dev)
    inv.scatter_(2, torch.where(soft, excl, R).permute(0, 2, 1), nb.view(1, 1, N).expand(B, Hr, N).contiguous())
    inv = inv[..., :R]
    slot = torch.arange(NC, device=dev)
    blk = inv[..., slot // C]  # [B, Hr, NC]
    blk_c = blk.clamp(max=N - 1)
    off = slot % C
    valid = (blk < N) & (off < lay.block_len[blk_c])
    tok = torch.where(valid, lay.block_start[blk_c] + off, torch.zeros_like(blk))
    tb = lay.token_block
    p = excl[:, tb].permute(0, 2, 1).contiguous()  # [B, Hr, T]
    lo = excl[:, first][:, tb].permute(0, 2, 1).contiguous()
    return p, lo, tok, valid, inv, NC


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


def block_mask_tensors(routing: Routing, T: int, M: int, p=None, lo=None, valid=None, NC=None):
    """`(partial, full)` bool `[B, Hr, nq, nk]` over `M`-token tiles of queries × `[compact | own]` keys (no host sync).

    `partial | full` covers every visible (query, key) pair; `full` tiles are visible in every pair. `nq =
    ceil(T/M)`, `nk = NC/M + ceil(T/M)` (`NC/M` without the own segment, `diagonal="linear"`).
    """
    if p is None:
        p, lo, _, valid, _, NC = _layout(routing, T, M)
    lay = routing.layout(T)
    C = routing.block_size
    big = torch.iinfo(torch.long).max
    dev = p.device
    nq, nkc = -(-T // M), NC // M
    p_max, p_min = _tile_reduce(p, M, "max", 0), _tile_reduce(p, M, "min", big)
    lo_max, lo_min = _tile_reduce(lo, M, "max", -1), _tile_reduce(lo, M, "min", big)
    m = torch.arange(nkc, device=dev)
    r0, r1 = m * M // C, ((m + 1) * M - 1) // C  # slot ranks a compact tile holds
    v_any, v_all = _tile_reduce(valid, M, "any", False), _tile_reduce(valid, M, "all", True)  # [B, Hr, nkc]
    complete = torch.arange(nq, device=dev) * M + M <= T
    anyv = (r0 < p_max[..., None]) & (r1 >= lo_min[..., None]) & v_any[:, :, None, :]
    full = ((r0 >= lo_max[..., None]) & (r1 < p_min[..., None]) & v_all[:, :, None, :]
            & complete[None, None, :, None])
    if routing.diagonal != "linear":
        first_tile = lay.block_start[_tile_reduce(lay.token_block, M, "min", big)] // M  # [nq]
        k = torch.arange(nq, device=dev)
        own = (k[None, :] <= k[:, None]) & (k[None, :] >= first_tile[:, None])  # [q tile, own tile]
        B, Hr = p.shape[:2]
        anyv = torch.cat([anyv, own.expand(B, Hr, nq, nq)], -1)
        full = torch.cat([full, torch.zeros_like(own).expand(B, Hr, nq, nq)], -1)
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
    """`(num [.., Tq] int32, indices [.., Tq, Tk] int32)`: the true columns of every row first, in order."""
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def _block_mask(partial, full, G, M, mask_mod, lengths):
    from torch.nn.attention.flex_attention import BlockMask

    # lists per router head, then repeated for its G heads: [B, H, nq(, nk)]
    kv_num, kv_idx, full_num, full_idx = (x.repeat_interleave(G, dim=1) for x in (*_kv_lists(partial),
                                                                                 *_kv_lists(full)))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=M, mask_mod=mask_mod,
                                    seq_lengths=lengths)


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


def _head_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ_d a·b` of `[B, H, L, D]` tensors → `[B, H, L]` in at least float32, one head at a time (no full-size
    float32 temporaries)."""
    dt = torch.promote_types(a.dtype, torch.float32)
    return torch.stack([(a[:, h].to(dt) * b[:, h].to(dt)).sum(-1) for h in range(a.shape[1])], 1)


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
    """Identity on the compact values; its backward (run after the attention's) forms the softmax gate gradient
    `Σ_{s∈j} (dv_s·v_s − Σ_t P_ts Δ_t)` per (batch, block, router head)."""

    @staticmethod
    def forward(ctx, vc, gate, shared, inv, G, C):
        ctx.save_for_backward(vc, inv)
        ctx.shared, ctx.G, ctx.C, ctx.gate_shape, ctx.gate_dtype = shared, G, C, gate.shape, gate.dtype
        return vc.view_as(vc)

    @staticmethod
    def backward(ctx, dvc):
        vc, inv = ctx.saved_tensors
        B, N, Hr = ctx.gate_shape
        with torch.no_grad():
            per_slot = _head_dots(dvc, vc).double() - ctx.shared.term2.double()  # dv_s·v_s − Σ_t P_ts Δ_t [B, H, NC]
            NC = per_slot.shape[-1]
            per_rank = torch.nn.functional.pad(per_slot, (0, inv.shape[-1] * ctx.C - NC))
            per_rank = per_rank.view(B, Hr, ctx.G, -1, ctx.C).sum((2, 4))  # [B, Hr, R]
            dgate = torch.zeros(B, Hr, N + 1, dtype=torch.float64, device=dvc.device)
            dgate.scatter_add_(2, inv, per_rank)
            dgate = dgate[..., :N].permute(0, 2, 1).to(ctx.gate_dtype)
        ctx.shared.term2 = None
        return dvc, dgate, None, None, None, None


class FlexSoftmax:
    """Softmax branch over FlexAttention: one block-sparse call over `[compacted softmax keys | all keys]`.

    Args:
        mask_block (int, Optional): BlockMask tile in tokens. Default: `mask_block_size(block_size)` (128 unless
            the routing block is a multiple of 128).
        kernel_options (dict, Optional): FlexAttention kernel options on CUDA. Default: `KERNEL_OPTIONS`.
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
        self.kernel_options = dict(KERNEL_OPTIONS if kernel_options is None else kernel_options)
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
        if q.device.type == "cuda":
            kw["kernel_options"] = self.kernel_options
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return call(q, k, v, **kw)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]` (no host sync)."""
        B, T, H, d = q.shape
        dv = v.shape[-1]
        Hr = routing.num_router_heads
        G = H // Hr
        C = routing.block_size
        M = self.mask_block or mask_block_size(C)
        own_on = routing.diagonal != "linear"
        p, lo, tok, valid, inv, NC = _layout(routing, T, M)
        mask_mod = _mask_fn(routing, T, G, NC, p, lo, valid, own_on)
        partial, full = block_mask_tensors(routing, T, M, p, lo, valid, NC)
        L = NC + T if own_on else NC
        block_mask = _block_mask(partial, full, G, M, mask_mod, (T, L))
        gate = routing.gates(router_grad)[0]
        gate_grad = torch.is_grad_enabled() and gate.requires_grad
        needs_grad = torch.is_grad_enabled() and (gate_grad or any(x.requires_grad for x in (q, k, v)))

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
        idx = tok.repeat_interleave(G, dim=1)[..., None]  # [B, H, NC, 1]
        kc = torch.gather(kt, 2, idx.expand(-1, -1, -1, d))
        vc = torch.gather(vt, 2, idx.expand(-1, -1, -1, dv))
        shared = _Shared()
        if gate_grad:
            vc = _GateTap.apply(vc, gate, shared, inv, G, C)
        k_all = torch.cat([kc, kt], 2) if own_on else kc
        v_all = torch.cat([vc, vt], 2) if own_on else vc
        if not gate_grad:
            return self._attend(qt, k_all, v_all, mask_mod, block_mask, scale, needs_grad).transpose(1, 2)

        o, lse = self._attend(qt, k_all, v_all, mask_mod, block_mask, scale, needs_grad, return_lse=True)
        t_mask = _transposed_mask(mask_mod)
        t_block = _block_mask(partial[..., :NC // M].transpose(-1, -2), full[..., :NC // M].transpose(-1, -2), G, M,
                              t_mask, (NC, T))
        kc_d, qt_d = kc.detach(), qt.detach()
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
