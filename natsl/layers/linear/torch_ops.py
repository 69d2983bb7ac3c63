"""Pure-PyTorch chunked linear-attention recurrences (spec §1.4, §3.2, §3.4): the CPU twins of fla's chunk ops.

Same layout and conventions as fla (`[B, T, H, *]`, state `[N, H, K, V]`, read-out after the token's update).
Every op is one chunked pass, :func:`_chunk_pass`; the plain ops (:func:`torch_gdn`, ...) are the NAtS-L masked
chunk pass (:func:`torch_masked_chunk`) with every write and decay mask at 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
# gla materialises a `[C, C, K]` decay tensor per chunk, so its plain op uses smaller chunks.
GLA_CHUNK_SIZE = 16

# backend -> (kind of log decay `g`: per head, per key or none; delta rule (takes `beta`); default chunk size)
_BACKENDS: dict[str, tuple[Literal['head', 'key'] | None, bool, int]] = {
    'gdn': ('head', True, CHUNK_SIZE),
    'deltanet': (None, True, CHUNK_SIZE),
    'gla': ('key', False, GLA_CHUNK_SIZE),
    'mamba2': ('head', False, CHUNK_SIZE),
    'linear_attn': (None, False, CHUNK_SIZE),
}


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


def check_linear_inputs(backend: str, q, k, v, g, beta, initial_state=None, cu_seqlens=None) -> None:
    """Validate the recurrence inputs of `backend` (shapes of q, k, v; whether it takes `g` (per head or per key) and
    `beta`; the initial state's shape; `cu_seqlens`, one host sync when given). Raises `ValueError` naming the
    argument."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    g_kind, uses_beta, _ = _BACKENDS[backend]
    _check(q, k, v, g, beta, initial_state, cu_seqlens, g_kind=g_kind, uses_beta=uses_beta)


def _check_mask(name: str, mask, q: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T, H], got {type(mask).__name__}")
    if mask.shape != q.shape[:3]:
        raise ValueError(f"{name} must have shape [B, T, H] = {tuple(q.shape[:3])}, got {tuple(mask.shape)}")


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


def _chunk_pass(q, k, v, g, beta, m, z, S0, scale, C):
    """The (masked) chunk pass on dense `[B, T, H, *]` inputs, chunks of `C` tokens.

    `g`: None (no decay), `[B, T, H]` (head-wise) or `[B, T, H, K]` (per key) log decay; delta rule iff `beta`
    (`[B, T, H]`) is given. `m` (write mask) and `z` (carried-state decay mask), `[B, T, H]` or None (= ones), enter
    only the state write: the write keys are `m · k ⊙ e^{G_last − G}` and the carried state decays by
    `exp(Σ_{t ∈ chunk} z_t g_t)`; the intra-chunk output, the WY/UT solve and the read-out use the real inputs.
    """
    T = q.shape[1]
    q, k, v = (_chunks(x, C) for x in (q, k, v))
    # log decays with a trailing key axis: [B, H, N, C, 1] (head-wise / none) or [B, H, N, C, K] (gla)
    g = None if g is None else (g if g.dim() == 4 else g[..., None])
    G = q.new_zeros(*q.shape[:-1], 1) if g is None else _chunks(g, C).cumsum(-2)
    G_last = G[..., -1:, :]
    if G.shape[-1] == 1:
        gamma = _causal_decay(G[..., 0])  # [B, H, N, C, C]
        A = (q @ k.transpose(-1, -2)) * gamma * scale
    else:
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
        gamma = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal, float('-inf')).exp()  # [.., C, C, K]
        A = (q[..., :, None, :] * gamma * k[..., None, :, :]).sum(-1) * scale
    q_dec = q * G.exp() * scale
    k_dec = k * (G_last - G).exp()
    if m is not None:
        k_dec = k_dec * _chunks(m, C)[..., None]  # the write keys k·m: the only place routing enters
    # the carried state decays by exp(Σ_t z_t g_t) = e^{G_last · z} for z constant per chunk
    decay_last = G_last[..., 0, :].exp() if z is None or g is None else _chunks(g * z[..., None], C).sum(-2).exp()
    if beta is None:
        o, S = _scan(q_dec, A, v, None, k_dec, decay_last, S0)
    else:
        # WY/UT form: (I + L) δ = β (v − e^G k S0), L_ij = β_i e^{G_i − G_j} k_i·k_j for j < i.
        beta = _chunks(beta, C)[..., None]
        L = (beta * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        uw = torch.linalg.solve_triangular(eye + L, torch.cat([beta * v, beta * G.exp() * k], -1),
                                           upper=False, unitriangular=True)
        o, S = _scan(q_dec, A, uw[..., :v.shape[-1]], uw[..., v.shape[-1]:], k_dec, decay_last, S0)
    return o.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def _run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, *, chunk_size, m=None, z=None):
    """Shared driver: compute dtype, default scale and state, packed sequences padded into a batch."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K ** -0.5 if scale is None else scale
    S0 = (q.new_zeros(N, H, K, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype))
    ins = [None if x is None else x.to(dtype) for x in (q, k, v, g, beta, m, z)]
    if cu_seqlens is not None:
        lens = cu_seqlens.diff().to(device=q.device, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(N, device=q.device), lens)
        pos = torch.arange(T, device=q.device) - cu_seqlens[:-1].to(q.device, torch.long)[seq]
        T_max = int(lens.max())
        ins = [None if x is None else _pad_sequences(x, seq, pos, N, T_max) for x in ins]
    o, S = _chunk_pass(*ins, S0, scale, chunk_size)
    if cu_seqlens is not None:
        o = o[seq, pos][None]
    return o.to(q.dtype), (S if output_final_state else None)


def _plain(backend, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    check_linear_inputs(backend, q, k, v, g, beta, initial_state, cu_seqlens)
    return _run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                chunk_size=_BACKENDS[backend][2])


def torch_masked_chunk(backend, q, k, v, g=None, beta=None, *, write_mask, decay_mask=None, chunk_size, scale=None,
                       initial_state=None, output_final_state=False, cu_seqlens=None):
    r"""The NAtS-L linear branch as one masked chunk pass (spec §1.4, §1.7, §3.2), chunk = routing block.

    The chunked recurrence of the plain op of `backend` (:func:`torch_gdn`, ...) in which only the state write is
    routed. Per chunk with start state `S` (log decay cumsum `G`, `δ = v_new = u − w S` for the delta rule, `v`
    otherwise):

        o  = scale · (e^G ⊙ (Q S) + tril(Q Kᵀ ⊙ Γ) δ)                       (real k, β, g: the virtual run)
        S' = exp(Σ_t z_t g_t) ⊙ S + (m · K ⊙ e^{G_last − G})ᵀ δ             (routed: write mask m, decay mask z)

    With `m` and `z` constant within each chunk this is `S' = D(S) + m · (R(S) − Δ(S))`: `R` the chunk's real run,
    `Δ` its decay only, `D = Δ` (z = 1) or the identity (z = 0). `m = z = 1` everywhere is the plain op. Computes in
    fp32 (fp64 stays fp64); gradients of `q, k, v, g, beta, write_mask, initial_state` come from autograd (the
    router gradient of §1.7 is the one of `write_mask`).

    Args:
        backend (str): one of `'gdn'`, `'deltanet'`, `'gla'`, `'mamba2'`, `'linear_attn'`.
        q (torch.Tensor): queries `[B, T, H, K]`.
        k (torch.Tensor): keys `[B, T, H, K]` (used as given).
        v (torch.Tensor): values `[B, T, H, V]`.
        g (torch.Tensor, Optional): log decay, `[B, T, H]` for `gdn` and `mamba2`, `[B, T, H, K]` for `gla`,
            None for `deltanet` and `linear_attn`.
        beta (torch.Tensor, Optional): write strengths `[B, T, H]` for `gdn` and `deltanet`, else None.
        write_mask (torch.Tensor): `m`, `[B, T, H]` float per token (1 on linear blocks, 0 on softmax blocks, per
            head); multiplies the keys of the state write only. May require grad.
        decay_mask (torch.Tensor, Optional): `z`, `[B, T, H]` 0/1, constant within each chunk; multiplies the log
            decay of the carried state only (`decay_through_softmax=False`: 0 on softmax blocks). Carries no
            gradient (detached). Default: `None` (all ones).
        chunk_size (int): tokens per chunk (the routing block size). Chunks restart at every sequence start; the
            last chunk of a sequence may be partial.
        scale (float, Optional): read-out scale. Default: `K ** -0.5`.
        initial_state (torch.Tensor, Optional): `[N, H, K, V]`, `N = B` or the number of packed sequences.
            Default: zeros.
        output_final_state (bool): whether to return the final state. Default: `False`.
        cu_seqlens (torch.Tensor, Optional): `[N + 1]` integer offsets of packed sequences (`B = 1`).
            Default: `None`.

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in the dtype of `q`.
        final_state (torch.Tensor or None): `[N, H, K, V]` in fp32 (fp64 for fp64 inputs), the carried state after
            the last chunk.
    """
    check_linear_inputs(backend, q, k, v, g, beta, initial_state, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    _check_mask("write_mask", write_mask, q)
    if decay_mask is not None:
        _check_mask("decay_mask", decay_mask, q)
        decay_mask = decay_mask.detach()
    return _run(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size=chunk_size,
                m=write_mask, z=decay_mask)


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
    return _plain('gdn', q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_deltanet(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    r"""DeltaNet: `S ← (I − β_t k_t k_tᵀ) S + β_t k_t v_tᵀ`; as :func:`torch_gdn` with `g` None (no decay)."""
    return _plain('deltanet', q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_gla(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    r"""GLA: `S ← diag(e^{g_t}) S + k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`; twin of `fla.ops.gla.chunk_gla`.

    As :func:`torch_gdn` except: `g` is the per-key log decay `[B, T, H, K]` and `beta` must be None.
    """
    return _plain('gla', q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_mamba2(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None):
    r"""Mamba2 / SSD / simple GLA: `S ← e^{g_t} S + k_t v_tᵀ`; twin of `fla.ops.simple_gla.chunk_simple_gla`.

    As :func:`torch_gdn` except: `beta` must be None (the caller maps `k=B, q=C, v=x·dt, g=A·dt` and adds the
    `D` skip itself).
    """
    return _plain('mamba2', q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def torch_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None):
    r"""Linear attention: `S ← S + k_t v_tᵀ`; twin of `fla.ops.linear_attn.chunk_linear_attn(normalize=False)`.

    As :func:`torch_gdn` except: `g` and `beta` must be None.
    """
    return _plain('linear_attn', q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
