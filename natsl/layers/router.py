"""The block router (spec §1.2): block mean of the layer input → linear → hard one-hot with straight-through grads."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from natsl.kernels.index import BlockLayout, block_layout
from natsl.utils import check_choice, upcast

ROUTER_SAMPLES = ("argmax", "gumbel")


def block_sums(x: torch.Tensor, block_size: int, offset: int = 0) -> torch.Tensor:
    """Sums of `x [B, T, D]` over consecutive blocks of `block_size` tokens, the first of which already holds `offset`
    tokens before `x` → `[B, ceil((offset + T) / C), D]`, accumulated in at least float32 (read in `x`'s dtype).

    A view of `x` padded to whole blocks (no copy when it starts and ends at block boundaries), summed over each
    block: no float32 copy of `x`, no `index_add_`."""
    B, T, D = x.shape
    C = block_size
    n = -(-(offset + T) // C)
    if offset or n * C != T:
        x = F.pad(x, (0, 0, offset, n * C - offset - T))
    return x.reshape(B, n, C, D).sum(2, dtype=torch.promote_types(x.dtype, torch.float32))


def block_mean(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of `x [B, T, D]` over the tokens of each block → `[B, N, D]` (at least float32; partial blocks average the
    tokens present)."""
    B, T, D = x.shape
    if layout.num_seqs is None:  # dense: blocks at multiples of the block size
        s = block_sums(x, layout.block_size)
    else:  # packed: blocks restart at every sequence start
        xf = upcast(x)
        s = xf.new_zeros(B, layout.N, D).index_add_(1, layout.token_block, xf)
    return s / layout.block_len.to(s.dtype)[None, :, None]


def straight_through(logits: torch.Tensor, temperature: float, sample: str, training: bool) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Hard one-hot of the argmax, gradient of `p = softmax(logits / τ)` (spec §1.2).

    With `sample="gumbel"` in training, Gumbel noise is added to the logits first (hard Gumbel-softmax).
    The forward value is exactly one-hot: `hard + (p - p.detach())` adds an exact zero.

    Returns:
        `(weights, p)`, both `[..., 2]`.
    """
    if sample == "gumbel" and training:
        u = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
        logits = logits - torch.log(-torch.log(u))
    p = torch.softmax(logits / temperature, dim=-1)
    soft = p.detach()[..., 0] >= p.detach()[..., 1]  # the argmax (ties: softmax) without `one_hot`'s value check,
    hard = torch.stack([soft, ~soft], -1).to(p.dtype)  # which reads the indices on the host
    return hard + (p - p.detach()), p


class BlockRouter(nn.Module):
    """Routes every block of `block_size` tokens, per router head, to softmax (index 0) or linear (index 1).

    Args:
        hidden_size (int): input width `D`.
        num_router_heads (int): `H_R`.
        block_size (int): tokens per block `C`.
        sample (str): `"argmax"` (paper) or `"gumbel"` (hard Gumbel-softmax while training, argmax in eval).
        temperature (float): `τ` of the straight-through softmax. Default: `1.0`.
    """

    def __init__(self, hidden_size: int, num_router_heads: int, block_size: int,
                 sample: Literal["argmax", "gumbel"] = "argmax", temperature: float = 1.0):
        super().__init__()
        check_choice("router_sample", sample, ROUTER_SAMPLES)
        if not temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {temperature}")
        self.num_router_heads = num_router_heads
        self.block_size = block_size
        self.sample = sample
        self.temperature = temperature
        self.proj = nn.Linear(hidden_size, num_router_heads * 2, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                layout: BlockLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [B, T, D]` → `(weights [B, N, H_R, 2] one-hot with ST gradients, p [B, N, H_R, 2])` in at least float32."""
        if layout is None:
            layout = block_layout(x.shape[1], self.block_size, cu_seqlens, device=x.device)
        return self.decide(block_mean(x, layout))

    def decide(self, xm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decision from block means `xm [B, N, D]` (float32; the training forward and the cached path of
        `NAtSLAttention` share it) → `(weights, p)` as in `forward`."""
        logits = F.linear(xm, self.proj.weight.to(xm.dtype))
        logits = logits.view(*logits.shape[:2], self.num_router_heads, 2)
        return straight_through(logits, self.temperature, self.sample, self.training)
