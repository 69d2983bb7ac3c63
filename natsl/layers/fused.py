"""Norms, gates, MLP, rotary and LM loss: fla's fused kernels on CUDA, PyTorch twins elsewhere (issue 20).

Every function here has one semantics and two implementations. On a CUDA tensor of a float dtype fla runs with fla
installed (`fla.modules`: `rms_norm`, `rms_norm_gated`, `l2norm`, `swiglu_linear`, `rotary_embedding`,
`FusedCrossEntropyLoss`); elsewhere (CPU, float64, no fla) the `*_torch` twin computes the same maths in at
least float32. `tests/gpu/test_fused_gpu.py` holds each fused path equal to its twin on the H200, so the CPU suite
tests the semantics the GPU runs. Output dtypes follow fla: a norm returns its input's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from natsl.utils import upcast

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
L2_NORM_EPS = 1e-6  # fla's l2norm (and its in-kernel q/k normalisation): x / sqrt(Σx² + eps)


@functools.cache
def fla_modules_available() -> bool:
    try:
        import fla.modules  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(x: torch.Tensor) -> bool:
    """Whether fla's fused kernels run for `x`: a CUDA tensor of float16/bfloat16/float32 with fla importable."""
    return x.is_cuda and x.dtype in FUSED_DTYPES and fla_modules_available()


def _rms_f32(xf: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`xf / sqrt(mean(xf²) + eps) · weight` over the last dim, in `xf`'s (at least float32) dtype."""
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   prenorm: bool = False):
    """Twin of fla's `rms_norm`: `r = x (+ residual)`, `y = r / sqrt(mean(r²) + eps) · weight` in `x`'s dtype;
    with `prenorm` also returns `r` (in `residual`'s dtype)."""
    r = x if residual is None else (upcast(x) + upcast(residual)).to(residual.dtype)
    y = _rms_f32(upcast(r), weight, eps).to(x.dtype)
    return (y, r) if prenorm else y


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (`weight` init 1), optionally fused with the residual add (fla's `rms_norm`).

    `forward(x)` → `y` (dtype of `x`); `forward(x, residual, prenorm=True)` → `(norm(x + residual), x + residual)`,
    the sum kept in `residual`'s dtype (the float32 residual stream of a pre-norm block).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        if use_fused(x):
            from fla.modules.layernorm import rms_norm

            return rms_norm(x, self.weight, None, residual=residual, eps=self.eps, prenorm=prenorm)
        return rms_norm_torch(x, self.weight, self.eps, residual, prenorm)


def gated_rms_norm_torch(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Twin of fla's `rms_norm_gated(activation="swish")`: `RMS(x) · weight ⊙ SiLU(g)` in `x`'s dtype."""
    return (_rms_f32(upcast(x), weight, eps) * F.silu(upcast(g))).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """`RMS(x) · weight ⊙ SiLU(g)` over the last dim (fla's `FusedRMSNormGated`, swish gate); `x, g [..., D]`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from fla.modules.fused_norm_gate import rms_norm_gated

            return rms_norm_gated(x, g, self.weight, None, activation="swish", eps=self.eps)
        return gated_rms_norm_torch(x, g, self.weight, self.eps)


def l2_norm_torch(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Twin of fla's `l2norm`: `x / sqrt(Σ x² + 1e-6)` over the last dim, in `out_dtype` (default `x`'s)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)).to(out_dtype or x.dtype)


def l2_norm(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """L2-normalise the last dim of `x [..., K]` (the linear heads' q/k, spec §1.1)."""
    if use_fused(x):
        from fla.modules.l2norm import l2norm

        return l2norm(x.contiguous(), eps=L2_NORM_EPS, output_dtype=out_dtype)
    return l2_norm_torch(x, out_dtype)


class SwiGLU(nn.Module):
    """`down_proj(SiLU(gate_proj(x)) ⊙ up_proj(x))`; on CUDA fla's `swiglu_linear` (the product is not saved)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if use_fused(gate):
            from fla.modules.activations import swiglu_linear

            return swiglu_linear(gate, up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(F.silu(gate) * up)


def _rope_angles(pos: torch.Tensor, D: int, theta: float) -> torch.Tensor:
    """`[T, D/2]` float32 rotation angles `pos_t · θ^(-2i/D)`."""
    inv = theta ** (-torch.arange(0, D // 2, device=pos.device, dtype=torch.float32) * 2 / D)
    return pos.float()[:, None] * inv[None]


def rotary_torch(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of `x [B, T, H, D]` at integer positions `pos [T]` (computed in float32)."""
    ang = _rope_angles(pos, x.shape[-1], theta)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def rotary(x: torch.Tensor, theta: float, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of `x [B, T, H, D]` at positions `0..T-1`, restarting at every packed sequence start (`cu_seqlens`);
    fla's `rotary_embedding` (non-interleaved, the rotate-half layout) on CUDA."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    if use_fused(x):
        from fla.modules.rotary import rotary_embedding

        ang = _rope_angles(pos, x.shape[-1], theta)
        # fla's kernel takes cos/sin in x's dtype; rotating in float32 keeps the twin's precision for bf16 inputs
        return rotary_embedding(x.float(), ang.cos(), ang.sin(), cu_seqlens=cu_seqlens).to(x.dtype)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        pos = pos - cu[torch.searchsorted(cu[1:], pos, right=True)]
    return rotary_torch(x, pos, theta)


def cross_entropy_torch(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Twin of fla's `FusedCrossEntropyLoss`: mean cross-entropy of `logits [N, V]` (in float32 or float64) against
    `target [N]`, `-100` ignored."""
    return F.cross_entropy(upcast(logits), target, ignore_index=-100)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of `logits [N, V]` against `target [N]` (`-100` ignored). On CUDA fla's
    `FusedCrossEntropyLoss` reads the logits in their own dtype (bf16 under autocast) and never materialises a
    float32 copy; elsewhere :func:`cross_entropy_torch`."""
    if use_fused(logits):
        from fla.modules import FusedCrossEntropyLoss

        return FusedCrossEntropyLoss()(logits, target)
    return cross_entropy_torch(logits, target)
