"""The dense NAtS-L reference (spec §2): float64, written directly from spec §1. The oracle of every fast path.

Softmax branch: an O(T²) masked softmax in which the exp-scores of past softmax blocks are multiplied by the
softmax gate `m_A` (spec §1.3, §1.7). Linear branch: every block runs token by token from its start state
`S^{(j)}` with the real inputs (its "virtual run" `R_j`, read by the block's own queries, whatever its type), and
the state carried to the next block interpolates between "decay only" and "commit" with the linear gate `m_L`
(spec §1.4, revised §1.7):

    S^{(j+1)} = D_j(S^{(j)}) + m_L(j) · (R_j(S^{(j)}) − Δ_j(S^{(j)}))

`Δ_j` = the block's decay only (identity without decay); `D_j = Δ_j`, except the identity for softmax blocks when
`decay_through_softmax=False` (a switch on the block types: no gradient). Blocks restart at every sequence start.
Because the gates are continuous tensors, autograd through this file *is* the definition of the router gradient.
Slow; never used by models.
"""

from __future__ import annotations

import torch

from natsl.layers.routing import LINEAR, Routing, routing_gates
from natsl.utils import check_natsl_inputs


def _heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """`[..., Hr]` per router head → `[..., H]` per head (head h belongs to router head h // (H/Hr))."""
    return x.repeat_interleave(H // x.shape[-1], dim=-1)


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


def _step(backend: str, S, k, v, g, beta):
    """One token's real update of `S [B, H, K, V]` (spec §1.4 table)."""
    if backend in ("gdn", "mamba2"):
        S = g.exp()[..., None, None] * S
    elif backend == "gla":
        S = g.exp()[..., None] * S
    if backend in ("gdn", "deltanet"):
        v = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))
    return S + k[..., :, None] * v[..., None, :]


def _decay(backend: str, S, g_block):
    """`Δ(S)`: a block's decay only; `g_block [B, L, H]` (gdn, mamba2) or `[B, L, H, K]` (gla) its log decays."""
    if backend in ("gdn", "mamba2"):
        return g_block.sum(1).exp()[..., None, None] * S
    if backend == "gla":
        return g_block.sum(1).exp()[..., None] * S
    return S


def linear_branch_reference(q, k, v, g, beta, routing: Routing, gate: torch.Tensor, *, backend: str, scale: float,
                            decay_through_softmax: bool, initial_state=None):
    """Spec §1.4 with the gate of §1.7, block by block. `gate: [B, N, Hr]` is `m_L`.

    Returns `(o [B, T, H, V], final_state [B|N_seq, H, K, V])`.
    """
    B, T, H, K = q.shape
    lay = routing.layout(T)
    m = _heads(gate, H)  # [B, N, H]
    decays = _heads(routing.types == LINEAR, H) | decay_through_softmax  # [B, N, H]: D = Δ there, else identity
    if initial_state is None:
        initial_state = q.new_zeros(B if lay.num_seqs is None else lay.num_seqs, H, K, v.shape[-1])
    outs, finals, carry = [], [], None
    blocks = zip(lay.block_start.tolist(), lay.block_len.tolist(), lay.block_first.tolist())
    for j, (start, n, first) in enumerate(blocks):
        if first:  # a sequence starts: restart from its initial state
            if carry is not None:
                finals.append(carry)
            seq = int(lay.block_seq[j])
            carry = initial_state if lay.num_seqs is None else initial_state[seq:seq + 1]
        S = carry  # the block's real run R^{≤t}, read by its own queries whatever the block's type
        for t in range(start, start + n):
            S = _step(backend, S, k[:, t], v[:, t], None if g is None else g[:, t], None if beta is None else beta[:, t])
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        delta = _decay(backend, carry, None if g is None else g[:, start:start + n])
        D = torch.where(decays[:, j, :, None, None], delta, carry)
        carry = D + m[:, j, :, None, None] * (S - delta)  # D(S) + m_L · W,  W = R(S) − Δ(S)
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
        diagonal (str): `"both"` (paper) or `"linear"` (no own-block softmax term; spec §1.5). Default: `"both"`.
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
