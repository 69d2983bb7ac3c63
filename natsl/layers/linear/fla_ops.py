"""Thin adapters over stock fla chunk ops (spec §1.4, §3.2): one signature for the five linear backends.

Every adapter is `fn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
cu_seqlens=None) -> (o, final_state)`, the signature of the PyTorch twins in `torch_ops.py`. `beta` is the
activated write strength and `g` the log decay: no in-kernel l2norm, sigmoid or gate activation is used, so a
routing write gate applied to `beta` / `k` / `g` by the caller means exactly what it says. fla is imported lazily.
"""

from __future__ import annotations

import torch

FLA_INSTALL = 'pip install "flash-linear-attention==0.6.0" "fla-core==0.6.0"'


def require_fla() -> None:
    """Raise `ImportError` with the install command if fla cannot be imported."""
    try:
        import fla.ops  # noqa: F401
    except ImportError as e:
        raise ImportError(f"linear_impl='fla' needs flash-linear-attention; install it with `{FLA_INSTALL}` "
                          f"(or use linear_impl='torch')") from e


def _check(q, k, v, g, beta, *, g_kind, uses_beta):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if g_kind is None and g is not None:
        raise ValueError("g must be None for this recurrence (it has no decay)")
    if g_kind is not None:
        want = q.shape[:3] if g_kind == "head" else q.shape
        if g is None or g.shape != want:
            raise ValueError(f"g (log decay) must have shape {tuple(want)}, got {None if g is None else tuple(g.shape)}")
    if uses_beta and (beta is None or beta.shape != q.shape[:3]):
        raise ValueError(f"beta must have shape {tuple(q.shape[:3])}, got {None if beta is None else tuple(beta.shape)}")
    if not uses_beta and beta is not None:
        raise ValueError("beta must be None for this recurrence (it is not a delta rule)")


def fla_gdn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    r"""Gated DeltaNet via `fla.ops.gated_delta_rule.chunk_gated_delta_rule`.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]` (k used as given: normalise it beforehand).
        v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor): log decay `[B, T, H]`.
        beta (torch.Tensor): activated write strength `[B, T, H]`.
        scale (float, Optional): read-out scale. Default: `K ** -0.5`.
        initial_state (torch.Tensor, Optional): `[N, H, K, V]`.
        output_final_state (bool): Default: `False`.
        cu_seqlens (torch.LongTensor, Optional): `[N + 1]` packed-sequence offsets (`B = 1`).

    Returns:
        `o [B, T, H, V]` (dtype of `q`) and `final_state [N, H, K, V]` (float32) or `None`.
    """
    _check(q, k, v, g, beta, g_kind="head", uses_beta=True)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fla_deltanet(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None):
    r"""DeltaNet via `fla.ops.delta_rule.chunk_delta_rule`; in float32 (which `chunk_delta_rule` refuses) via
    `chunk_gated_delta_rule` with `g = 0`, the same recurrence. Arguments as :func:`fla_gdn` with `g` None."""
    _check(q, k, v, g, beta, g_kind=None, uses_beta=True)
    if q.dtype == torch.float32:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        g0 = q.new_zeros(q.shape[:3])
        return chunk_gated_delta_rule(q, k, v, g0, beta, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    from fla.ops.delta_rule import chunk_delta_rule

    return chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fla_gla(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    r"""GLA via `fla.ops.gla.chunk_gla`; `g` is the per-key log decay `[B, T, H, K]`, `beta` must be None."""
    _check(q, k, v, g, beta, g_kind="key", uses_beta=False)
    from fla.ops.gla import chunk_gla

    return chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens)


def fla_mamba2(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None):
    r"""Mamba2 / SSD / simple GLA via `fla.ops.simple_gla.chunk_simple_gla`; head-wise log decay `g [B, T, H]`."""
    _check(q, k, v, g, beta, g_kind="head", uses_beta=False)
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fla_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None):
    r"""Linear attention via `fla.ops.linear_attn.chunk_linear_attn(normalize=False)`; `g`, `beta` must be None."""
    _check(q, k, v, g, beta, g_kind=None, uses_beta=False)
    from fla.ops.linear_attn import chunk_linear_attn

    return chunk_linear_attn(q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                             normalize=False, cu_seqlens=cu_seqlens)


FLA_LINEAR_OPS = {
    "gdn": fla_gdn,
    "deltanet": fla_deltanet,
    "gla": fla_gla,
    "mamba2": fla_mamba2,
    "linear_attn": fla_linear_attn,
}


def fla_step(backend: str, q, k, v, g, beta, state, scale: float):
    """Decode steps of the plain recurrence through fla's fused recurrent kernels (one launch per call instead of
    the ~10 small ops of `natsl.layers.state.linear_step`, whose contract this has: read-out after the update).

    Args:
        backend (str): `gdn`, `deltanet`, `gla`, `mamba2` or `linear_attn`.
        q, k (torch.Tensor): `[B, T, H, K]` (k normalised by the caller for the delta rule).
        v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor, Optional): log decay `[B, T, H]` (gdn, mamba2) or `[B, T, H, K]` (gla).
        beta (torch.Tensor, Optional): `[B, T, H]` (gdn, deltanet).
        state (torch.Tensor): `[B, H, K, V]`.
        scale (float): read-out scale.

    Returns:
        `(o [B, T, H, V]` in the dtype of `q`, `state [B, H, K, V]` float32)`.
    """
    require_fla()
    h0 = state.float().contiguous()
    kw = dict(scale=scale, initial_state=h0, output_final_state=True)
    if backend == "gdn":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        o, S = fused_recurrent_gated_delta_rule(q, k, v, g=g.float(), beta=beta.to(q.dtype), **kw)
    elif backend == "deltanet":
        from fla.ops.delta_rule import fused_recurrent_delta_rule

        o, S = fused_recurrent_delta_rule(q, k, v, beta=beta.to(q.dtype), **kw)
    elif backend == "mamba2":
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        o, S = fused_recurrent_simple_gla(q, k, v, g=g.float(), **kw)
    elif backend == "gla":
        from fla.ops.gla import fused_recurrent_gla

        o, S = fused_recurrent_gla(q, k, v, gk=g.float(), **kw)
    else:
        from fla.ops.linear_attn import fused_recurrent_linear_attn

        o, S = fused_recurrent_linear_attn(q, k, v, normalize=False, **kw)
    return o.to(q.dtype), S.float()
