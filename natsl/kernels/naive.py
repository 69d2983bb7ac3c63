"""Pure-PyTorch twins of the gather/scatter kernels (spec §3.4): the test oracle and the fallback on devices
without a Triton backend. Differentiable through PyTorch's own indexing ops."""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def naive_gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`[S, W]`: `x_rows[idx[j]]` for `0 <= idx[j] < R`, else a zero row (`x` is `[*R, W]`)."""
    rows = _rows(x)
    R = rows.shape[0]
    idx = idx.long()
    valid = (idx >= 0) & (idx < R)
    picked = rows[idx.clamp(0, max(R - 1, 0))] if R else rows.new_zeros(idx.shape[0], rows.shape[1])
    return torch.where(valid[:, None], picked, picked.new_zeros(()))


def _scatter(y: torch.Tensor, idx: torch.Tensor, num_rows: int, accumulate: bool) -> torch.Tensor:
    rows = _rows(y)
    idx = idx.long()
    keep = (idx >= 0) & (idx < num_rows)
    dtype = rows.dtype if not accumulate or rows.dtype == torch.float64 else torch.float32
    out = rows.new_zeros(num_rows, rows.shape[1], dtype=dtype)
    return out.index_put((idx[keep],), rows[keep].to(dtype), accumulate=accumulate).to(rows.dtype)


def naive_scatter_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows, W]`: zero, with `y_rows[j]` written to row `idx[j]` where `0 <= idx[j] < num_rows`."""
    return _scatter(y, idx, num_rows, accumulate=False)


def naive_scatter_add_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows, W]`: zero, with `y_rows[j]` added to row `idx[j]` (float32 accumulation for half types)."""
    return _scatter(y, idx, num_rows, accumulate=True)


def naive_gather_tokens(x: torch.Tensor, src: torch.Tensor, num_router_heads: int) -> torch.Tensor:
    """`[S, G, D]`: rows `src` of the `[B*T*Hr, G*D]` view of `x [B, T, H, D]` (`G = H / Hr`)."""
    B, T, H, D = x.shape
    G = H // num_router_heads
    return x.reshape(B * T * num_router_heads, G, D)[src.long()]


def naive_scatter_tokens(y: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """`[B, T, Hr*G, D]`: `y[dest[b, t, r]]` in the heads of router head `r`, zero where `dest < 0`."""
    S, G, D = y.shape
    B, T, Hr = dest.shape
    routed = dest >= 0
    out = y.new_zeros(B, T, Hr, G, D)
    return out.index_put(torch.nonzero(routed, as_tuple=True), y[dest[routed].long()]).view(B, T, Hr * G, D)
