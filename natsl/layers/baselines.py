"""The two non-hybrid mixers natsl models mix with NAtS-L layers (spec §4).

`LinearAttention`: a plain linear-attention layer of any backend, structured like fla's `GatedDeltaNet` layer
(q/k/v projections, short convolutions + SiLU, L2-normalised q/k, the backend's gates, per-head gated RMSNorm,
output projection), computed with the same linear ops natsl's linear branch uses (fla on CUDA, PyTorch on CPU).
`SoftmaxAttention`: causal multi-head softmax attention with RoPE (SDPA), packed-sequence aware.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from natsl.kernels.index import block_layout
from natsl.layers.conv import ShortConv, conv_qkv
from natsl.layers.fused import GatedRMSNorm, l2_norm, rotary, rotary_torch, use_fused
from natsl.layers.gates import LinearGates
from natsl.layers.state import LinearLayerState, SoftmaxLayerState, layer_state, linear_step
from natsl.utils import DECODE_ATTENTIONS, LINEAR_BACKENDS, check_choice, check_mixer_forward, compute_dtype


def _uses_fla(impl: str, device: torch.device) -> bool:
    """Whether the plain recurrence runs on fla: `impl="fla"`, or `"auto"` on CUDA."""
    check_choice("linear_impl", impl, ("auto", "fla", "torch"))
    return impl == "fla" or (impl == "auto" and device.type == "cuda")


def linear_op(backend: str, impl: str, device: torch.device):
    """The plain (unrouted) recurrence of `backend`: fla's op (`impl="fla"`, or `"auto"` on CUDA) or natsl's
    PyTorch op. All share `fn(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens)`."""
    if _uses_fla(impl, device):
        from natsl.layers.linear.fla_ops import FLA_LINEAR_OPS

        return FLA_LINEAR_OPS[backend]
    from natsl.layers.linear import TORCH_LINEAR_OPS

    return TORCH_LINEAR_OPS[backend]


def step_op(backend: str, impl: str, device: torch.device):
    """The one-token decode step of `backend` (`fn(q, k, v, g, beta, state, scale) -> (o, state)`, read-out after
    the update): fla's fused recurrent kernel (`impl="fla"`, or `"auto"` on CUDA) or natsl's PyTorch step."""
    if _uses_fla(impl, device):
        from natsl.layers.linear.fla_ops import fla_step

        return functools.partial(fla_step, backend)
    return functools.partial(linear_step, backend)


class LinearAttention(nn.Module):
    """A plain linear-attention layer (no routing) of backend `linear_backend`.

    Args:
        hidden_size (int): model width `D`. Default: `1024`.
        num_heads (int): heads `H`. Default: `6`.
        head_dim (int): key dim `K`. Default: `128`.
        expand_v (float): `V / K`. Default: `2`.
        linear_backend (str): `gdn`, `deltanet`, `gla`, `mamba2`, `linear_attn`. Default: `"gdn"`.
        linear_impl (str): `"auto"`, `"fla"` or `"torch"`. Default: `"auto"`.
        conv_size (int): short convolution width. Default: `4`.
        norm_eps (float): RMSNorm epsilon. Default: `1e-5`.
        layer_idx (int, Optional): index in the model.
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 6, head_dim: int = 128, expand_v: float = 2,
                 linear_backend: str = "gdn", linear_impl: str = "auto", conv_size: int = 4, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__()
        check_choice("linear_backend", linear_backend, LINEAR_BACKENDS)
        check_choice("linear_impl", linear_impl, ("auto", "fla", "torch"))
        if not float(head_dim * expand_v).is_integer():
            raise ValueError(f"expand_v={expand_v} must make head_dim * expand_v an integer (head_dim={head_dim})")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.linear_backend, self.linear_impl, self.layer_idx = linear_backend, linear_impl, layer_idx
        key_dim, value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.q_conv1d = ShortConv(key_dim, conv_size)
        self.k_conv1d = ShortConv(key_dim, conv_size)
        self.v_conv1d = ShortConv(value_dim, conv_size)
        self.gates = LinearGates(hidden_size, num_heads, head_dim, linear_backend)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, **kwargs):
        """`hidden_states [B, T, D]` (packed: `cu_seqlens=` keyword) → `(o [B, T, D], None, past_key_values)`.

        With `use_cache=True` or a `past_key_values` (a `LinearLayerState` or a cache holding one per layer) the
        call continues the cached sequence and updates the state (a new `LinearLayerState` is returned if none
        was given)."""
        x = hidden_states
        cu_seqlens = check_mixer_forward("LinearAttention", x, self.hidden_size, attention_mask, use_cache,
                                         past_key_values, kwargs)
        state = None
        if use_cache or past_key_values is not None:
            state = layer_state(past_key_values, self.layer_idx, LinearLayerState)
            if state.state is not None and state.batch_size != x.shape[0]:
                raise ValueError(f"the cache holds batch size {state.batch_size}, got hidden_states with batch "
                                 f"{x.shape[0]}")
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.head_v_dim
        if state is None:
            q, k, v = conv_qkv(x, (self.q_proj, self.k_proj, self.v_proj),
                               (self.q_conv1d, self.k_conv1d, self.v_conv1d), cu_seqlens)
        else:
            (q, cq), (k, ck), (v, cv) = (c.forward_with_state(p(x), state.conv.get(n)) for n, c, p in (
                ("q", self.q_conv1d, self.q_proj), ("k", self.k_conv1d, self.k_proj), ("v", self.v_conv1d, self.v_proj)))
        cdt = compute_dtype(x)  # bf16 under autocast even though the residual stream x is fp32
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        if state is None and self._fused_gdn(q):
            o = self._fused_gdn_forward(x, q, k, v, cu_seqlens)
        else:
            q, k, v = l2_norm(q, cdt), l2_norm(k, cdt), v.to(cdt)
            g, beta, dt = self.gates(x)
            v_in = self.gates.value_input(v, dt)
            if state is None:
                op = linear_op(self.linear_backend, self.linear_impl, x.device)
                o, _ = op(q, k, v_in, g, beta, scale=K ** -0.5, cu_seqlens=cu_seqlens)
            else:
                if T == 1 and state.state is not None:
                    o, S = step_op(self.linear_backend, self.linear_impl, x.device)(q, k, v_in, g, beta, state.state,
                                                                                    K ** -0.5)
                else:
                    op = linear_op(self.linear_backend, self.linear_impl, x.device)
                    o, S = op(q, k, v_in, g, beta, scale=K ** -0.5, initial_state=state.state,
                              output_final_state=True)
                state.append(T, S, q=cq, k=ck, v=cv)
            o = self.gates.skip(o, v)
        y = self.o_norm(o.to(cdt), self.g_proj(x).view(B, T, H, V))
        out = self.o_proj(y.reshape(B, T, H * V))
        return out, None, (state if state is not None and past_key_values is None else past_key_values)

    def _fused_gdn(self, q: torch.Tensor) -> bool:
        return self.linear_backend == "gdn" and self.linear_impl != "torch" and use_fused(q)

    def _fused_gdn_forward(self, x, q, k, v, cu_seqlens):
        """fla's `chunk_gated_delta_rule` with q/k L2 norm, β sigmoid and the GDN gate inside the kernel (the
        call of fla's `GatedDeltaNet` layer): same maths as the unfused path, fewer saved tensors and launches."""
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        gates = self.gates
        o, _ = chunk_gated_delta_rule(q, k, v, g=gates.a_proj(x), beta=gates.b_proj(x), scale=self.head_dim ** -0.5,
                                      use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                      use_gate_in_kernel=True, A_log=gates.A_log, dt_bias=gates.dt_bias,
                                      cu_seqlens=cu_seqlens)
        return o


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE (`F.scaled_dot_product_attention`).

    Args:
        hidden_size (int): model width `D`. Default: `1024`.
        num_heads (int): heads; head dim `D / num_heads`. Default: `16`.
        rope_theta (float): RoPE base. Default: `10000.0`.
        decode_attention (str): the read of cached steps: `"sdpa"` or `"triton"` (`natsl.layers.state.attend_rows`).
            Default: `"sdpa"`.
        layer_idx (int, Optional): index in the model.
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 16, rope_theta: float = 10000.0,
                 decode_attention: str = "sdpa", layer_idx: int | None = None):
        super().__init__()
        check_choice("decode_attention", decode_attention, DECODE_ATTENTIONS)
        self.decode_attention = decode_attention
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of even dim")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.rope_theta, self.layer_idx = rope_theta, layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, **kwargs):
        """`hidden_states [B, T, D]` (packed: `cu_seqlens=` keyword) → `(o [B, T, D], None, past_key_values)`.

        With `use_cache=True` or a `past_key_values` (a `SoftmaxLayerState` or a cache holding one per layer) the
        call continues the cached sequence and appends its K/V (a new `SoftmaxLayerState` is returned if none was
        given)."""
        x = hidden_states
        cu_seqlens = check_mixer_forward("SoftmaxAttention", x, self.hidden_size, attention_mask, use_cache,
                                         past_key_values, kwargs)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if use_cache or past_key_values is not None:
            state = layer_state(past_key_values, self.layer_idx, SoftmaxLayerState)
            if state.k_rows is not None and state.batch_size != B:
                raise ValueError(f"the cache holds batch size {state.batch_size}, got hidden_states with batch {B}")
            t0 = state.seen_tokens
            pos = state.device_position(x.device) + torch.arange(T, device=x.device)  # device counter (graphs)
            q, k = rotary_torch(q, pos, self.rope_theta), rotary_torch(k, pos, self.rope_theta)
            state.append(k, v)
            if t0 == 0:
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True).transpose(1, 2)
            else:
                o = state.attend_last(q, self.head_dim ** -0.5, self.decode_attention)
            out = self.o_proj(o.reshape(B, T, self.hidden_size))
            return out, None, (state if past_key_values is None else past_key_values)
        if cu_seqlens is None:
            mask, causal = None, True
        else:
            lay = block_layout(T, T, cu_seqlens, device=x.device)
            same = lay.token_seq[:, None] == lay.token_seq[None, :]
            mask, causal = same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), False
        q, k = rotary(q, self.rope_theta, cu_seqlens), rotary(k, self.rope_theta, cu_seqlens)
        with _sdpa_priority(x):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=causal)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.hidden_size)), None, past_key_values


def _sdpa_priority(x: torch.Tensor):
    """On CUDA, SDPA tries cuDNN's attention first (the fastest dense causal kernel torch ships on Hopper; spec
    §6), then flash, memory-efficient and math; elsewhere SDPA's own order."""
    if not x.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)
