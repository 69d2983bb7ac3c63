"""Pure-PyTorch chunked linear-attention recurrences (spec §1.4, §3.4): the CPU twins of fla's chunk ops.

Same layout and conventions as fla (`[B, T, H, *]`, state `[N, H, K, V]`, read-out after the token's update).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
# gla materialises a `[C, C, K]` decay tensor per chunk, so it uses smaller chunks.
GLA_CHUNK_SIZE = 16


def _check(q, k, v, g, beta, initial_state, cu_seqlens, *, g_kind: Literal['head', 'key'] | None, uses_beta: bool):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got shape {tuple(v.shape)}")
    if g_kind is None and g is not None:
        raise ValueError("g must be None for this recurrence (it has no decay)")
    if g_kind is not None:
        g_shape = (B, T, H) if g_kind == 'head' else (B, T, H, K)
        if g is None or g.shape != g_shape:
            raise ValueError(f"g (log decay) must have shape {g_shape}, got {None if g is None else tuple(g.shape)}")
    if not uses_beta and beta is not None:
        raise ValueError("beta must be None for this recurrence (it is not a delta rule)")
    if uses_beta and (beta is None or beta.shape != (B, T, H)):
        raise ValueError(f"beta must have shape {(B, T, H)}, got {None if beta is None else tuple(beta.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens requires packed input with batch size 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1]")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T={T}, got {cu}")
        N = len(cu) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must have shape {(N, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}")


def _pad_sequences(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, N: int, T_max: int) -> torch.Tensor:
    """Packed `[1, T, ...]` → zero-padded `[N, T_max, ...]` (padding at the end writes nothing, decays nothing)."""
    return x.new_zeros(N, T_max, *x.shape[2:]).index_put((seq, pos), x[0])


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """`[B, T, H, *]` → `[B, H, N, C, *]`, zero-padded at the end to `N = max(1, ceil(T / C))` chunks."""
    B, T, H = x.shape[:3]
    n = max(1, -(-T // C))
    x = x.transpose(1, 2)
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, n * C - T))
    return x.reshape(B, H, n, C, *x.shape[3:])


def _causal_decay(G: torch.Tensor) -> torch.Tensor:
    """`exp(G_i - G_j)` for `j ≤ i`, else 0, masked before `exp` so it never overflows. `G`: `[..., C]` → `[..., C, C]`."""
    C = G.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    return (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float('-inf')).exp()


def _scan(q_dec, A, u, w, k_dec, decay_last, S):
    """Carry the state across chunks and add its contribution to the intra-chunk output.

    Per chunk with start state `S`: `δ = u − w S` (or `u` when `w` is None), `o = q_dec S + A δ`,
    `S ← decay_last ⊙ S + k_decᵀ δ`. Shapes: `q_dec, k_dec, w [B, H, N, C, K]`, `A [B, H, N, C, C]`,
    `u [B, H, N, C, V]`, `decay_last [B, H, N, K or 1]`, `S [B, H, K, V]`.
    """
    starts, deltas = [], []
    for n in range(q_dec.shape[2]):
        starts.append(S)
        delta = u[:, :, n] if w is None else u[:, :, n] - w[:, :, n] @ S
        deltas.append(delta)
        S = decay_last[:, :, n, :, None] * S + k_dec[:, :, n].transpose(-1, -2) @ delta
    delta = u if w is None else torch.stack(deltas, 2)
    return q_dec @ torch.stack(starts, 2) + A @ delta, S


def _chunk_scalar_decay(q, k, v, g, beta, S0, scale):
    """Dense `[B, T, H, *]` inputs, head-wise log decay `g [B, T, H]` (or None), delta rule iff `beta` is given."""
    T, C = q.shape[1], CHUNK_SIZE
    q, k, v = (_chunks(x, C) for x in (q, k, v))
    G = _chunks(g, C).cumsum(-1) if g is not None else q.new_zeros(q.shape[:-1])
    gamma = _causal_decay(G)
    q_dec = q * (scale * G.exp())[..., None]
    k_dec = k * (G[..., -1:] - G).exp()[..., None]
    A = (q @ k.transpose(-1, -2)) * gamma * scale
    if beta is None:
        o, S = _scan(q_dec, A, v, None, k_dec, G[..., -1:].exp(), S0)
    else:
        # WY/UT form: (I + L) δ = β (v − e^G k S0), L_ij = β_i e^{G_i − G_j} k_i·k_j for j < i.
        beta = _chunks(beta, C)[..., None]
        L = (beta * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        uw = torch.linalg.solve_triangular(eye + L, torch.cat([beta * v, beta * G.exp()[..., None] * k], -1),
                                           upper=False, unitriangular=True)
        o, S = _scan(q_dec, A, uw[..., :v.shape[-1]], uw[..., v.shape[-1]:], k_dec, G[..., -1:].exp(), S0)
    return o.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def _chunk_key_decay(q, k, v, g, beta, S0, scale):
    """Dense `[B, T, H, *]` inputs with per-key log decay `g [B, T, H, K]` (gla)."""
    assert beta is None
    T = q.shape[1]
    q, k, v, G = (_chunks(x, GLA_CHUNK_SIZE) for x in (q, k, v, g))
    G = G.cumsum(-2)
    C = G.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
    gamma = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal, float('-inf')).exp()  # [B, H, N, C, C, K]
    A = (q[..., :, None, :] * gamma * k[..., None, :, :]).sum(-1) * scale
    q_dec = q * G.exp() * scale
    k_dec = k * (G[..., -1:, :] - G).exp()
    o, S = _scan(q_dec, A, v, None, k_dec, G[..., -1, :].exp(), S0)
    return o.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Shared driver: compute dtype, default scale and state, packed sequences padded into a batch."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    S0 = (q.new_zeros(N, H, K, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype))
    ins = [None if x is None else x.to(dtype) for x in (q, k, v, g, beta)]
    if cu_seqlens is not None:
        lens = cu_seqlens.diff().to(device=q.device, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(N, device=q.device), lens)
        pos = torch.arange(T, device=q.device) - cu_seqlens[:-1].to(q.device, torch.long)[seq]
        T_max = int(lens.max())
        ins = [None if x is None else _pad_sequences(x, seq, pos, N, T_max) for x in ins]
    o, S = core(*ins, S0, scale)
    if cu_seqlens is not None:
        o = o[seq, pos][None]
    return o.to(q.dtype), (S if output_final_state else None)


def torch_gdn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    r"""Gated DeltaNet: `S ← e^{g_t} (I − β_t k_t k_tᵀ) S + β_t k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`.

    Chunked (WY form) pure-PyTorch twin of `fla.ops.gated_delta_rule.chunk_gated_delta_rule` without in-kernel
    normalisation or activations. Computes in fp32 (fp64 stays fp64); differentiable in every tensor input.

    Args:
        q (torch.Tensor): queries `[B, T, H, K]`.
        k (torch.Tensor): keys `[B, T, H, K]` (used as given: L2-normalise them beforehand).
        v (torch.Tensor): values `[B, T, H, V]`.
        g (torch.Tensor): log decay `[B, T, H]`.
        beta (torch.Tensor): write strengths `[B, T, H]` (already activated).
        scale (float, Optional): read-out scale. Default: `K ** -0.5`.
        initial_state (torch.Tensor, Optional): `[N, H, K, V]`, `N = B` or the number of packed sequences.
            Default: zeros.
        output_final_state (bool): whether to return the final state. Default: `False`.
        cu_seqlens (torch.Tensor, Optional): `[N + 1]` integer offsets of packed sequences (`B = 1`); the state
            restarts at every sequence. Default: `None`.

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in the dtype of `q`.
        final_state (torch.Tensor or None): `[N, H, K, V]` in fp32 (fp64 for fp64 inputs).
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind='head', uses_beta=True)
    return _run(_chunk_scalar_decay, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_deltanet(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    r"""DeltaNet: `S ← (I − β_t k_t k_tᵀ) S + β_t k_t v_tᵀ`; as :func:`torch_gdn` with `g` None (no decay)."""
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind=None, uses_beta=True)
    return _run(_chunk_scalar_decay, q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_gla(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    r"""GLA: `S ← diag(e^{g_t}) S + k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`; twin of `fla.ops.gla.chunk_gla`.

    As :func:`torch_gdn` except: `g` is the per-key log decay `[B, T, H, K]` and `beta` must be None.
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind='key', uses_beta=False)
    return _run(_chunk_key_decay, q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens)


def torch_mamba2(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None):
    r"""Mamba2 / SSD / simple GLA: `S ← e^{g_t} S + k_t v_tᵀ`; twin of `fla.ops.simple_gla.chunk_simple_gla`.

    As :func:`torch_gdn` except: `beta` must be None (the caller maps `k=B, q=C, v=x·dt, g=A·dt` and adds the
    `D` skip itself).
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind='head', uses_beta=False)
    return _run(_chunk_scalar_decay, q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens)


def torch_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None):
    r"""Linear attention: `S ← S + k_t v_tᵀ`; twin of `fla.ops.linear_attn.chunk_linear_attn(normalize=False)`.

    As :func:`torch_gdn` except: `g` and `beta` must be None.
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind=None, uses_beta=False)
    return _run(_chunk_scalar_decay, q, k, v, None, None, scale, initial_state, output_final_state, cu_seqlens)
