"""Per-backend gates of the linear recurrence (spec §1.4), parameterised as fla's layer of each backend.

gdn: `g = -exp(A_log) · softplus(a_proj(x) + dt_bias)`, `β = sigmoid(b_proj(x))` (fla `GatedDeltaNet`);
deltanet: `β = sigmoid(b_proj(x))`; gla: `gk = logsigmoid(gk_proj(x)) / 16` with a rank-16 `gk_proj` (fla `GLA`);
mamba2: `dt = softplus(a_proj(x) + dt_bias)`, `g = -exp(A_log) · dt`, `v ← v · dt` and a `D` skip (SSD);
linear_attn: no gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from natsl.utils import LINEAR_BACKENDS, check_choice, upcast

GLA_GATE_LOW_RANK = 16
GLA_GATE_NORMALIZER = 16


class LinearGates(nn.Module):
    """Computes `(g, beta, dt)` from the layer input; each is `None` where the backend does not use it.

    Args:
        hidden_size (int): input width `D`.
        num_heads (int): linear heads `H`.
        head_dim (int): key dim `K` (the width of GLA's per-key decay).
        backend (str): one of `gdn`, `deltanet`, `gla`, `mamba2`, `linear_attn`.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, backend: str):
        super().__init__()
        check_choice("linear_backend", backend, LINEAR_BACKENDS)
        self.backend, self.num_heads, self.head_dim = backend, num_heads, head_dim
        if backend in ("gdn", "deltanet"):
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if backend in ("gdn", "mamba2"):
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
            dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        if backend == "mamba2":
            self.D = nn.Parameter(torch.ones(num_heads))
            self.D._no_weight_decay = True
        if backend == "gla":
            self.gk_proj = nn.Sequential(nn.Linear(hidden_size, GLA_GATE_LOW_RANK, bias=False),
                                         nn.Linear(GLA_GATE_LOW_RANK, num_heads * head_dim, bias=True))

    def forward(self, x: torch.Tensor):
        """`x [B, T, D]` → `(g [B,T,H] or [B,T,H,K], beta [B,T,H], dt [B,T,H])` in at least float32, or `None`s."""
        B, T, _ = x.shape
        g = beta = dt = None
        if self.backend in ("gdn", "deltanet"):
            beta = upcast(self.b_proj(x)).sigmoid()
        if self.backend in ("gdn", "mamba2"):
            dt = F.softplus(upcast(self.a_proj(x)) + self.dt_bias)
            g = -upcast(self.A_log).exp() * dt
        if self.backend == "gla":
            g = F.logsigmoid(upcast(self.gk_proj(x))).view(B, T, self.num_heads, self.head_dim) / GLA_GATE_NORMALIZER
        return g, beta, (dt if self.backend == "mamba2" else None)

    def value_input(self, v: torch.Tensor, dt: torch.Tensor | None):
        """Mamba2 feeds `v · dt` to the recurrence; identity for the other backends."""
        return v if dt is None else (upcast(v) * dt[..., None]).to(v.dtype)

    def skip(self, o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Mamba2's `D` skip connection `o + D · v`; identity for the other backends."""
        return o + self.D[:, None].to(o.dtype) * v if self.backend == "mamba2" else o
