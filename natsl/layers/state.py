"""Per-layer inference state (spec §1.8): what natsl, plain linear and plain softmax layers keep between calls.

Pure tensors plus host integers, changed only through their methods. The layers compute the new values; the
states store them, write softmax K/V rows, commit completed blocks and grow their storage.

Softmax K/V of a natsl layer live in `k_rows [B, H_A, capacity, d]` (and `v_rows`): for every (batch, router
head) pair, rows `[0, lengths[b, r])` hold its committed softmax blocks in order, and rows `[lengths, lengths + n)`
the `n` tokens of the current block so far (so a decode step attends to one contiguous prefix per pair). A prefill
chunk writes only its softmax blocks (`_write_blocks`). A block routed to softmax is committed by advancing
`lengths` by `block_size` (no copy); a linear block is dropped by not advancing it. Capacity grows geometrically
(amortised O(1) copies per row) and is shared by all pairs. Growing needs the new largest length on the host: a
prefill chunk reads it once, copied right after its router decision (`lengths_hint`), so the host waits for that
copy and not for the chunk's attention branches; decode steps use a host bound and read nothing while it fits.
Every tensor a state keeps owns its storage (no views of a chunk's activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from natsl.utils import DECODE_ATTENTIONS, check_choice

GROWTH = 1.5


def linear_step(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                beta: torch.Tensor | None, state: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence of spec §1.4 (decode): read-out after the token's update.

    Args:
        backend (str): `gdn`, `deltanet`, `gla`, `mamba2` or `linear_attn`.
        q, k (torch.Tensor): `[B, 1, H, K]`.
        v (torch.Tensor): `[B, 1, H, V]`.
        g (torch.Tensor, Optional): log decay `[B, 1, H]` (gdn, mamba2) or `[B, 1, H, K]` (gla).
        beta (torch.Tensor, Optional): `[B, 1, H]` (gdn, deltanet).
        state (torch.Tensor): `[B, H, K, V]`.
        scale (float): read-out scale.

    Returns:
        `(o [B, 1, H, V]` in the dtype of `q`, `state [B, H, K, V])` (in at least float32).
    """
    dt = torch.promote_types(state.dtype, torch.float32)
    S = state.to(dt)
    qt, kt, vt = (x[:, 0].to(dt) for x in (q, k, v))
    if backend in ("gdn", "mamba2"):
        S = g[:, 0].to(dt).exp()[..., None, None] * S
    elif backend == "gla":
        S = g[:, 0].to(dt).exp()[..., None] * S
    if backend in ("gdn", "deltanet"):
        kv = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, 0].to(dt)[..., None, None] * kt[..., :, None] * (vt - kv)[..., None, :]
    else:
        S = S + kt[..., :, None] * vt[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qt * scale, S)
    return o[:, None].to(q.dtype), S


def attend_rows(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, limit: torch.Tensor,
                scale: float, impl: str = "sdpa") -> torch.Tensor:
    """Query `t` of head `h` attends to rows `[0, limit[b, h, t])` of its head.

    `impl="sdpa"`: SDPA with a length mask (one pass over all `R` rows per head); `"triton"`: natsl's split-KV
    kernel (`natsl.kernels.decode_attention`: the rows split over programs, lengths read on the device; CUDA, or
    CPU under the Triton interpreter).

    Args:
        q (torch.Tensor): `[B, T, H, d]`.
        k_rows (torch.Tensor): `[B, H, R, d]`.
        v_rows (torch.Tensor): `[B, H, R, d_v]`.
        limit (torch.Tensor): `[B, H, T]` integer, at least 1 and at most `R`.
        scale (float): score scale.
        impl (str): `"sdpa"` or `"triton"`. Default: `"sdpa"`.

    Returns:
        `o [B, T, H, d_v]` in the dtype of `q`.
    """
    check_choice("impl", impl, DECODE_ATTENTIONS)
    if impl == "triton":
        from natsl.kernels.decode_attention import decode_attention

        return decode_attention(q, k_rows, v_rows, limit, scale)
    R = k_rows.shape[2]
    mask = torch.arange(R, device=q.device) < limit[..., None]  # [B, H, T, R]
    o = F.scaled_dot_product_attention(q.transpose(1, 2).to(k_rows.dtype), k_rows, v_rows, attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def _nbytes(*xs) -> int:
    return sum(x.numel() * x.element_size() for x in xs if x is not None)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class EarlyRead:
    """A device integer scalar read on the host without waiting for the work queued after it: the copy into pinned
    memory is queued when this is made, and `value()` waits for that copy (a CUDA event), not for the whole stream.
    On the CPU, or while a stream is being captured, `value()` reads the tensor directly."""

    def __init__(self, x: torch.Tensor):
        self._x, self._event = x, None
        if x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            self._x = torch.empty((), dtype=x.dtype, pin_memory=True)
            self._x.copy_(x, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._x)


class _DevicePosition:
    """`position`: the device copy `[]` int64 of the host counter `seen_tokens` (states with K/V rows)."""

    def device_position(self, device: torch.device) -> torch.Tensor:
        """`[]` int64 tokens seen so far, on the device; created from `seen_tokens` the first time (one copy).
        Module docstring of `natsl.models.graphs`."""
        if self.position is None:  # a fill, not a host-to-device copy (which would wait for the stream)
            self.position = torch.full((), self.seen_tokens, dtype=torch.long, device=device)
        return self.position


@dataclass
class NAtSLLayerState(_DevicePosition):
    """Inference state of one `NAtSLAttention` layer (spec §1.8). Created empty; sized by the first `append`.

    Attributes:
        block_size (int): routing block size `C`.
        num_router_heads (int): `H_R`.
        decay_through_softmax (bool): whether committing a softmax block decays the carried linear state.
        seen_tokens (int): tokens processed so far (the same for every batch row).
        conv (dict[str, torch.Tensor]): `"q"`, `"k"`, `"v"` → `[B, W-1, D]` last inputs of the short convolutions.
        router_sum (torch.Tensor): `[B, D]` sum of the layer input over the current block (at least float32).
        linear_start (torch.Tensor): `[B, H_L, K, V]` linear state `S^{(i)}` at the current block's start.
        linear_run (torch.Tensor): `[B, H_L, K, V]` state of the current block's virtual run after its last token.
        log_decay (torch.Tensor or None): `[B, H_L]` (`[B, H_L, K]` for gla) sum of the log decays of the current
            block's tokens (`None` for backends without decay).
        k_rows, v_rows (torch.Tensor): `[B, H_A, capacity, d]` softmax K/V rows (module docstring).
        lengths (torch.Tensor): `[B, H_R]` int64 committed softmax rows per (batch, router head).
        length_bound (int): host upper bound of `lengths.max()` (avoids a host sync per committed block).
        position (torch.Tensor or None): `[]` int64, `seen_tokens` on the device. Decode steps index rows and
            positions with it, not with the host counter, so that a captured step (CUDA graph) stays valid at
            every position inside a block (`natsl.models.graphs`). Created on first use.
    """

    block_size: int
    num_router_heads: int
    decay_through_softmax: bool = True
    seen_tokens: int = 0
    conv: dict = field(default_factory=dict)
    router_sum: torch.Tensor | None = None
    linear_start: torch.Tensor | None = None
    linear_run: torch.Tensor | None = None
    log_decay: torch.Tensor | None = None
    k_rows: torch.Tensor | None = None
    v_rows: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    length_bound: int = 0
    position: torch.Tensor | None = None

    @property
    def block_pos(self) -> int:
        """Tokens of the current (incomplete) block already seen."""
        return self.seen_tokens % self.block_size

    @property
    def capacity(self) -> int:
        return 0 if self.k_rows is None else self.k_rows.shape[2]

    @property
    def batch_size(self) -> int:
        return -1 if self.lengths is None else self.lengths.shape[0]

    @property
    def initialized(self) -> bool:
        return self.k_rows is not None

    def initialize(self, k: torch.Tensor, v: torch.Tensor, linear_state: torch.Tensor, router_sum: torch.Tensor,
                   log_decay: torch.Tensor | None) -> None:
        """Allocate empty storage like the first chunk's `k [B, T, H_A, d]`, `v`, a linear state `[B, H_L, K, V]`,
        a router sum `[B, D]` and a log-decay sum (or `None`)."""
        B, _, H_A, d = k.shape
        C, Hr = self.block_size, self.num_router_heads
        if H_A % Hr:
            raise ValueError(f"softmax heads H_A={H_A} must be a multiple of the router heads {Hr}")
        self.k_rows = k.new_zeros(B, H_A, C, d)
        self.v_rows = v.new_zeros(B, H_A, C, v.shape[-1])
        self.lengths = torch.zeros(B, Hr, dtype=torch.long, device=k.device)
        self.linear_start = torch.zeros_like(linear_state)
        self.linear_run = self.linear_start
        self.router_sum = torch.zeros_like(router_sum)
        self.log_decay = None if log_decay is None else torch.zeros_like(log_decay)
        self.length_bound = 0
        self.device_position(k.device)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H_R, *]` per pair → `[B, H_A, *]` per softmax head."""
        B, Hr = x.shape[:2]
        G = self.k_rows.shape[1] // Hr
        return x[:, :, None].expand(B, Hr, G, *x.shape[2:]).reshape(B, Hr * G, *x.shape[2:])

    def head_lengths(self) -> torch.Tensor:
        """`[B, H_A]` committed rows of each softmax head."""
        return self._to_heads(self.lengths)

    def _grow(self, needed: int, geometric: bool = True) -> None:
        cap = self.capacity
        new = _round_up(needed, self.block_size)
        if geometric:
            new = max(new, _round_up(int(cap * GROWTH), self.block_size))
        for name in ("k_rows", "v_rows"):
            old = getattr(self, name)
            buf = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
            buf[:, :, :cap] = old[:, :, :cap]
            setattr(self, name, buf)

    def _fits(self, bound: int) -> bool:
        """Whether rows up to the host bound `bound` plus one more block fit in the storage."""
        return bound + self.block_size <= self.capacity

    def _reserve(self, lengths_after: torch.Tensor, bound_after: int, bound_hint: EarlyRead | None = None) -> None:
        """Make room for `lengths_after` plus one more block; reads the lengths on the host only when the host bound
        reaches capacity: `bound_hint` (from `lengths_hint`, a bound of `lengths_after.max()` read early) if given,
        else `lengths_after.max()` (a sync with all queued work)."""
        if not self._fits(bound_after):
            bound_after = bound_hint.value() if bound_hint is not None else int(lengths_after.max())
            if not self._fits(bound_after):
                self._grow(bound_after + self.block_size)
        self.length_bound = bound_after

    def lengths_hint(self, is_softmax: torch.Tensor) -> EarlyRead | None:
        """The largest `lengths` after committing blocks routed `is_softmax [B, n, H_R]` (bool), read back to the
        host early: made before the layer queues its branches, it lets `commit` / `append_blocks` of those blocks
        size the storage without waiting for them (pass it as their `bound_hint`). `None` where the host bound
        already fits all `n` blocks (their commits then read nothing)."""
        if self._fits(self.length_bound + is_softmax.shape[1] * self.block_size):
            return None
        return EarlyRead((self.lengths + self.block_size * is_softmax.sum(1)).max())

    def commit_fits(self) -> bool:
        """Whether committing the current block grows nothing and reads nothing on the host (`_reserve`'s fast path),
        whatever its routing."""
        return self._fits(self.length_bound + self.block_size)

    def advance_replayed(self) -> None:
        """The host counters of one replayed (captured) decode step, which the captured kernels do not run: one more
        token and, if it completed a block, the bound of `lengths` that `commit` advances by `block_size`."""
        self.seen_tokens += 1
        if self.block_pos == 0:
            self.length_bound += self.block_size

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more tokens, whatever their routing, so that no later `append` / `commit` of them
        grows the storage or reads `lengths` on the host (a captured decode step stays valid through them)."""
        if not self.initialized or tokens <= 0:
            return
        C = self.block_size
        needed = self.length_bound + _round_up(self.block_pos + tokens, C) + C  # + the check of `_reserve`
        if needed > self.capacity:
            self._grow(needed, geometric=False)

    def _write(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write `k [B, T, H_A, d]`, `v` at `rows [B, H_R, T]`; returns the rows per softmax head `[B, H_A, T]`."""
        idx = self._to_heads(rows)
        self.k_rows.scatter_(2, idx[..., None].expand(-1, -1, -1, k.shape[-1]), k.transpose(1, 2).to(self.k_rows.dtype))
        self.v_rows.scatter_(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]), v.transpose(1, 2).to(self.v_rows.dtype))
        return idx

    def _write_blocks(self, k: torch.Tensor, v: torch.Tensor, soft: torch.Tensor, added: torch.Tensor) -> None:
        """Write the softmax blocks among `n` whole blocks `k [B, n·C, H_A, d]`, `v` (routing `soft [B, H_R, n]`
        bool, `added [B, H_R]` their count) after each pair's committed rows, without a host sync.

        One block copy (`natsl.kernels.gather_scatter.copy_blocks`) over `w = min(n, capacity / C)` slots per head:
        slot `t < added` receives its `t`-th new softmax block at block `lengths / C + t`. The slots `t ≥ added` copy
        nothing (the kernel); the CPU twin writes them into the free block after the new rows, `lengths / C + added`
        (rows a state holds only after a later `append`: their content is unspecified). `_reserve` guarantees that
        block exists (`capacity ≥ new lengths + C`), so no committed row is touched and no slot wraps."""
        from natsl.kernels.gather_scatter import copy_blocks

        B, Hr, n = soft.shape
        C = self.block_size
        w = min(n, self.capacity // C)
        dev = k.device
        rank = soft.long().cumsum(-1) - 1  # [B, Hr, n] position of each softmax block among the new ones
        order = torch.zeros(B, Hr, w + 1, dtype=torch.long, device=dev)  # + a slot for the dropped blocks
        order.scatter_(2, torch.where(soft, rank, w), torch.arange(n, device=dev).expand(B, Hr, n))
        order, first, count = (self._to_heads(x) for x in (order[..., :w], self.lengths // C, added))
        for rows, new in ((self.k_rows, k), (self.v_rows, v)):
            copy_blocks(new, rows, order, first, count, C)

    def set_conv(self, **states: torch.Tensor) -> None:
        """Replace the short-convolution states (`q=`, `k=`, `v=`; each `[B, W-1, D]`)."""
        self.conv.update(states)

    def append(self, k: torch.Tensor, v: torch.Tensor, *, router_sum: torch.Tensor, linear_run: torch.Tensor,
               log_decay: torch.Tensor | None) -> torch.Tensor:
        """Add `T` tokens of the current block (they must not cross its end).

        Args:
            k, v (torch.Tensor): `[B, T, H_A, d]`, `[B, T, H_A, d_v]` their softmax keys and values.
            router_sum (torch.Tensor): `[B, D]` the block's new router-input sum (including these tokens).
            linear_run (torch.Tensor): `[B, H_L, K, V]` the virtual-run state after these tokens.
            log_decay (torch.Tensor, Optional): the block's new log-decay sum.

        Returns:
            `[B, H_A, T]` the row each token was written to in its softmax head (`attend_current`'s `rows`).
        """
        T, n0 = k.shape[1], self.block_pos
        if n0 + T > self.block_size:
            raise ValueError(f"append got {T} tokens but only {self.block_size - n0} fit in the current block")
        position = self.device_position(k.device)
        rows = self.lengths[..., None] + position % self.block_size  # the block position, from the device counter
        if T > 1:
            rows = rows + torch.arange(T, device=k.device)
        written = self._write(k, v, rows)
        self.router_sum, self.linear_run, self.log_decay = router_sum, linear_run, log_decay
        self.seen_tokens += T
        self.position = position + T
        return written

    def commit(self, is_softmax: torch.Tensor, bound_hint: EarlyRead | None = None) -> None:
        """Route the just-completed block (spec §1.8). `is_softmax [B, H_R]` bool; `bound_hint`: a `lengths_hint`
        covering this block (and possibly later ones).

        softmax: its K/V rows join the committed rows and `S ← Δ(S^{(i)})` (or unchanged without decay through
        softmax); linear: its rows are dropped and `S ← R_i(S^{(i)})`, the end state of its virtual run.
        """
        if self.seen_tokens == 0 or self.block_pos != 0:
            raise ValueError("commit needs a just-completed block")
        S = self.linear_start
        if self.decay_through_softmax and self.log_decay is not None:
            dec = self.log_decay.exp()
            S = (dec[..., None, None] if dec.dim() == 2 else dec[..., None]) * S
        heads = is_softmax.repeat_interleave(S.shape[1] // self.num_router_heads, dim=1)[..., None, None]
        self.linear_start = torch.where(heads, S, self.linear_run)
        self.linear_run = self.linear_start
        self.log_decay = None if self.log_decay is None else torch.zeros_like(self.log_decay)
        self.router_sum = torch.zeros_like(self.router_sum)
        lengths = self.lengths + self.block_size * is_softmax.long()
        self._reserve(lengths, self.length_bound + self.block_size, bound_hint)
        self.lengths = lengths

    def append_blocks(self, k: torch.Tensor, v: torch.Tensor, is_softmax: torch.Tensor,
                      linear_start: torch.Tensor, bound_hint: EarlyRead | None = None) -> None:
        """Add whole blocks at a block boundary and commit them (spec §1.8).

        Args:
            k, v (torch.Tensor): `[B, n·C, H_A, d]`, `[B, n·C, H_A, d_v]`.
            is_softmax (torch.Tensor): `[B, n, H_R]` bool, their routing.
            linear_start (torch.Tensor): `[B, H_L, K, V]` the carried state after the last of them.
            bound_hint (EarlyRead, Optional): a `lengths_hint` covering these blocks.
        """
        C, n = self.block_size, is_softmax.shape[1]
        if self.block_pos != 0 or k.shape[1] != n * C:
            raise ValueError("append_blocks takes whole blocks starting at a block boundary")
        soft = is_softmax.transpose(1, 2)  # [B, Hr, n]
        added = soft.sum(-1)  # new softmax blocks per pair
        lengths = self.lengths + C * added
        self._reserve(lengths, self.length_bound + n * C, bound_hint)
        self._write_blocks(k, v, soft, added)
        self.lengths = lengths
        self.linear_start = self.linear_run = linear_start
        self.router_sum = torch.zeros_like(self.router_sum)
        self.log_decay = None if self.log_decay is None else torch.zeros_like(self.log_decay)
        self.seen_tokens += n * C
        self.position = self.device_position(k.device) + n * C

    def attend_current(self, q: torch.Tensor, scale: float, impl: str, rows: torch.Tensor) -> torch.Tensor:
        """Softmax branch for the last `T` appended tokens, all in the current block (not yet committed): query
        `j` sees its pair's committed rows and the block's rows up to itself. `q [B, T, H_A, d]` → `[B, T, H_A, d_v]`
        (`impl`: see `attend_rows`); `rows [B, H_A, T]`: what `append` returned for these tokens (their rows)."""
        return attend_rows(q, self.k_rows, self.v_rows, rows + 1, scale, impl)  # a token sees the rows up to its own

    def attend_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_softmax: torch.Tensor, scale: float,
                     mask_elements: int = 2**28) -> torch.Tensor:
        """Softmax branch (spec §1.3) of a chunk of `T` new tokens that is not yet appended, against this state.

        Args:
            q, k (torch.Tensor): `[B, T, H_A, d]`; `v`: `[B, T, H_A, d_v]`.
            is_softmax (torch.Tensor): `[B, nb, H_R]` bool, routing of the chunk's blocks (block 0 continues the
                current block; the last one's value is unused).
            scale (float): score scale.
            mask_elements (int): bound on the `[B, H_A, T_q, rows + T]` mask of one SDPA call (queries are tiled).
                Default: `2**28`.

        Returns:
            `o [B, T, H_A, d_v]` in the dtype of `q`.
        """
        B, T, H_A, _ = q.shape
        C, n0 = self.block_size, self.block_pos
        dev = q.device
        cap = self.capacity
        lb = (n0 + torch.arange(T, device=dev)) // C  # [T] chunk-local block of every token
        # visible stored rows per query: committed ones, plus the current block's earlier tokens for queries in
        # that block, or in later blocks if it is routed to softmax
        pre = self.lengths[..., None] + n0 * ((lb == 0) | is_softmax[:, 0, :, None])  # [B, Hr, T]
        soft_key = is_softmax.transpose(1, 2)[:, :, lb]  # [B, Hr, T]
        kk = torch.cat([self.k_rows[:, :, :cap], k.transpose(1, 2).to(self.k_rows.dtype)], 2)
        vv = torch.cat([self.v_rows[:, :, :cap], v.transpose(1, 2).to(self.v_rows.dtype)], 2)
        qh = q.transpose(1, 2).to(self.k_rows.dtype)
        query_tile = max(1, mask_elements // (B * H_A * (cap + T)))
        out = []
        for s in range(0, T, query_tile):
            e = min(T, s + query_tile)
            j = torch.arange(s, e, device=dev)
            stored = torch.arange(cap, device=dev) < pre[:, :, s:e, None]  # [B, Hr, Tq, cap]
            same = (lb[None, :e] == lb[j, None]) & (torch.arange(e, device=dev)[None] <= j[:, None])  # [Tq, e]
            past = (lb[None, :e] < lb[j, None])[None, None] & soft_key[:, :, None, :e]  # [B, Hr, Tq, e]
            mask = self._to_heads(torch.cat([stored, past | same], -1))
            o = F.scaled_dot_product_attention(qh[:, :, s:e], kk[:, :, :cap + e], vv[:, :, :cap + e], attn_mask=mask,
                                               scale=scale)
            out.append(o)
        return torch.cat(out, 2).transpose(1, 2).to(q.dtype)

    def softmax_kv_bytes(self) -> int:
        """Bytes of the committed softmax K/V rows (what the routing keeps: `f·T` per pair). One host sync."""
        if not self.initialized:
            return 0
        G = self.k_rows.shape[1] // self.num_router_heads
        row = G * (self.k_rows.shape[-1] * self.k_rows.element_size() + self.v_rows.shape[-1] * self.v_rows.element_size())
        return int(self.lengths.sum()) * row

    def softmax_kv_allocated_bytes(self) -> int:
        """Bytes of the K/V storage (committed rows, the current block and spare capacity)."""
        return _nbytes(self.k_rows, self.v_rows)

    def linear_state_bytes(self) -> int:
        """Bytes of the linear states (`S^{(i)}`, the virtual run and the log-decay sum)."""
        run = None if self.linear_run is self.linear_start else self.linear_run
        return _nbytes(self.linear_start, run, self.log_decay)

    def other_bytes(self) -> int:
        """Convolution states, router sum and lengths."""
        return _nbytes(*self.conv.values(), self.router_sum, self.lengths)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows `index` (beam search)."""
        for name in ("router_sum", "linear_start", "linear_run", "log_decay", "k_rows", "v_rows", "lengths"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x.index_select(0, index.to(x.device)))
        self.conv = {n: x.index_select(0, index.to(x.device)) for n, x in self.conv.items()}

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times (interleaved)."""
        if self.lengths is not None:
            self.select_batch(torch.arange(self.lengths.shape[0], device=self.lengths.device).repeat_interleave(repeats))


@dataclass
class LinearLayerState:
    """Inference state of a plain linear-attention layer: short-convolution states and the recurrent state.

    Attributes:
        seen_tokens (int): tokens processed so far.
        conv (dict[str, torch.Tensor]): `"q"`, `"k"`, `"v"` → `[B, W-1, D]`.
        state (torch.Tensor or None): `[B, H, K, V]` recurrent state.
    """

    seen_tokens: int = 0
    conv: dict = field(default_factory=dict)
    state: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.shape[0]

    def reserve(self, tokens: int) -> None:
        """Nothing grows in a linear layer's state."""

    def advance_replayed(self) -> None:
        """The host counter of one replayed decode step."""
        self.seen_tokens += 1

    def append(self, tokens: int, state: torch.Tensor, **conv: torch.Tensor) -> None:
        """Record `tokens` more tokens: the new recurrent state and convolution states."""
        self.state = state
        self.conv.update(conv)
        self.seen_tokens += tokens

    def linear_state_bytes(self) -> int:
        return _nbytes(self.state)

    def other_bytes(self) -> int:
        return _nbytes(*self.conv.values())

    def select_batch(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, index.to(self.state.device))
        self.conv = {n: x.index_select(0, index.to(x.device)) for n, x in self.conv.items()}

    def repeat_batch(self, repeats: int) -> None:
        if self.state is not None:
            self.select_batch(torch.arange(self.state.shape[0], device=self.state.device).repeat_interleave(repeats))


@dataclass
class SoftmaxLayerState(_DevicePosition):
    """Inference state of a plain softmax layer: the full K/V of every past token.

    Attributes:
        seen_tokens (int): tokens processed so far (= rows in use).
        k_rows, v_rows (torch.Tensor or None): `[B, H, capacity, d]`, grown geometrically.
        position (torch.Tensor or None): `[]` int64, `seen_tokens` on the device (rows are written and read by it,
            see `NAtSLLayerState`).
    """

    seen_tokens: int = 0
    k_rows: torch.Tensor | None = None
    v_rows: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k_rows is None else self.k_rows.shape[2]

    @property
    def batch_size(self) -> int:
        return -1 if self.k_rows is None else self.k_rows.shape[0]

    def _grow(self, new: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Storage of `new` rows like `k, v [B, *, H, d]` (batch, heads, dims, dtype, device), the used rows kept."""
        B, _, H, _ = k.shape
        rows = []
        for old, x in ((self.k_rows, k), (self.v_rows, v)):
            buf = x.new_zeros(B, H, new, x.shape[-1])
            if old is not None:
                buf[:, :, :self.seen_tokens] = old[:, :, :self.seen_tokens]
            rows.append(buf)
        self.k_rows, self.v_rows = rows

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more tokens (no growth, hence no re-capture, while they are appended)."""
        if self.k_rows is not None and self.seen_tokens + tokens > self.capacity:
            self._grow(self.seen_tokens + tokens, self.k_rows.transpose(1, 2), self.v_rows.transpose(1, 2))

    def advance_replayed(self) -> None:
        """The host counter of one replayed decode step (its K/V row is written on the device)."""
        self.seen_tokens += 1

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add `k, v [B, T, H, d]` after the rows in use."""
        T = k.shape[1]
        end = self.seen_tokens + T
        if end > self.capacity:
            self._grow(max(end, int(self.capacity * GROWTH)), k, v)
        position = self.device_position(k.device)
        rows = position + torch.arange(T, device=k.device) if T > 1 else position[None]
        self.k_rows.index_copy_(2, rows, k.transpose(1, 2).to(self.k_rows.dtype))
        self.v_rows.index_copy_(2, rows, v.transpose(1, 2).to(self.v_rows.dtype))
        self.seen_tokens = end
        self.position = position + T

    def attend_last(self, q: torch.Tensor, scale: float, impl: str = "sdpa") -> torch.Tensor:
        """Causal attention of the last `T` appended tokens' queries `q [B, T, H, d]` → `[B, T, H, d_v]` (`impl`: see
        `attend_rows`)."""
        B, T, H, _ = q.shape
        limit = (self.device_position(q.device) - T + 1 + torch.arange(T, device=q.device)).expand(B, H, T)
        return attend_rows(q, self.k_rows, self.v_rows, limit, scale, impl)

    def kv_bytes(self) -> int:
        if self.k_rows is None:
            return 0
        row = self.k_rows.shape[1] * (self.k_rows.shape[-1] * self.k_rows.element_size()
                                      + self.v_rows.shape[-1] * self.v_rows.element_size())
        return self.seen_tokens * self.k_rows.shape[0] * row

    def kv_allocated_bytes(self) -> int:
        return _nbytes(self.k_rows, self.v_rows)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.k_rows is not None:
            self.k_rows = self.k_rows.index_select(0, index.to(self.k_rows.device))
            self.v_rows = self.v_rows.index_select(0, index.to(self.v_rows.device))

    def repeat_batch(self, repeats: int) -> None:
        if self.k_rows is not None:
            self.select_batch(torch.arange(self.k_rows.shape[0], device=self.k_rows.device).repeat_interleave(repeats))


LAYER_STATES = (NAtSLLayerState, LinearLayerState, SoftmaxLayerState)


def layer_state(cache, layer_idx: int | None, cls: type, **kwargs):
    """The state of layer `layer_idx` of type `cls` inside `cache`, created on first use.

    `cache` is either a layer state itself (layer-level use), or a cache object with
    `layer_state(layer_idx, cls, **kwargs)` (e.g. `natsl.models.cache.NAtSLCache`), or `None` (a new state).
    """
    if cache is None:
        return cls(**kwargs)
    if isinstance(cache, LAYER_STATES):
        if not isinstance(cache, cls):
            raise TypeError(f"this layer needs a {cls.__name__}, got a {type(cache).__name__}")
        return cache
    getter = getattr(cache, "layer_state", None)
    if getter is None:
        raise TypeError(f"past_key_values must be a natsl cache (natsl.models.cache.NAtSLCache) or a natsl layer state, "
                        f"got {type(cache).__name__}")
    if layer_idx is None:
        raise ValueError("a layer used with a multi-layer cache needs its layer_idx")
    return getter(layer_idx, cls, **kwargs)
