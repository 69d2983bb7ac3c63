"""`flex` softmax backend: FlexAttention with a BlockMask built on the device (spec §1.3, §1.5, §1.7, §3.3).

The BlockMask is computed from the routing without host syncs: a mask tile pair is skipped when no query of
the tile can see a key of the other, "full" when every pair is visible, and partial (the exact `mask_mod` is
evaluated) otherwise. Router gradient: a zero-valued per-(batch, router head, block) score bias on past keys,
whose gradient is the spec §1.7 softmax gate gradient at m = 1 (so `router_grad="selected"` only).

Mask tiles are 128 tokens (or the routing block size when that is a multiple of 128): on torch 2.11 64-token
BlockMask blocks fail to lower (`NoValidChoicesError`, measured on the H200 with and without explicit tile
options), so 64-token routing blocks run on 128-token mask tiles whose mixed tiles are partial (exact through
`mask_mod`, at up to 2x the visible pairs' work). On CPU FlexAttention runs forward only (eager, unfused, and
it ignores the BlockMask's block lists: `block_mask_tensors` is tested on its own); on CUDA a module-level
`torch.compile(flex_attention)` is used.

Known cost (H200, torch 2.11, T=64k): the router-gradient bias makes Inductor's backward accumulate the bias
gradient with one atomic add per visible score into a few per-block scalars: fwd+bwd 1.5 s instead of ~25 ms.
Use `flash` (the `auto` choice on CUDA) for training with router gradients.
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


def block_mask_tensors(routing: Routing, T: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(partial, full)` bool `[B, Hr, Tq, Tk]` over mask tiles of `M` tokens (`Tq = Tk = ceil(T/M)`); no host sync.

    `partial | full` covers every (query, key) pair the routing lets the softmax branch see; `full` tiles are
    visible in every pair (conservative where routing blocks straddle tiles: those tiles are partial).
    """
    lay = routing.layout(T)
    tb, ts = lay.token_block, lay.token_seq
    big = torch.iinfo(torch.long).max
    tok_soft = routing.token_mask(T).permute(0, 2, 1)  # [B, Hr, T]
    soft_any = _tile_reduce(tok_soft, M, "any", False)  # [B, Hr, n]
    soft_all = _tile_reduce(tok_soft, M, "all", True)
    seq_min, seq_max = _tile_reduce(ts, M, "min", big), _tile_reduce(ts, M, "max", -1)
    blk_min, blk_max = _tile_reduce(tb, M, "min", big), _tile_reduce(tb, M, "max", -1)
    n = seq_min.shape[0]
    complete = torch.arange(n, device=tb.device) * M + M <= T
    i = torch.arange(n, device=tb.device)
    causal = i[None, :] <= i[:, None]  # [q tile, k tile]
    # some key of the k tile lies in an earlier block of the same sequence as some query of the q tile
    past_possible = causal & (seq_max[None, :] >= seq_min[:, None]) & (blk_min[None, :] < blk_max[:, None])
    anyv = past_possible[None, None] & soft_any[:, :, None, :]
    if routing.diagonal != "linear":
        own_possible = causal & (blk_max[None, :] >= blk_min[:, None])
        anyv = anyv | own_possible[None, None]
    full_pair = ((i[None, :] < i[:, None]) & (seq_min[None, :] == seq_max[:, None]) & (blk_max[None, :] < blk_min[:, None])
                 & complete[None, :] & complete[:, None])
    full = full_pair[None, None] & soft_all[:, :, None, :]
    return anyv & ~full, full


def _kv_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(num [.., Tq] int32, indices [.., Tq, Tk] int32)`: the true columns of every row first, in order."""
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num, idx


class FlexSoftmax:
    """Softmax branch over FlexAttention (block-sparse; CUDA fwd + bwd, CPU forward only).

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
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, routing.weights))
        if q.device.type == "cpu" and needs_grad:
            reasons.append("FlexAttention has no backward on CPU (inputs or routing require grad)")
        elif q.device.type not in ("cpu", "cuda"):
            reasons.append(f"FlexAttention does not run on {q.device.type}")
        M = self.mask_block or mask_block_size(routing.block_size)
        if q.device.type == "cuda" and M % MASK_BLOCK:
            reasons.append(f"BlockMask blocks of {M} tokens fail to lower on CUDA (torch 2.11: NoValidChoicesError); "
                           f"use a multiple of {MASK_BLOCK}")
        if router_grad == "both" and routing.weights.requires_grad and torch.is_grad_enabled():
            reasons.append("flex's score-bias gate gradient covers selected (softmax) blocks only: router_grad='both' "
                           "also needs it for unselected blocks (use backend='sdpa')")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]`."""
        from torch.nn.attention.flex_attention import BlockMask
        B, T, H, _ = q.shape
        Hr = routing.num_router_heads
        G = H // Hr
        lay = routing.layout(T)
        tb, ts = lay.token_block, lay.token_seq
        soft = routing.is_softmax()  # [B, N, Hr]
        own_on = routing.diagonal != "linear"

        def mask_mod(b, h, q_idx, kv_idx):
            qb, kb = tb[q_idx], tb[kv_idx]
            visible = (kb < qb) & (ts[q_idx] == ts[kv_idx]) & soft[b, kb, h // G]
            if own_on:
                visible = visible | ((kb == qb) & (kv_idx <= q_idx))
            return visible

        M = self.mask_block or mask_block_size(routing.block_size)
        partial, full = block_mask_tensors(routing, T, M)
        partial, full = (x.repeat_interleave(G, dim=1) for x in (partial, full))  # [B, H, n, n]
        kv_num, kv_idx = _kv_lists(partial)
        full_num, full_idx = _kv_lists(full)
        block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=M, mask_mod=mask_mod,
                                              seq_lengths=(T, T))
        score_mod = None
        gate = routing.gates(router_grad)[0]
        if torch.is_grad_enabled() and gate.requires_grad:
            # zero in value; d(score + bias)/d(bias) = 1 = d(log m)/dm at m = 1 (spec §1.7)
            bias = (gate - gate.detach()).to(torch.float32).permute(0, 2, 1)  # [B, Hr, N]

            def score_mod(score, b, h, q_idx, kv_idx):
                kb = tb[kv_idx]
                return torch.where(kb < tb[q_idx], score + bias[b, h // G, kb], score)

        flex = _flex_fn(q.device)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, routing.weights))
        if self.use_fa4 and q.device.type == "cuda" and not needs_grad and _use_fa4_backend():
            try:
                return flex(*args, **kw, kernel_options={"BACKEND": "FLASH"}).transpose(1, 2)
            except Exception as e:  # any lowering failure: fall back to the Triton kernels, once
                _disable_fa4_backend(e)
        if q.device.type == "cuda":
            kw["kernel_options"] = self.kernel_options
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            o = flex(*args, **kw)
        return o.transpose(1, 2)
