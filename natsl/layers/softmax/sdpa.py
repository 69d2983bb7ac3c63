"""`sdpa` softmax backend: dense routing mask + `F.scaled_dot_product_attention` (spec §1.3, §1.5, §1.7, §3.3).

O(T²) memory and time; runs everywhere (CPU included), forward and backward; the fast backends' reference.
Router gradient: the softmax gate gradient of spec §1.7 for every past block (softmax *and* linear, so both
`router_grad` values are exact), computed in a custom backward from the dense probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from natsl.layers.routing import Routing


class _GateGrad(torch.autograd.Function):
    """Identity on the attention output `o`; its backward also returns the softmax gate gradient (spec §1.7).

    `dm(j) = Σ_{heads a of r} Σ_{t: blk(t) > blk(s), same seq} Σ_{s ∈ j} P̃_ts (dO_t·v_s − dO_t·O_t)` with
    `P̃_ts = exp(score_ts − lse_t)`, `lse_t` over the keys the query actually sees; this is the derivative at the
    hard point both for m = 1 (seen blocks) and m = 0 (unseen linear blocks), see layers/softmax/README.md.
    """

    @staticmethod
    def forward(ctx, o, gate, q, k, v, seen, past, token_block, scale):
        ctx.save_for_backward(o, q, k, v, seen, past, token_block)
        ctx.scale = scale
        ctx.gate_shape = gate.shape
        ctx.gate_dtype = gate.dtype
        return o.clone()

    @staticmethod
    def backward(ctx, do):
        o, q, k, v, seen, past, token_block = ctx.saved_tensors
        B, N, Hr = ctx.gate_shape
        H = q.shape[2]
        G = H // Hr
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v, o, do_ = (x.to(dt).transpose(1, 2) for x in (q, k, v, o, do))  # [B, H, T, *]
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * ctx.scale
        seen_h = seen.repeat_interleave(G, dim=1)  # [B, H, T, T]
        lse = scores.masked_fill(~seen_h, float("-inf")).logsumexp(-1, keepdim=True)
        # a query that sees nothing has lse = -inf: its P̃ row is 0 (and its output, hence dO·O, is 0 too)
        lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        p = torch.exp(scores - lse) * past  # [B, H, T, T], past keys of any block type
        dp = torch.einsum("bhtd,bhsd->bhts", do_, v)
        delta = (do_ * o).sum(-1, keepdim=True)
        col = (p * (dp - delta)).sum(2)  # [B, H, T(s)]
        col = col.view(B, Hr, G, -1).sum(2)  # [B, Hr, T(s)]
        dgate = col.new_zeros(B, Hr, N).index_add_(2, token_block, col)
        return do, dgate.permute(0, 2, 1).to(ctx.gate_dtype), None, None, None, None, None, None, None


class SdpaSoftmax:
    """Dense-mask softmax branch over `F.scaled_dot_product_attention`; supports every option."""

    name = "sdpa"

    def not_supported_reasons(self, q, k, v, routing: Routing, router_grad: str = "selected") -> list[str]:
        return []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]` (spec §1.3 with the diagonal policy)."""
        B, T, H, _ = q.shape
        Hr = routing.num_router_heads
        G = H // Hr
        seen = routing.dense_mask(T)  # [B, Hr, T, T]
        empty = ~seen.any(-1, keepdim=True)  # queries that see no key (possible only with diagonal="linear")
        # give such rows one dummy key so SDPA stays finite; their output is zeroed below (so no gradient flows)
        attn = seen | (empty & (torch.arange(T, device=q.device) == 0))
        attn = attn[:, :, None].expand(B, Hr, G, T, T).reshape(B, H, T, T)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn,
                                           scale=scale).transpose(1, 2)
        if routing.diagonal == "linear":
            o = o.masked_fill(empty.permute(0, 2, 1, 3).repeat_interleave(G, dim=2), 0.0)
        gate = routing.gates(router_grad)[0]
        if torch.is_grad_enabled() and gate.requires_grad:
            lay = routing.layout(T)
            tb, ts = lay.token_block, lay.token_seq
            past = (tb[None, :] < tb[:, None]) & (ts[:, None] == ts[None, :])
            o = _GateGrad.apply(o, gate, q.detach(), k.detach(), v.detach(), seen, past, tb, scale)
        return o
