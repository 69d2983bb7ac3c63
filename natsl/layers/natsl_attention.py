"""NAtSLAttention: the NAtS-L layer (spec §1.1, §1.2, §1.6) over the op `natsl.natsl_attention`.

proj → short conv + SiLU → route blocks → softmax ∥ linear (one op) → weighted two-norm merge ⊙ SiLU gate → o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from natsl.kernels.index import block_layout
from natsl.kernels.merge import norm_merge
from natsl.layers.conv import ShortConv, conv_qkv
from natsl.layers.fused import RMSNorm, l2_norm, rotary_torch
from natsl.layers.gates import LinearGates
from natsl.layers.router import BlockRouter, block_sums
from natsl.layers.state import NAtSLLayerState, layer_state
from natsl.utils import (
    DECODE_ATTENTIONS,
    LINEAR_BACKENDS,
    SOFTMAX_BACKEND_CHOICES,
    check_choice,
    check_mixer_forward,
    compute_dtype,
    upcast,
)

LinearBackend = Literal["gdn", "deltanet", "gla", "mamba2", "linear_attn"]


def _mean_over_blocks(x: torch.Tensor) -> torch.Tensor:
    """`[B, N, H_R]` → `[H_R]` mean over batch and blocks; zero (not NaN) when there are no blocks (T = 0)."""
    return x.sum(dim=(0, 1)) / max(x.shape[0] * x.shape[1], 1)


@dataclass
class NAtSLLayerStats:
    """What a NAtS-L layer call reports (no activations are stored on the module).

    Attributes:
        softmax_fraction (torch.Tensor): `[H_R]` fraction of blocks routed to softmax (detached).
        router_aux_loss (torch.Tensor or None): scalar router-budget regulariser (`None` when the budget is off).
        router_entropy (torch.Tensor or None): `[H_R]` mean entropy (nats, at most ln 2) of the router's
            probabilities over the blocks (detached); `None` where the call does not compute them (cached steps).
    """

    softmax_fraction: torch.Tensor
    router_aux_loss: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None


class NAtSLAttention(nn.Module):
    """The NAtS-L token-level hybrid attention layer. Defaults: the paper's 340M layer.

    Args:
        hidden_size (int): model width `D`. Default: `1024`.
        num_heads (int): linear heads `H_L`. Default: `6`.
        head_dim (int): linear key dim `d_k`. Default: `128`.
        expand_v (float): `d_v / d_k`. Default: `2`.
        num_softmax_heads (int): softmax heads `H_A` (a view of the same q/k/v channels). Default: `12`.
        num_router_heads (int): router heads `H_R` (divides `H_L` and `H_A`). Default: `6`.
        block_size (int): routing block size `C`. Default: `64`.
        linear_backend (str): `"gdn"`, `"deltanet"`, `"gla"`, `"mamba2"` or `"linear_attn"`. Default: `"gdn"`.
        softmax_backend (str): `"auto"`, `"sdpa"`, `"flex"`, `"flash"` or `"triton"`. Default: `"auto"`.
        linear_impl (str): `"auto"`, `"fla"` or `"torch"`. Default: `"auto"`.
        decode_attention (str): the softmax read of cached steps inside a block (decoding): `"sdpa"` (length-masked
            SDPA) or `"triton"` (natsl's split-KV kernel). Default: `"sdpa"`.
        decay_through_softmax (bool): softmax blocks decay the carried linear state. Default: `True`.
        router_sample (str): `"argmax"` or `"gumbel"`. Default: `"argmax"`.
        router_temperature (float): straight-through softmax temperature. Default: `1.0`.
        router_grad (str): `"selected"` or `"both"` (spec §1.7). Default: `"selected"`.
        router_budget (float, Optional): target softmax fraction of the optional regulariser
            `router_budget_weight · (mean p_softmax − router_budget)²` on the *expected* fraction (mean router
            probability); with argmax routing the routed fraction can differ (even be 0). `None` = off (paper).
        router_budget_weight (float): weight of that regulariser. Default: `1.0`.
        router_budget_scope (str): `"layer"` (the budget on the layer's mean probability) or `"head"` (on each router
            head's own mean, `router_budget_weight · mean_h (mean p_softmax,h − router_budget)²`: no head can meet it
            by sending every block to softmax). Default: `"layer"`.
        use_rope (bool): RoPE on the softmax branch's q/k. Default: `False` (paper).
        rope_theta (float): RoPE base. Default: `10000.0`.
        conv_size (int): short convolution width. Default: `4`.
        norm_eps (float): epsilon of every RMSNorm. Default: `1e-5`.
        layer_idx (int, Optional): index of the layer in its model (for caches).
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 6, head_dim: int = 128, expand_v: float = 2,
                 num_softmax_heads: int = 12, num_router_heads: int = 6, block_size: int = 64,
                 linear_backend: LinearBackend = "gdn", softmax_backend: str = "auto", linear_impl: str = "auto",
                 decode_attention: str = "sdpa", decay_through_softmax: bool = True,
                 router_sample: Literal["argmax", "gumbel"] = "argmax",
                 router_temperature: float = 1.0, router_grad: Literal["selected", "both"] = "selected",
                 router_budget: float | None = None, router_budget_weight: float = 1.0,
                 router_budget_scope: Literal["layer", "head"] = "layer", use_rope: bool = False,
                 rope_theta: float = 10000.0, conv_size: int = 4, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__()
        check_choice("linear_backend", linear_backend, LINEAR_BACKENDS)
        check_choice("softmax_backend", softmax_backend, SOFTMAX_BACKEND_CHOICES)
        check_choice("linear_impl", linear_impl, ("auto", "fla", "torch"))
        check_choice("decode_attention", decode_attention, DECODE_ATTENTIONS)
        check_choice("router_grad", router_grad, ("selected", "both"))
        check_choice("router_budget_scope", router_budget_scope, ("layer", "head"))
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                          ("num_softmax_heads", num_softmax_heads), ("num_router_heads", num_router_heads),
                          ("block_size", block_size), ("conv_size", conv_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        value_dim = num_heads * head_dim * expand_v
        if not float(value_dim).is_integer() or not float(head_dim * expand_v).is_integer():
            raise ValueError(f"expand_v={expand_v} must make head_dim * expand_v an integer (head_dim={head_dim})")
        self.key_dim, self.value_dim = num_heads * head_dim, int(value_dim)
        if num_heads % num_router_heads or num_softmax_heads % num_router_heads:
            raise ValueError(f"num_heads={num_heads} and num_softmax_heads={num_softmax_heads} must both be "
                             f"multiples of num_router_heads={num_router_heads}")
        if self.key_dim % num_softmax_heads or self.value_dim % num_softmax_heads:
            raise ValueError(f"the softmax heads split the same channels: num_heads*head_dim={self.key_dim} and "
                             f"value dim={self.value_dim} must be divisible by num_softmax_heads={num_softmax_heads}")
        if router_budget is not None and not 0 <= router_budget <= 1:
            raise ValueError(f"router_budget must be None or in [0, 1], got {router_budget}")
        self.softmax_head_dim = self.key_dim // num_softmax_heads
        self.softmax_value_dim = self.value_dim // num_softmax_heads
        if use_rope and self.softmax_head_dim % 2:
            raise ValueError(f"use_rope needs an even softmax head dim, got {self.softmax_head_dim}")

        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.num_softmax_heads, self.num_router_heads, self.block_size = num_softmax_heads, num_router_heads, block_size
        self.linear_backend, self.softmax_backend, self.linear_impl = linear_backend, softmax_backend, linear_impl
        self.decode_attention = decode_attention
        self.decay_through_softmax, self.router_grad = decay_through_softmax, router_grad
        self.router_budget, self.router_budget_weight = router_budget, router_budget_weight
        self.router_budget_scope = router_budget_scope
        self.use_rope, self.rope_theta, self.norm_eps, self.layer_idx = use_rope, rope_theta, norm_eps, layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.q_conv1d = ShortConv(self.key_dim, conv_size)
        self.k_conv1d = ShortConv(self.key_dim, conv_size)
        self.v_conv1d = ShortConv(self.value_dim, conv_size)
        self.q_norm = RMSNorm(self.softmax_head_dim, norm_eps)
        self.k_norm = RMSNorm(self.softmax_head_dim, norm_eps)
        self.router = BlockRouter(hidden_size, num_router_heads, block_size, router_sample, router_temperature)
        self.w_proj = nn.Linear(self.key_dim, 2 * num_softmax_heads, bias=False)
        self.o_norm_linear = RMSNorm(self.softmax_value_dim, norm_eps)
        self.o_norm_softmax = RMSNorm(self.softmax_value_dim, norm_eps)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

        self.gates = LinearGates(hidden_size, num_heads, head_dim, linear_backend)

    def extra_repr(self) -> str:
        return (f"linear_backend={self.linear_backend}, H_L={self.num_heads}, d_k={self.head_dim}, "
                f"d_v={self.head_v_dim}, H_A={self.num_softmax_heads}, H_R={self.num_router_heads}, "
                f"block_size={self.block_size}, softmax_backend={self.softmax_backend}")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, **kwargs):
        """Args:
            hidden_states (torch.Tensor): `[B, T, D]`.
            attention_mask (torch.Tensor, Optional): `[B, T]` padding mask; only all-ones is supported (pack
                variable-length batches with `cu_seqlens` instead).
            past_key_values: inference cache (spec §1.8): a `NAtSLLayerState`, or a cache holding one per layer
                (`natsl.models.cache.NAtSLCache`); `None` with `use_cache=True` starts a new `NAtSLLayerState`.
                The call continues the cached sequence by `T` tokens and updates the cache.
            use_cache (bool): run as an inference step (see `past_key_values`). Default: `False`.
            cu_seqlens (torch.LongTensor, Optional, keyword): `[N_seq + 1]` packed offsets (`B == 1`; not with a cache).

        Returns:
            `(o [B, T, D], stats: NAtSLLayerStats, past_key_values)` (the new state if one was started). With a
            cache, `stats` covers the blocks the call touches and is `None` if none completes (the router does
            not run inside a block).
        """
        from natsl.ops import natsl_attention

        cu_seqlens = check_mixer_forward("NAtSLAttention", hidden_states, self.hidden_size, attention_mask, use_cache,
                                         past_key_values, kwargs)
        if use_cache or past_key_values is not None:
            state = layer_state(past_key_values, self.layer_idx, NAtSLLayerState, block_size=self.block_size,
                                num_router_heads=self.num_router_heads,
                                decay_through_softmax=self.decay_through_softmax)
            o, stats = self._forward_cached(hidden_states, state)
            return o, stats, (state if past_key_values is None else past_key_values)
        x = hidden_states
        B, T, _ = x.shape
        layout = block_layout(T, self.block_size, cu_seqlens, device=x.device)

        q, k, v = conv_qkv(x, (self.q_proj, self.k_proj, self.v_proj), (self.q_conv1d, self.k_conv1d, self.v_conv1d),
                           cu_seqlens)
        weights, probs = self.router(x, cu_seqlens, layout)

        pos = None
        if self.use_rope:
            pos = torch.arange(T, device=x.device)
            if cu_seqlens is not None:
                pos = pos - cu_seqlens.to(pos.device)[layout.token_seq]
        q_s, k_s, v_s, q_l, k_l, v_l = self._heads(x, q, k, v, pos)

        g, beta, dt = self.gates(x)
        v_in = self.gates.value_input(v_l, dt)
        o_s, o_l, _ = natsl_attention(
            q_s, k_s, v_s, q_l, k_l, v_in, weights.to(q_s.dtype), linear_backend=self.linear_backend, g=g, beta=beta,
            block_size=self.block_size, decay_through_softmax=self.decay_through_softmax,
            router_grad=self.router_grad, cu_seqlens=cu_seqlens, softmax_backend=self.softmax_backend,
            linear_impl=self.linear_impl)
        o = self._merge(x, q, o_s, self.gates.skip(o_l, v_l))

        is_soft = weights.detach()[..., 0]
        aux = None
        if self.router_budget is not None:
            # no blocks (T = 0): no term (an empty sum keeps the graph)
            if not probs.shape[1]:
                aux = probs.sum()
            else:  # probs [B, N, H_R, 2]: the mean over every block, or over each router head's blocks
                frac = probs[..., 0].mean() if self.router_budget_scope == "layer" else probs[..., 0].mean((0, 1))
                aux = self.router_budget_weight * ((frac - self.router_budget) ** 2).mean()
        p = probs.detach().float()
        entropy = _mean_over_blocks(-(p * p.clamp_min(1e-30).log()).sum(-1))
        stats = NAtSLLayerStats(softmax_fraction=_mean_over_blocks(is_soft.float()), router_aux_loss=aux,
                                router_entropy=entropy)
        return o, stats, past_key_values

    def _heads(self, x, q, k, v, pos):
        """Post-conv `q, k, v` → softmax heads `(q_s, k_s, v_s)` and linear heads `(q_l, k_l, v_l)`."""
        B, T, _ = x.shape
        H_L, H_A = self.num_heads, self.num_softmax_heads
        cdt = compute_dtype(x)  # one dtype for every head tensor (bf16 under autocast, else x's)
        q_l = l2_norm(q.view(B, T, H_L, self.head_dim), cdt)
        k_l = l2_norm(k.view(B, T, H_L, self.head_dim), cdt)
        v_l = v.view(B, T, H_L, self.head_v_dim).to(cdt)
        q_s = self.q_norm(q.view(B, T, H_A, self.softmax_head_dim)).to(cdt)
        k_s = self.k_norm(k.view(B, T, H_A, self.softmax_head_dim)).to(cdt)
        v_s = v.view(B, T, H_A, self.softmax_value_dim).to(cdt)
        if pos is not None:
            q_s, k_s = rotary_torch(q_s, pos, self.rope_theta), rotary_torch(k_s, pos, self.rope_theta)
        return q_s, k_s, v_s, q_l, k_l, v_l

    def _merge(self, x, q, o_s, o_l):
        """Spec §1.6: weighted two-norm merge of `o_s [B,T,H_A,d_va]` and `o_l [B,T,H_L,d_v]`, SiLU gate, `o_proj`
        (one fused kernel on CUDA: `natsl.kernels.merge.norm_merge`)."""
        B, T, _ = x.shape
        H_A, d = self.num_softmax_heads, self.softmax_value_dim
        cdt = compute_dtype(x)
        y = norm_merge(o_s.to(cdt), o_l.reshape(B, T, H_A, d).to(cdt), self.w_proj(q).view(B, T, H_A, 2),
                       self.g_proj(x).view(B, T, H_A, d), self.o_norm_softmax.weight, self.o_norm_linear.weight,
                       self.norm_eps)
        return self.o_proj(y.reshape(B, T, self.value_dim))

    def _linear_in_block(self, q, k, v, g, beta, state: torch.Tensor):
        """Virtual run over tokens of one block from `state`: `(o, end state)` (plain recurrence, spec §1.4)."""
        from natsl.layers.baselines import linear_op, step_op

        scale = self.head_dim ** -0.5
        if q.shape[1] == 1:
            return step_op(self.linear_backend, self.linear_impl, q.device)(q, k, v, g, beta, state, scale)
        op = linear_op(self.linear_backend, self.linear_impl, q.device)
        return op(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True, cu_seqlens=None)

    def _forward_cached(self, x: torch.Tensor, state: NAtSLLayerState):
        """Continue the cached sequence by `x [B, T, D]` (spec §1.8); exactly the full forward's rows."""
        from natsl.layers.linear.branch import linear_branch
        from natsl.layers.routing import Routing
        from natsl.layers.softmax import softmax_branch

        B, T, D = x.shape
        C = self.block_size
        t0, n0 = state.seen_tokens, state.block_pos
        if state.initialized and state.batch_size != B:
            raise ValueError(f"the cache holds batch size {state.batch_size}, got hidden_states with batch {B}")
        q, cq = self.q_conv1d.forward_with_state(self.q_proj(x), state.conv.get("q"))
        k, ck = self.k_conv1d.forward_with_state(self.k_proj(x), state.conv.get("k"))
        v, cv = self.v_conv1d.forward_with_state(self.v_proj(x), state.conv.get("v"))
        pos = None
        if self.use_rope:  # from the device counter (a captured decode step stays valid at every position)
            pos = torch.arange(T, device=x.device) + state.device_position(x.device)
        q_s, k_s, v_s, q_l, k_l, v_l = self._heads(x, q, k, v, pos)
        g, beta, dt = self.gates(x)
        v_in = self.gates.value_input(v_l, dt)

        # router over the blocks this chunk touches: local block 0 continues the current block; the router runs
        # only when a block completes (a decode step inside a block just adds to the running sum)
        nb, n_done = (n0 + T - 1) // C + 1, (n0 + T) // C
        # (the running sum is zero at a block start: no branch on n0, one captured step)
        acc = torch.promote_types(x.dtype, torch.float32)  # sums in at least float32, read in x's dtype
        if nb == 1:
            sums = x if T == 1 else x.sum(1, keepdim=True, dtype=acc)
            # a decode step: the running sum plus the token (promoted to `acc`) in one kernel
            sums = sums.to(acc) if not state.initialized else state.router_sum[:, None] + sums
        else:
            sums = block_sums(x, C, n0)
            if state.initialized:
                sums = torch.cat([sums[:, :1] + state.router_sum[:, None], sums[:, 1:]], 1)
        weights = is_soft = None
        if n_done:
            counts = (n0 + T - C * torch.arange(nb, device=x.device)).clamp(max=C).to(acc)  # no host copy
            weights, _ = self.router.decide(sums / counts[:, None])
            is_soft = weights.detach()[..., 0] > 0.5  # [B, nb, Hr]
        if not state.initialized:
            g_sum = None if g is None else upcast(g[:, :1]).sum(1)
            state.initialize(k_s, v_s, q_l.new_zeros(B, self.num_heads, self.head_dim, self.head_v_dim,
                                                     dtype=torch.promote_types(q_l.dtype, torch.float32)),
                             sums[:, 0], g_sum)

        def gsum(a, b):
            return None if g is None else upcast(g[:, a:b]).sum(1)

        scale_s = self.softmax_head_dim ** -0.5
        if n0 + T <= C:  # inside the current block (every decode step)
            o_l, run = self._linear_in_block(q_l, k_l, v_in, g, beta, state.linear_run)
            log_decay = None if g is None else state.log_decay + (g[:, 0] if T == 1 else gsum(0, T))
            rows = state.append(k_s, v_s, router_sum=sums[:, 0], linear_run=run, log_decay=log_decay)
            o_s = state.attend_current(q_s, scale_s, self.decode_attention, rows=rows)
            if n_done:
                state.commit(is_soft[:, 0])
        else:
            # the storage the completed blocks need, read back to the host before the branches are queued (only
            # where it may have to grow): the commits below size it without waiting for the branches
            hint = state.lengths_hint(is_soft[:, :n_done])
            if t0 == 0:  # empty cache: the fast softmax backends see exactly the full forward
                o_s = softmax_branch(q_s, k_s, v_s, Routing(weights.to(q_s.dtype), C), backend=self.softmax_backend,
                                     router_grad=self.router_grad)
            else:
                o_s = state.attend_chunk(q_s, k_s, v_s, is_soft, scale_s)
            h = C - n0 if n0 else 0
            nc = (T - h) // C
            parts = []
            if h:  # the rest of the current block, which completes
                o, run = self._linear_in_block(q_l[:, :h], k_l[:, :h], v_in[:, :h], None if g is None else g[:, :h],
                                               None if beta is None else beta[:, :h], state.linear_run)
                parts.append(o)
                log_decay = None if g is None else state.log_decay + gsum(0, h)
                state.append(k_s[:, :h], v_s[:, :h], router_sum=sums[:, 0], linear_run=run, log_decay=log_decay)
                state.commit(is_soft[:, 0], bound_hint=hint)
            if nc:  # whole blocks
                c0, e = (1 if h else 0), h + nc * C
                route = Routing(weights[:, c0:c0 + nc].to(q_l.dtype), C)
                o, S = linear_branch(q_l[:, h:e], k_l[:, h:e], v_in[:, h:e], route, backend=self.linear_backend,
                                     g=None if g is None else g[:, h:e], beta=None if beta is None else beta[:, h:e],
                                     impl=self.linear_impl, scale=self.head_dim ** -0.5,
                                     decay_through_softmax=self.decay_through_softmax, router_grad=self.router_grad,
                                     initial_state=state.linear_start, output_final_state=True)
                parts.append(o)
                state.append_blocks(k_s[:, h:e], v_s[:, h:e], is_soft[:, c0:c0 + nc], S.to(state.linear_start.dtype),
                                    bound_hint=hint)
            e = h + nc * C
            if e < T:  # the new current block
                o, run = self._linear_in_block(q_l[:, e:], k_l[:, e:], v_in[:, e:], None if g is None else g[:, e:],
                                               None if beta is None else beta[:, e:], state.linear_start)
                parts.append(o)
                # (a copy: a view would keep the chunk's block sums [B, nb, D] alive in the cache)
                state.append(k_s[:, e:], v_s[:, e:], router_sum=sums[:, -1].clone(), linear_run=run,
                             log_decay=gsum(e, T))
            o_l = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (a cat of one tensor is a copy)
        state.set_conv(q=cq, k=ck, v=cv)
        o = self._merge(x, q, o_s.to(x.dtype), self.gates.skip(o_l.to(x.dtype), v_l))
        stats = None
        if weights is not None:
            stats = NAtSLLayerStats(softmax_fraction=_mean_over_blocks(weights.detach()[..., 0].float()))
        return o, stats
