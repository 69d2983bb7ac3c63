"""`triton` softmax backend: natsl's block-sparse attention kernels (`natsl.kernels.block_attention`).

One forward kernel and two backward kernels over the routing's block lists: only the visible (query, key) block
pairs are computed, the router gradient (`router_grad="selected"`) is the column sum of `dS` accumulated in the
dk/dv kernel (spec §1.7), and the index lists are built on the device (no host sync, one compile per dtype and head
dims, not per sequence length). CUDA; on CPU only under the Triton interpreter (`TRITON_INTERPRET=1`, tests).
"""

from __future__ import annotations

import torch

from natsl.kernels.block_attention import BLOCK_SIZES, block_attention
from natsl.kernels.gather_scatter import uses_triton
from natsl.layers.routing import Routing

MAX_HEAD_DIM = 256


class TritonSoftmax:
    """Softmax branch over natsl's Triton block-sparse kernels (forward, backward, router gradient)."""

    name = "triton"

    def not_supported_reasons(self, q, k, v, routing: Routing, router_grad: str = "selected") -> list[str]:
        reasons = []
        if not uses_triton(q):
            reasons.append(f"natsl's Triton kernels run on CUDA (or on CPU under TRITON_INTERPRET=1), got {q.device.type}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
        if routing.block_size not in BLOCK_SIZES:
            reasons.append(f"block_size {routing.block_size} (supported: {BLOCK_SIZES})")
        if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
            reasons.append(f"head dims {q.shape[-1]}/{v.shape[-1]} (at most {MAX_HEAD_DIM})")
        if router_grad == "both" and routing.weights.requires_grad and torch.is_grad_enabled():
            reasons.append("the kernels compute the softmax-gate gradient of selected (softmax) blocks only: "
                           "router_grad='both' also needs it for unselected blocks (use backend='sdpa')")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]` (no host sync)."""
        T = q.shape[1]
        lay = routing.layout(T)
        gate = routing.gates(router_grad)[0]
        gate = gate if torch.is_grad_enabled() and gate.requires_grad else None
        return block_attention(q, k, v, routing.is_softmax(), lay.block_first, lay.block_start, lay.block_len,
                               routing.block_size, scale=scale, gate=gate, own=routing.diagonal != "linear")
