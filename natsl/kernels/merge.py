"""The NAtS-L layer's weighted two-norm merge with its SiLU output gate (spec §1.6), fused forward and backward.

Per row (one token of one softmax head, width `D = d_va`):

    ω   = softmax(w)                      w: the two logits `W_ω q` of the row (index 0 = softmax, 1 = linear)
    y   = (ω_0 γ_A ⊙ RMS(o_A) + ω_1 γ_L ⊙ RMS(o_L)) ⊙ SiLU(g)        RMS(x) = x / sqrt(mean(x²) + eps)

fla has a fused (gated) RMSNorm of one input but none that mixes two normed inputs by per-row weights, so the
unfused composition materialises and saves about eight `[rows, D]` float32 tensors per layer. This kernel reads
the five inputs once, writes `y` and two float32 `rstd` per row, and recomputes the rest in the backward (which
returns all five input gradients, the two `γ` gradients reduced over a partial sum per program).
Pure-PyTorch twin (test oracle and CPU path): `naive.naive_norm_merge`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from natsl.kernels.naive import naive_norm_merge


@triton.jit
def _load_tile(os_, ol, w, g, gs, gl, N, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """The program's `[BT, BD]` tile of the five inputs, in float32, with its offsets and masks."""
    i_n = tl.program_id(0).to(tl.int64)
    rows = i_n * BT + tl.arange(0, BT)
    cols = tl.arange(0, BD)
    m_r, m_c = rows < N, cols < D
    mask = m_r[:, None] & m_c[None, :]
    off = rows[:, None] * D + cols[None, :]
    b_os = tl.load(os_ + off, mask=mask, other=0.).to(tl.float32)
    b_ol = tl.load(ol + off, mask=mask, other=0.).to(tl.float32)
    b_g = tl.load(g + off, mask=mask, other=0.).to(tl.float32)
    b_ws = tl.sigmoid(tl.load(w + rows * 2, mask=m_r, other=0.).to(tl.float32)
                      - tl.load(w + rows * 2 + 1, mask=m_r, other=0.).to(tl.float32))  # the two-way softmax
    b_gs = tl.load(gs + cols, mask=m_c, other=0.).to(tl.float32)
    b_gl = tl.load(gl + cols, mask=m_c, other=0.).to(tl.float32)
    return i_n, rows, cols, m_r, m_c, mask, off, b_os, b_ol, b_g, b_ws, b_gs, b_gl


@triton.jit
def norm_merge_fwd_kernel(os_, ol, w, g, gs, gl, y, rs, rl, eps, N, D: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr):
    i_n, rows, cols, m_r, m_c, mask, off, b_os, b_ol, b_g, b_ws, b_gs, b_gl = _load_tile(
        os_, ol, w, g, gs, gl, N, D, BT, BD)
    b_rs = 1. / tl.sqrt(tl.sum(b_os * b_os, 1) / D + eps)
    b_rl = 1. / tl.sqrt(tl.sum(b_ol * b_ol, 1) / D + eps)
    b_m = (b_ws * b_rs)[:, None] * b_os * b_gs[None, :] + ((1. - b_ws) * b_rl)[:, None] * b_ol * b_gl[None, :]
    b_y = b_m * (b_g * tl.sigmoid(b_g))
    tl.store(y + off, b_y.to(y.dtype.element_ty), mask=mask)
    tl.store(rs + rows, b_rs, mask=m_r)
    tl.store(rl + rows, b_rl, mask=m_r)


@triton.jit
def norm_merge_bwd_kernel(os_, ol, w, g, gs, gl, rs, rl, dy, dos, dol, dw, dg, dgs, dgl, N, D: tl.constexpr,
                          BT: tl.constexpr, BD: tl.constexpr):
    i_n, rows, cols, m_r, m_c, mask, off, b_os, b_ol, b_g, b_ws, b_gs, b_gl = _load_tile(
        os_, ol, w, g, gs, gl, N, D, BT, BD)
    b_dy = tl.load(dy + off, mask=mask, other=0.).to(tl.float32)
    b_rs = tl.load(rs + rows, mask=m_r, other=0.)
    b_rl = tl.load(rl + rows, mask=m_r, other=0.)
    b_wl = 1. - b_ws
    b_ns, b_nl = b_os * b_rs[:, None], b_ol * b_rl[:, None]
    b_as, b_al = b_ns * b_gs[None, :], b_nl * b_gl[None, :]
    b_sig = tl.sigmoid(b_g)
    b_m = b_ws[:, None] * b_as + b_wl[:, None] * b_al
    b_dm = b_dy * b_g * b_sig
    b_dg = b_dy * b_m * b_sig * (1. + b_g * (1. - b_sig))
    b_dw0 = b_ws * b_wl * (tl.sum(b_dm * b_as, 1) - tl.sum(b_dm * b_al, 1))
    b_dns = b_dm * b_ws[:, None] * b_gs[None, :]
    b_dnl = b_dm * b_wl[:, None] * b_gl[None, :]
    b_dos = b_rs[:, None] * (b_dns - b_ns * (tl.sum(b_dns * b_ns, 1) / D)[:, None])
    b_dol = b_rl[:, None] * (b_dnl - b_nl * (tl.sum(b_dnl * b_nl, 1) / D)[:, None])
    tl.store(dos + off, b_dos.to(dos.dtype.element_ty), mask=mask)
    tl.store(dol + off, b_dol.to(dol.dtype.element_ty), mask=mask)
    tl.store(dg + off, b_dg.to(dg.dtype.element_ty), mask=mask)
    tl.store(dw + rows * 2, b_dw0.to(dw.dtype.element_ty), mask=m_r)
    tl.store(dw + rows * 2 + 1, (-b_dw0).to(dw.dtype.element_ty), mask=m_r)
    tl.store(dgs + i_n * D + cols, tl.sum(b_dm * b_ws[:, None] * b_ns, 0), mask=m_c)
    tl.store(dgl + i_n * D + cols, tl.sum(b_dm * b_wl[:, None] * b_nl, 0), mask=m_c)


def _tiles(N: int, D: int) -> tuple[int, int, int]:
    BD = triton.next_power_of_2(D)
    BT = max(1, min(64, 4096 // BD))
    return BT, BD, triton.cdiv(N, BT)


def norm_merge_fwd(o_s, o_l, w, g, gamma_s, gamma_l, eps: float):
    """Rows `[N, D]` (`w [N, 2]`) → `(y [N, D] in o_s's dtype, rstd_s [N], rstd_l [N])`; no autograd."""
    N, D = o_s.shape
    y = torch.empty_like(o_s)
    rs = torch.empty(N, device=o_s.device, dtype=torch.float32)
    rl = torch.empty_like(rs)
    BT, BD, NP = _tiles(N, D)
    if N:
        norm_merge_fwd_kernel[(NP,)](o_s, o_l, w, g, gamma_s, gamma_l, y, rs, rl, eps, N, D=D, BT=BT, BD=BD)
    return y, rs, rl


def norm_merge_bwd(o_s, o_l, w, g, gamma_s, gamma_l, rs, rl, dy):
    """The gradients `(do_s, do_l, dw, dg, dgamma_s, dgamma_l)` of :func:`norm_merge_fwd`; no autograd."""
    N, D = o_s.shape
    BT, BD, NP = _tiles(N, D)
    dos, dol, dw, dg = torch.empty_like(o_s), torch.empty_like(o_l), torch.empty_like(w), torch.empty_like(g)
    dgs = torch.zeros(max(NP, 1), D, device=o_s.device, dtype=torch.float32)
    dgl = torch.zeros_like(dgs)
    if N:
        norm_merge_bwd_kernel[(NP,)](o_s, o_l, w, g, gamma_s, gamma_l, rs, rl, dy, dos, dol, dw, dg, dgs, dgl, N,
                                     D=D, BT=BT, BD=BD)
    return dos, dol, dw, dg, dgs.sum(0).to(gamma_s.dtype), dgl.sum(0).to(gamma_l.dtype)


class NormMergeFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, o_s, o_l, w, g, gamma_s, gamma_l, eps):
        y, rs, rl = norm_merge_fwd(o_s, o_l, w, g, gamma_s, gamma_l, eps)
        ctx.save_for_backward(o_s, o_l, w, g, gamma_s, gamma_l, rs, rl)
        return y

    @staticmethod
    def backward(ctx, dy):
        o_s, o_l, w, g, gamma_s, gamma_l, rs, rl = ctx.saved_tensors
        return (*norm_merge_bwd(o_s, o_l, w, g, gamma_s, gamma_l, rs, rl, dy.contiguous()), None)


def norm_merge(o_s: torch.Tensor, o_l: torch.Tensor, w: torch.Tensor, g: torch.Tensor, gamma_s: torch.Tensor,
               gamma_l: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`(softmax(w)_0 γ_s ⊙ RMS(o_s) + softmax(w)_1 γ_l ⊙ RMS(o_l)) ⊙ SiLU(g)` row-wise (spec §1.6).

    Args:
        o_s, o_l (torch.Tensor): `[..., D]` the two branch outputs of one softmax head (same shape and dtype).
        w (torch.Tensor): `[..., 2]` the merge logits (index 0 = `o_s`).
        g (torch.Tensor): `[..., D]` the output gate before SiLU.
        gamma_s, gamma_l (torch.Tensor): `[D]` the two RMSNorm weights.
        eps (float): RMSNorm epsilon. Default: `1e-5`.

    Returns:
        `y [..., D]` in the dtype of `o_s`. The Triton kernel runs for CUDA tensors (float16/bfloat16/float32);
        otherwise, and for float64, its twin :func:`natsl.kernels.naive.naive_norm_merge` (the same maths).
    """
    shape = o_s.shape
    if o_l.shape != shape or g.shape != shape or w.shape != (*shape[:-1], 2):
        raise ValueError(f"o_l and g must have the shape of o_s {tuple(shape)} and w {(*shape[:-1], 2)}, got "
                         f"{tuple(o_l.shape)}, {tuple(g.shape)}, {tuple(w.shape)}")
    if gamma_s.shape != shape[-1:] or gamma_l.shape != shape[-1:]:
        raise ValueError(f"gamma_s and gamma_l must have shape [{shape[-1]}], got {tuple(gamma_s.shape)}, "
                         f"{tuple(gamma_l.shape)}")
    if o_s.dtype == torch.float64 or not o_s.is_cuda:
        return naive_norm_merge(o_s, o_l, w, g, gamma_s, gamma_l, eps)
    rows = [t.reshape(-1, t.shape[-1]).contiguous() for t in (o_s, o_l, w, g)]
    return NormMergeFunction.apply(*rows, gamma_s.contiguous(), gamma_l.contiguous(), eps).view(shape)

