"""The routing contract (spec §1.2–1.5, §3.1): block types per (batch, block, router head) and derived views.

`Routing` holds one canonical tensor, `weights [B, N, Hr, 2]` (hard one-hot in value, index 0 = softmax,
1 = linear, possibly carrying straight-through gradients), plus the block size, the diagonal policy and, for
packed input, `cu_seqlens`. Every other view is derived from it on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

from natsl.kernels.index import BlockLayout, SoftmaxBlocks, block_layout, num_blocks, softmax_blocks, token_destination
from natsl.utils import ROUTER_GRADS, check_choice, check_cu_seqlens

Diagonal = Literal["both", "linear"]
DIAGONALS = ("both", "linear")
SOFTMAX, LINEAR = 0, 1


def routing_gates(routing: torch.Tensor, router_grad: str = "selected") -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxed gates `(m_A, m_L)`, each `[B, N, Hr]` float64, equal in value to the hard one-hot routing.

    With `router_grad="selected"` only the selected branch's gate carries the routing's gradient (spec §1.7).
    """
    check_choice("router_grad", router_grad, ROUTER_GRADS)
    w = routing.double()
    if router_grad == "both":
        return w[..., 0], w[..., 1]
    is_soft = (routing.detach().argmax(-1) == SOFTMAX).double()
    return w[..., 0] * is_soft, w[..., 1] * (1 - is_soft)


@dataclass(frozen=True)
class Routing:
    """Block routing of one layer call.

    Args:
        weights (torch.Tensor): `[B, N, Hr, 2]` float, exactly one-hot in value (index 0 = softmax, 1 = linear).
            May carry straight-through gradients.
        block_size (int): tokens per block `C`. Default: `64`.
        diagonal (str): own-block policy (spec §1.5): `"both"` (both branches see the own block causally) or
            `"linear"` (no own-block softmax term). Default: `"both"`.
        cu_seqlens (torch.LongTensor, Optional): `[N_seq + 1]` offsets of packed sequences (then `B == 1` and
            blocks restart at every sequence start).
    """

    weights: torch.Tensor
    block_size: int = 64
    diagonal: Diagonal = "both"
    cu_seqlens: torch.Tensor | None = field(default=None)

    def __post_init__(self):
        if not isinstance(self.weights, torch.Tensor) or not self.weights.is_floating_point():
            raise TypeError("routing must be a floating-point tensor [B, N, Hr, 2]")
        if self.weights.dim() != 4 or self.weights.shape[-1] != 2:
            raise ValueError(f"routing must have shape [B, N, Hr, 2], got {tuple(self.weights.shape)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.diagonal not in DIAGONALS:
            raise ValueError(f"diagonal must be one of {DIAGONALS}, got {self.diagonal!r}")

    @property
    def B(self) -> int:
        return self.weights.shape[0]

    @property
    def N(self) -> int:
        return self.weights.shape[1]

    @property
    def num_router_heads(self) -> int:
        return self.weights.shape[2]

    def validate(self, T: int) -> None:
        """Check the block count against `T` (and `cu_seqlens`) and that weights are one-hot (host syncs)."""
        if self.cu_seqlens is not None:
            check_cu_seqlens(self.cu_seqlens, T, self.B)
        expected = num_blocks(T, self.block_size, self.cu_seqlens)
        if expected != self.N:
            raise ValueError(f"routing has {self.N} blocks, but T={T} with block_size={self.block_size}"
                             f"{' and the given cu_seqlens' if self.cu_seqlens is not None else ''} needs {expected}")
        w = self.weights.detach()
        if not (((w == 0) | (w == 1)).all() and (w.sum(-1) == 1).all()):
            raise ValueError("routing must be exactly one-hot in value along its last dim (index 0 = softmax, "
                             "1 = linear); apply the straight-through estimator before passing it")

    def layout(self, T: int) -> BlockLayout:
        """The `BlockLayout` of `T` tokens (built once per `T` and cached on the instance)."""
        cache = self.__dict__.setdefault("_layout_cache", {})
        if T not in cache:
            cache[T] = block_layout(T, self.block_size, self.cu_seqlens, N=self.N, device=self.weights.device)
        return cache[T]

    @cached_property
    def types(self) -> torch.Tensor:
        """`[B, N, Hr]` int64 block types from the argmax (0 = softmax, 1 = linear)."""
        return self.weights.detach().argmax(-1)

    def is_softmax(self) -> torch.Tensor:
        """`[B, N, Hr]` bool."""
        return self.types == SOFTMAX

    def token_mask(self, T: int) -> torch.Tensor:
        """`[B, T, Hr]` bool: whether token t lies in a softmax block of router head r."""
        return self.is_softmax()[:, self.layout(T).token_block]

    def dense_mask(self, T: int) -> torch.Tensor:
        """`[B, Hr, T, T]` bool: whether query t sees key s in the softmax branch (spec §1.3, §1.5)."""
        lay = self.layout(T)
        tb, ts = lay.token_block, lay.token_seq
        same_seq = ts[:, None] == ts[None, :]
        causal = torch.ones(T, T, dtype=torch.bool, device=tb.device).tril()
        own = (tb[:, None] == tb[None, :]) & causal
        past = (tb[None, :] < tb[:, None]) & same_seq  # [T(q), T(k)]
        key_soft = self.token_mask(T).permute(0, 2, 1)[:, :, None, :]  # [B, Hr, 1, T(k)]
        mask = past & key_soft
        if self.diagonal != "linear":
            mask = mask | own
        return mask

    def softmax_blocks(self, T: int) -> SoftmaxBlocks:
        """Per (batch, router head) sorted softmax-block indices, counts and `cu_seqlens` (one host sync)."""
        return softmax_blocks(self.is_softmax(), self.layout(T))

    def token_destination(self, T: int, blocks: SoftmaxBlocks | None = None) -> torch.Tensor:
        """`[B, T, Hr]` index of every token in the packed softmax token layout (`-1` if linear)."""
        blocks = self.softmax_blocks(T) if blocks is None else blocks
        return token_destination(self.token_mask(T), blocks.cu_tokens)

    def gates(self, router_grad: str = "selected") -> tuple[torch.Tensor, torch.Tensor]:
        """`(m_A, m_L)`, each `[B, N, Hr]` float64: see `routing_gates`."""
        return routing_gates(self.weights, router_grad)

    def softmax_fraction(self) -> torch.Tensor:
        """`[Hr]` fraction of blocks routed to softmax, per router head (over batch and blocks)."""
        return self.is_softmax().float().mean(dim=(0, 1))
