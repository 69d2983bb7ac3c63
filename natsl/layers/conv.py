"""Causal depthwise short convolution with SiLU (spec §1.1), packed-sequence aware.

Parameters have the layout of `fla.modules.ShortConvolution` (an `nn.Conv1d` with `groups=channels`), so weights
copy between the two. On CUDA with fla installed the forward calls fla's `causal_conv1d` (fp16/bf16/fp32);
elsewhere (and for float64) a pure-PyTorch path (a sum over the kernel's shifts, masked at sequence starts).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FLA_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fla_causal_conv1d():
    try:
        from fla.modules.causal_conv1d.ops import causal_conv1d
    except ImportError:
        return None
    return causal_conv1d


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        cu_seqlens: torch.Tensor | None = None, token_seq_start: torch.Tensor | None = None,
                        activation: bool = True) -> torch.Tensor:
    """`y_t = act(Σ_j w[:, W-1-j] · x_{t-j} + b)` over taps that stay inside `t`'s sequence.

    Args:
        x (torch.Tensor): `[B, T, D]`.
        weight (torch.Tensor): `[D, W]` (fla's `conv.weight.squeeze(1)`).
        bias (torch.Tensor, Optional): `[D]`.
        cu_seqlens (torch.LongTensor, Optional): `[N_seq + 1]` packed offsets (`B == 1`).
        token_seq_start (torch.LongTensor, Optional): `[T]` first token of each token's sequence, if already known.
        activation (bool): apply SiLU. Default: `True`.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    t = torch.arange(T, device=x.device)
    if cu_seqlens is not None and token_seq_start is None:
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        token_seq_start = cu[torch.searchsorted(cu[1:], t, right=True)]
    y = x * weight[:, W - 1]
    for j in range(1, min(W, T)):
        shifted = F.pad(x[:, : T - j], (0, 0, j, 0))
        if token_seq_start is not None:
            shifted = shifted * (t - j >= token_seq_start).to(x.dtype)[None, :, None]
        y = y + shifted * weight[:, W - 1 - j]
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution + SiLU of `x [B, T, D]` with `weight [D, W]`: fla's `causal_conv1d` for CUDA
    tensors of float16/bfloat16/float32 with fla installed, else :func:`causal_conv1d_torch`."""
    if x.is_cuda and x.dtype in FLA_CONV_DTYPES:  # fla's Triton kernel fails to compile for float64
        fla_conv = _fla_causal_conv1d()
        if fla_conv is not None:
            y, _ = fla_conv(x=x, weight=weight, bias=bias, activation="silu", cu_seqlens=cu_seqlens)
            return y
    return causal_conv1d_torch(x, weight, bias, cu_seqlens)


def conv_qkv(x: torch.Tensor, projs, convs, cu_seqlens: torch.Tensor | None = None):
    """`conv_i(proj_i(x))` for the q, k, v pairs of a layer as one matmul over the concatenated projection weights
    and one convolution over the concatenated channels (fla's `GatedDeltaNet` fuses its q/k/v convolution the same
    way); returns the three outputs (views of one tensor)."""
    weight = torch.cat([p.weight for p in projs], 0)
    conv_w = torch.cat([c.weight.squeeze(1) for c in convs], 0)
    bias = None if all(c.bias is None for c in convs) else torch.cat(
        [c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs])
    y = causal_conv1d(F.linear(x, weight), conv_w, bias, cu_seqlens)
    return torch.split(y, [p.out_features for p in projs], dim=-1)


class ShortConv(nn.Conv1d):
    """Depthwise causal convolution + SiLU over `[B, T, D]` (kernel `conv_size`, no bias by default)."""

    def __init__(self, hidden_size: int, conv_size: int = 4, bias: bool = False):
        super().__init__(hidden_size, hidden_size, conv_size, groups=hidden_size, padding=conv_size - 1, bias=bias)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return causal_conv1d(x, self.weight.squeeze(1), self.bias, cu_seqlens)

    def forward_with_state(self, x: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue a sequence (inference cache, spec §1.8): `x [B, T, D]` after the inputs held in `conv_state`.

        Args:
            x (torch.Tensor): `[B, T, D]` the new (pre-convolution) inputs.
            conv_state (torch.Tensor, Optional): `[B, W-1, D]` the last `W-1` inputs before `x` (zeros, or `None`,
                at the sequence start).

        Returns:
            `(y [B, T, D], new_conv_state [B, W-1, D])`; `y` equals the rows of the full-sequence forward.
        """
        W = self.kernel_size[0]
        if conv_state is None and x.shape[1] > 1:  # the sequence start: zero history, nothing to concatenate
            y = self.forward(x)
            T = x.shape[1]
            tail = x[:, T - (W - 1):] if T >= W - 1 else F.pad(x, (0, 0, W - 1 - T, 0))
            return y, tail.clone()  # its own W-1 rows, not a view that would keep all of x in the cache
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], W - 1, x.shape[-1])
        xc = torch.cat([conv_state.to(x.dtype), x], 1)
        if x.shape[1] == 1:  # decode step: one dot product per channel (few kernels; the host is the bottleneck)
            y = (xc * self.weight[:, 0].t().to(x.dtype)).sum(1, keepdim=True)  # 2 ops (an einsum dispatches ~13)
            y = F.silu(y if self.bias is None else y + self.bias)
            return y, xc[:, 1:]
        return self.forward(xc)[:, W - 1:], xc[:, xc.shape[1] - (W - 1):].clone()
