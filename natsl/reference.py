"""The dense NAtS-L reference (spec §2): float64, written directly from spec §1. The oracle of every fast path.

Softmax branch: an O(T²) masked softmax in which the exp-scores of past softmax blocks are multiplied by the
softmax gate `m_A` (spec §1.3, §1.7). Linear branch: a token-by-token recurrence that carries the state with
the linear gate `m_L` applied to the write strength and runs every block "virtually" from its start state with
the real inputs (spec §1.4). Because the gates are continuous tensors, autograd through this file *is* the
definition of the router gradient. Slow; never used by models.
"""

from __future__ import annotations

import torch

from natsl.layers.routing import Routing, routing_gates
from natsl.utils import check_natsl_inputs


def _heads(gate_tok: torch.Tensor, H: int) -> torch.Tensor:
    """`[B, T, Hr]` per router head → `[B, T, H]` per head (head h belongs to router head h // (H/Hr))."""
    return gate_tok.repeat_interleave(H // gate_tok.shape[-1], dim=-1)


def softmax_branch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
                             gate: torch.Tensor, scale: float) -> torch.Tensor:
    """Spec §1.3 with the gate of §1.7. `q, k: [B, T, H, K]`, `v: [B, T, H, V]`, `gate: [B, N, Hr]` → `[B, T, H, V]`."""
    B, T, H, _ = q.shape
    lay = routing.layout(T)
    tb, ts = lay.token_block, lay.token_seq
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    own = (tb[:, None] == tb[None, :]) & causal  # [T(q), T(k)]
    past = (tb[None, :] < tb[:, None]) & (ts[:, None] == ts[None, :])
    # weight of key s for query t: 1 inside the own block (if the softmax branch sees it), m_A(blk(s)) for the past
    w = past * _heads(gate[:, tb], H).permute(0, 2, 1)[:, :, None, :]  # [B, H, T, T]
    allowed = past | own
    if routing.diagonal != "linear":
        w = w + own
    else:
        allowed = past
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m) * w
    den = p.sum(-1, keepdim=True)
    num = torch.einsum("bhts,bshd->bhtd", p, v)
    o = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return o.transpose(1, 2)


def _step(backend: str, S, k, v, g, beta, write, decay_scale):
    """One token's update of `S [B, H, K, V]`; `write` scales the write strength, `decay_scale` the log decay."""
    if backend in ("gdn", "mamba2"):
        S = torch.exp(g * decay_scale)[..., None, None] * S
    elif backend == "gla":
        S = torch.exp(g * decay_scale[..., None])[..., None] * S
    if backend in ("gdn", "deltanet"):
        kv = torch.einsum("bhk,bhkv->bhv", k, S)
        return S + (write * beta)[..., None, None] * k[..., :, None] * (v - kv)[..., None, :]
    return S + (write[..., None] * k)[..., :, None] * v[..., None, :]


def linear_branch_reference(q, k, v, g, beta, routing: Routing, gate: torch.Tensor, *, backend: str, scale: float,
                            decay_through_softmax: bool, initial_state=None):
    """Spec §1.4 with the gate of §1.7, token by token. Returns `(o [B, T, H, V], final_state [B|N_seq, H, K, V])`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    lay = routing.layout(T)
    w_tok = _heads(gate[:, lay.token_block], H)  # [B, T, H] write strength of the carried state
    one = torch.ones_like(w_tok[:, 0])
    if routing.cu_seqlens is None:
        seq_starts, seq_ends = [0], [T]
    else:
        cu = routing.cu_seqlens.tolist()
        seq_starts, seq_ends = cu[:-1], cu[1:]
    block_starts = set(lay.block_start.tolist())
    n_state = len(seq_starts) if routing.cu_seqlens is not None else B
    if initial_state is None:
        initial_state = q.new_zeros(n_state, H, K, V)
    zero = torch.zeros_like(w_tok[:, 0])
    outs, finals = [], []
    for n, (start, end) in enumerate(zip(seq_starts, seq_ends)):
        carry = initial_state[n:n + 1] if routing.cu_seqlens is not None else initial_state
        for t in range(start, end):
            if t in block_starts:
                virt = carry
            g_t = None if g is None else g[:, t]
            b_t = None if beta is None else beta[:, t]
            write_virt = zero if routing.diagonal == "softmax" else one
            virt = _step(backend, virt, k[:, t], v[:, t], g_t, b_t, write_virt, one)
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, virt))
            decay_scale = one if decay_through_softmax else w_tok[:, t]
            carry = _step(backend, carry, k[:, t], v[:, t], g_t, b_t, w_tok[:, t], decay_scale)
        finals.append(carry)
    return torch.stack(outs, 1), torch.cat(finals, 0)


def natsl_attention_reference(q_s, k_s, v_s, q_l, k_l, v_l, routing, *, linear_backend, g=None, beta=None,
                              block_size=64, diagonal="both", decay_through_softmax=True, router_grad="selected",
                              scale_softmax=None, scale_linear=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None):
    """Dense float64 reference of the NAtS-L op (spec §1, §2).

    Args:
        q_s, k_s (torch.Tensor): `[B, T, H_A, d_ka]` softmax queries/keys (already normalised by the caller).
        v_s (torch.Tensor): `[B, T, H_A, d_va]`.
        q_l, k_l (torch.Tensor): `[B, T, H_L, d_k]` linear queries/keys.
        v_l (torch.Tensor): `[B, T, H_L, d_v]`.
        routing (torch.Tensor): `[B, N, H_R, 2]`, one-hot in value (index 0 = softmax, 1 = linear); its gradient
            is spec §1.7.
        linear_backend (str): `"gdn"`, `"deltanet"`, `"gla"`, `"mamba2"` or `"linear_attn"`.
        g (torch.Tensor, Optional): log decay, `[B, T, H_L]` (gdn, mamba2) or `[B, T, H_L, d_k]` (gla).
        beta (torch.Tensor, Optional): `[B, T, H_L]` write strength (gdn, deltanet), already activated.
        block_size (int): routing block size. Default: `64`.
        diagonal (str): `"both"` (paper), `"softmax"` or `"linear"` (spec §1.5). Default: `"both"`.
        decay_through_softmax (bool): whether softmax blocks decay the carried state. Default: `True`.
        router_grad (str): `"selected"` (paper) or `"both"`. Default: `"selected"`.
        scale_softmax (float, Optional): Default: `d_ka ** -0.5`.
        scale_linear (float, Optional): Default: `d_k ** -0.5`.
        initial_state (torch.Tensor, Optional): `[B or N_seq, H_L, d_k, d_v]`.
        output_final_state (bool): return the state after the last block (committed by its routing).
        cu_seqlens (torch.LongTensor, Optional): `[N_seq + 1]` packed sequence offsets (`B == 1`).

    Returns:
        `o_s [B, T, H_A, d_va]`, `o_l [B, T, H_L, d_v]` (float64) and `final_state [B or N_seq, H_L, d_k, d_v]`
        (float64) or `None`.
    """
    check_natsl_inputs(q_s, k_s, v_s, q_l, k_l, v_l, routing, linear_backend=linear_backend, g=g, beta=beta,
                       initial_state=initial_state, cu_seqlens=cu_seqlens, router_grad=router_grad)
    T = q_s.shape[1]
    route = Routing(routing, block_size, diagonal, cu_seqlens)
    route.validate(T)
    gate_s, gate_l = routing_gates(routing, router_grad)
    scale_softmax = q_s.shape[-1] ** -0.5 if scale_softmax is None else scale_softmax
    scale_linear = q_l.shape[-1] ** -0.5 if scale_linear is None else scale_linear
    d = torch.float64
    o_s = softmax_branch_reference(q_s.to(d), k_s.to(d), v_s.to(d), route, gate_s, scale_softmax)
    o_l, final = linear_branch_reference(
        q_l.to(d), k_l.to(d), v_l.to(d), None if g is None else g.to(d), None if beta is None else beta.to(d),
        route, gate_l, backend=linear_backend, scale=scale_linear, decay_through_softmax=decay_through_softmax,
        initial_state=None if initial_state is None else initial_state.to(d))
    return o_s, o_l, (final if output_final_state else None)
