"""The masked chunk pass over fla's chunk functions (spec §3.2): the NAtS-L linear branch at the cost of one fla call.

With routing blocks equal to fla's chunks, the branch is fla's chunk pipeline in which only the state write sees
the keys `k·m` (`m` per (block, head): 1 in linear blocks, 0 in softmax blocks); the WY solve, `v_new` and the
outputs use the real inputs. The forward forms `k·m` and fla's chunk-local gate cumsum in one natsl launch
(`natsl.kernels.masked_write.masked_write_fwd`) and calls fla's functions with `k·m` where they write the state; the
backward calls fla's backward functions likewise and `masked_write_bwd` removes the write term of the masked blocks
from the gradients fla computes with the real `k`, applies the scalar gate gradient's reverse cumsum and returns the
router gradient `dm`. Below ~32k tokens a call is bound by host launches: the pass makes as many Triton launches as
fla's own call (its two kernels take the place of fla's two cumsums) and one memset more (the routing weights'
gradient).
Maths: `natsl/layers/README.md`, "Linear branch".
No gather, no data-dependent shape, no host sync (dense input). fla is imported lazily.
"""

from __future__ import annotations

import torch

from natsl.kernels.masked_write import masked_write_bwd, masked_write_fwd
from natsl.layers.routing import LINEAR
from natsl.utils import to_dtype

#: fla's chunk size: the routing block size the fla path takes.
FLA_CHUNK = 64
DELTA, SCALAR, KEY = "delta", "scalar", "key"
FAMILY = {"gdn": DELTA, "deltanet": DELTA, "mamba2": SCALAR, "linear_attn": SCALAR, "gla": KEY}


_FLA: dict = {}


def fla_block_sizes(backend: str) -> tuple[int, ...]:
    """The routing block sizes the fla path takes for `backend` (one block = one fla chunk of that size): fla 0.6.0's
    delta-rule kernels take chunks of 16, 32 or 64 tokens, the scalar- and key-gated ones also 128 (all checked
    against the reference under the Triton interpreter; only 64 has run on the H200)."""
    return (16, 32, 64) if FAMILY[backend] == DELTA else (16, 32, 64, 128)


def _fla() -> dict:
    """fla's chunk functions (imported once)."""
    if _FLA:
        return _FLA
    from fla.ops.common import chunk_h, chunk_o
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
    from fla.ops.gla import chunk as gla
    from fla.ops.utils import prepare_chunk_indices
    from fla.ops.utils.constant import RCP_LN2

    _FLA.update(chunk_h=chunk_h, chunk_o=chunk_o, dhu=chunk_gated_delta_rule_bwd_dhu,
                fwd_h=chunk_gated_delta_rule_fwd_h, fwd_intra=chunk_gated_delta_rule_fwd_intra,
                wy_bwd=prepare_wy_repr_bwd, recompute_w_u=recompute_w_u_fwd, gla=gla,
                chunk_indices=prepare_chunk_indices, RCP_LN2=RCP_LN2)
    return _FLA


def blocks_to_tokens(x: torch.Tensor, T: int, block_size: int, token_block: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, N, H]` per (block, head) → `[B, T, H]` per (token, head): one expand-copy for dense input, a gather by
    `token_block [T]` (each token's global block) for packed input."""
    if token_block is not None:
        return x[:, token_block]
    B, N, H = x.shape
    return x[:, :, None].expand(B, N, block_size, H).reshape(B, N * block_size, H)[:, :T]


def _states(f, family, k_m, v, gc, h0, output_final_state, cu, ci, C, w=None, u=None, fp32=False):
    """fla's state pass over the masked keys: `(h [B, NT, H, K, V], v_new or None, final state or None)`."""
    if family == DELTA:
        return f["fwd_h"](k=k_m, w=w, u=u, g=gc, initial_state=h0, output_final_state=output_final_state,
                          cu_seqlens=cu, chunk_indices=ci, chunk_size=C)
    h, ht = f["chunk_h"].chunk_fwd_h(k=k_m, v=v, g=gc if family == SCALAR else None,
                                     gk=gc if family == KEY else None, h0=h0, output_final_state=output_final_state,
                                     cu_seqlens=cu, chunk_size=C, states_in_fp32=fp32)
    return h, None, ht


class MaskedChunkFunction(torch.autograd.Function):
    """`(o, final_state)` of the masked chunk pass; gradients for q, k, v, g, beta, m and the initial state."""

    @staticmethod
    def forward(ctx, family, q, k, v, g, beta, m, z, scale, h0, output_final_state, cu_seqlens, token_block, C,
                select):
        f = _fla()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        T = k.shape[1]
        ctx.weights_shape = None
        if m.dim() == 4:  # the routing weights [B, N, H, 2]: m is their linear column (its gradient goes straight in)
            ctx.weights_shape, m = m.shape, m[..., LINEAR]
        tb = None if cu_seqlens is None else token_block
        ci = None if cu_seqlens is None else f["chunk_indices"](cu_seqlens, C)
        # k·m and fla's chunk-local cumsum of the gate (log2 units, float32) in one natsl launch
        k_m, gc = masked_write_fwd(k, m, None if g is None else g.contiguous(), chunk_size=C, scale=f["RCP_LN2"],
                                   cu_seqlens=cu_seqlens, chunk_indices=ci)
        if family == DELTA and gc is None:  # deltanet: gdn with g = 0
            gc = k.new_zeros(k.shape[:3], dtype=torch.float32)
        gs = gc  # the gate of the carried state: decays only in blocks with z = 1 (decay_through_softmax=False)
        if z is not None and gc is not None:
            z_tok = blocks_to_tokens(z, T, C, tb)
            gs = gc * (z_tok if family != KEY else z_tok[..., None])
        A = w = u = None
        if family == DELTA:
            w, u, A = f["fwd_intra"](k=k, v=v, g=gc, beta=beta, cu_seqlens=cu_seqlens, chunk_indices=ci,
                                     chunk_size=C)
        h, v_new, ht = _states(f, family, k_m, v, gs, h0, output_final_state, cu_seqlens, ci, C, w, u)
        if family == KEY:
            A = f["gla"].chunk_gla_fwd_intra_gk(q=q, k=k, g=gc, scale=scale, cu_seqlens=cu_seqlens,
                                                chunk_size=C, chunk_indices=ci)
            o = f["gla"].chunk_gla_fwd_o_gk(q=q, v=v, g=gc, A=A, h=h, scale=scale, cu_seqlens=cu_seqlens,
                                            chunk_size=C, chunk_indices=ci)
        else:
            o = f["chunk_o"].chunk_fwd_o(q=q, k=k, v=v if v_new is None else v_new, h=h,
                                         g=gc if family != KEY else None, scale=scale, cu_seqlens=cu_seqlens,
                                         chunk_size=C, chunk_indices=ci)
        ctx.save_for_backward(q, k, k_m, v, gc, gs, beta, m, z, h0, A, cu_seqlens, ci)
        ctx.family, ctx.scale, ctx.C, ctx.select = family, scale, C, select
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        f = _fla()
        q, k, k_m, v, gc, gs, beta, m, z, h0, A, cu, ci = ctx.saved_tensors
        family, scale, C = ctx.family, ctx.scale, ctx.C
        do = do.contiguous()
        need_dg = ctx.needs_input_grad[4]  # g: not for deltanet's internal g = 0, nor for a frozen gate
        use_z = z is not None and gc is not None
        # the state passes decay by gs; their read of the carried state keeps the real decay: q·exp(G − G_state)
        q_s = q if not use_z else q * torch.exp2(gc - gs if family == KEY else (gc - gs)[..., None]).to(q.dtype)
        co = f["chunk_o"]
        common = dict(cu_seqlens=cu, chunk_size=C, chunk_indices=ci)
        db = dv_fix = dg2 = None
        dv_masked = False  # whether dv holds no write term yet (then the kernel adds m·dv_w, else removes (1-m)·dv_w)
        if family == DELTA:
            w, u = f["recompute_w_u"](k=k, v=v, beta=beta, A=A, g=gc, cu_seqlens=cu, chunk_indices=ci)
            h, v_new, _ = _states(f, family, k_m, v, gs, h0, False, cu, ci, C, w, u)
            dv = co.chunk_bwd_dv_local(q=q, k=k, do=do, g=gc, scale=scale, **common)
            dh, dh0, dv = f["dhu"](q=q_s, k=k_m, w=w, do=do, dv=dv, g=gs, h0=h0, dht=dht, scale=scale, **common)
            dq, dk, dw, dg = co.chunk_bwd_dqkwg(q=q, k=k, v=v_new, do=do, h=h, dh=dh, w=w, g=gc, dv=dv,
                                                scale=scale, **common)
            dk2, dv, db, dg2 = f["wy_bwd"](k=k, v=v, beta=beta, A=A, dw=dw, du=dv, g=gc, cu_seqlens=cu,
                                          chunk_indices=ci)
            dk.add_(dk2)
            x = v_new
        else:
            h, _, _ = _states(f, family, k_m, v, gs, h0, False, cu, ci, C, fp32=True)
            dh, dh0 = f["chunk_h"].chunk_bwd_dh(q=q_s, k=k, v=v, do=do, h0=h0, dht=dht, scale=scale,
                                                g=gs if family == SCALAR else None,
                                                gk=gs if family == KEY else None, cu_seqlens=cu,
                                                chunk_size=C, states_in_fp32=True)
            if family == SCALAR:
                dq, dk, _, dg = co.chunk_bwd_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, g=gc, scale=scale, **common)
                # the intra-chunk part only: the write term (k·m) comes from masked_write_bwd, which reads dh anyway
                dv = co.chunk_bwd_dv_local(q=q, k=k, do=do, g=gc, scale=scale, **common)
                dv_masked = True
            else:
                gla = f["gla"]
                dv = gla.chunk_gla_bwd_dv(k=k, g=gc, A=A, do=do, dh=dh, **common)
                dA = gla.chunk_gla_bwd_dA(v=v, do=do, scale=scale, **common)
                dq, dk = gla.chunk_gla_bwd_dqk_intra(q=q, k=k, g=gc, dA=dA, **common)
                dq, dk, dg = gla.chunk_gla_bwd_dqkg(q=q, k=k, v=v, h=h, g=gc, do=do, dh=dh, dq=dq, dk=dk,
                                                    scale=scale, **common)
            x, dv_fix = v, dv
        dk = dk.contiguous()
        dw = dm_out = None
        if ctx.weights_shape is not None:  # the gradient of the routing weights: m's column written by the kernel
            dw = m.new_zeros(ctx.weights_shape)
            dm_out = dw[..., LINEAR].reshape(-1, m.shape[-1])
        dm = masked_write_bwd(x, k, m.reshape(-1, m.shape[-1]), dh, dk, dv=dv_fix, dv_add=dv_masked, select=ctx.select,
                              dm_out=dm_out,
                              dg=dg if need_dg else None, dg2=dg2 if need_dg else None,
                              g=gc if family != KEY else None,
                              gk=gc if family == KEY else None,
                              z=z.reshape(-1, z.shape[-1]) if use_z and need_dg else None,
                              h=h if use_z and need_dg else None, **common)
        return (None, to_dtype(dq, q.dtype), to_dtype(dk, k.dtype), to_dtype(dv, v.dtype), dg if need_dg else None,
                None if db is None else to_dtype(db, beta.dtype), dm.view(m.shape) if dw is None else dw, None, None,
                dh0, None, None, None, None, None)


def masked_chunk(backend: str, q, k, v, g=None, beta=None, *, block_mask, block_decay=None, scale,
                 initial_state=None, output_final_state=False, cu_seqlens=None, token_block=None,
                 chunk_size: int = FLA_CHUNK, select_grad: bool = False):
    r"""The masked chunk pass (spec §3.2) over fla 0.6.0's chunk functions, one routing block = one fla chunk.

    Args:
        backend (str): `"gdn"`, `"deltanet"`, `"gla"`, `"mamba2"` or `"linear_attn"`.
        q, k (torch.Tensor): `[B, T, H, K]` (k L2-normalised by the caller for the delta rule).
        v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor, Optional): log decay `[B, T, H]` (gdn, mamba2) or `[B, T, H, K]` (gla).
        beta (torch.Tensor, Optional): activated write strength `[B, T, H]` (gdn, deltanet).
        block_mask (torch.Tensor): `[B, N, H]` `m` per (block, head) (1 linear block, 0 softmax block), blocks of
            `chunk_size` tokens restarting at every packed sequence, any strides; or routing weights `[B, N, H, 2]`
            whose linear column (index 1) is `m` (no select enters the graph: the backward writes the weights'
            gradient itself). Carries the router gradient (spec §1.7).
        block_decay (torch.Tensor, Optional): `[B, N, H]` 0/1 whether each block decays the carried state
            (`decay_through_softmax=False`: 1 in linear blocks only); no gradient. Default: `None` (every block).
        scale (float): read-out scale.
        initial_state (torch.Tensor, Optional): `[B or N_seq, H, K, V]`.
        output_final_state (bool): Default: `False`.
        cu_seqlens (torch.LongTensor, Optional): `[N_seq + 1]` packed offsets (`B = 1`).
        token_block (torch.LongTensor, Optional): `[T]` block of every token; needed with `cu_seqlens`.
        chunk_size (int): the routing block size = fla's chunk size (`fla_block_sizes(backend)`). Default: `64`.
        select_grad (bool): the router gradient only in blocks with `m = 1` (`router_grad="selected"`; `m` is then
            0/1 in value): `dm · m`, formed inside the backward kernel. Default: `False`.

    Returns:
        `o [B, T, H, V]` (dtype of `q`) and `final_state [B or N_seq, H, K, V]` (float32) or `None`.
    """
    family = FAMILY[backend]
    if backend == "deltanet":  # the delta rule is gdn with g = 0 (also in float32, which chunk_delta_rule refuses)
        g, block_decay = None, None
    if g is None:
        block_decay = None  # nothing decays
    if beta is not None:
        beta = to_dtype(beta, q.dtype).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    z = None if block_decay is None else block_decay.detach().float().contiguous()
    o, ht = MaskedChunkFunction.apply(family, q, k, v, g, beta, to_dtype(block_mask, torch.float32), z, scale, h0,
                                      output_final_state, cu_seqlens, token_block, chunk_size, select_grad)
    return o, ht
