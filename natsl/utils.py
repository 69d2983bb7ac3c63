"""Input validation shared by the NAtS-L op, its reference and the layer."""

from __future__ import annotations

import torch

LINEAR_BACKENDS = ("gdn", "deltanet", "gla", "mamba2", "linear_attn")
SOFTMAX_BACKEND_CHOICES = ("auto", "sdpa", "flex", "flash", "triton")  # natsl.layers.softmax
DECODE_ATTENTIONS = ("sdpa", "triton")  # the attention read of cached steps: natsl.layers.state.attend_rows
ROUTER_GRADS = ("selected", "both")

# which extra inputs each linear backend takes: g ("head": [B,T,H], "key": [B,T,H,K]), beta
_NEEDS = {
    "gdn": ("head", True),
    "deltanet": (None, True),
    "gla": ("key", False),
    "mamba2": ("head", False),
    "linear_attn": (None, False),
}


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in at least float32 (half and bfloat16 go to float32; float32/float64 stay)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a mixer's attention op runs in: the autocast dtype when autocast is on for `x`'s device (fp32
    weights under bf16 autocast give bf16 projections but an fp32 residual stream), else `x.dtype`."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, skipping the call where it is a no-op (the linear branch below ~32k tokens is bound by host
    time, and a no-op `.to` costs a dispatch)."""
    return x if x.dtype == dtype else x.to(dtype)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, T: int, B: int) -> None:
    """Validate packed-sequence offsets (one host sync). Raises `ValueError`/`TypeError` naming `cu_seqlens`."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got {type(cu_seqlens).__name__} "
                        f"{getattr(cu_seqlens, 'dtype', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"packed input (cu_seqlens) needs batch size 1, got B={B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu[0]}..{cu[-1]}")
    if any(b <= a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {cu}")


def check_natsl_inputs(q_s, k_s, v_s, q_l, k_l, v_l, routing, *, linear_backend, g, beta, initial_state,
                       cu_seqlens, router_grad) -> tuple[int, int, int]:
    """Validate the tensors of a NAtS-L op call; returns `(H_A, H_L, H_R)`. Raises naming the bad argument."""
    check_choice("linear_backend", linear_backend, LINEAR_BACKENDS)
    check_choice("router_grad", router_grad, ROUTER_GRADS)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q_s.shape[1] if q_s.dim() == 4 else -1, q_s.shape[0])
    named = {"q_s": q_s, "k_s": k_s, "v_s": v_s, "q_l": q_l, "k_l": k_l, "v_l": v_l}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got {tuple(x.shape)}")
    devices = {x.device for x in named.values()} | {routing.device}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    B, T, H_A, d_ka = q_s.shape
    if k_s.shape != q_s.shape:
        raise ValueError(f"k_s must have the shape of q_s {tuple(q_s.shape)}, got {tuple(k_s.shape)}")
    if v_s.shape[:3] != (B, T, H_A):
        raise ValueError(f"v_s must have shape [B, T, H_A, d_va] = [{B}, {T}, {H_A}, *], got {tuple(v_s.shape)}")
    H_L, d_k = q_l.shape[2], q_l.shape[3]
    if q_l.shape[:2] != (B, T) or k_l.shape != q_l.shape:
        raise ValueError(f"q_l and k_l must both have shape [B, T, H_L, d_k] with B={B}, T={T}, got "
                         f"{tuple(q_l.shape)} and {tuple(k_l.shape)}")
    if v_l.shape[:3] != (B, T, H_L):
        raise ValueError(f"v_l must have shape [B, T, H_L, d_v] = [{B}, {T}, {H_L}, *], got {tuple(v_l.shape)}")
    if routing.dim() != 4 or routing.shape[0] != B or routing.shape[-1] != 2:
        raise ValueError(f"routing must have shape [B, N, H_R, 2] with B={B}, got {tuple(routing.shape)}")
    H_R = routing.shape[2]
    if H_A % H_R or H_L % H_R:
        raise ValueError(f"softmax heads H_A={H_A} and linear heads H_L={H_L} must be multiples of the router "
                         f"heads H_R={H_R}")
    g_kind, needs_beta = _NEEDS[linear_backend]
    if g_kind is None and g is not None:
        raise ValueError(f"linear_backend={linear_backend!r} takes no g (log decay); pass g=None")
    if g_kind is not None:
        want = (B, T, H_L) if g_kind == "head" else (B, T, H_L, d_k)
        if g is None:
            raise ValueError(f"linear_backend={linear_backend!r} needs g (log decay) of shape {list(want)}")
        if tuple(g.shape) != want:
            raise ValueError(f"g must have shape {list(want)} for linear_backend={linear_backend!r}, "
                             f"got {tuple(g.shape)}")
    if needs_beta:
        if beta is None:
            raise ValueError(f"linear_backend={linear_backend!r} needs beta of shape [{B}, {T}, {H_L}]")
        if tuple(beta.shape) != (B, T, H_L):
            raise ValueError(f"beta must have shape [{B}, {T}, {H_L}], got {tuple(beta.shape)}")
    elif beta is not None:
        raise ValueError(f"linear_backend={linear_backend!r} takes no beta; pass beta=None")
    if initial_state is not None:
        n_state = B if cu_seqlens is None else cu_seqlens.numel() - 1
        want = (n_state, H_L, d_k, v_l.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape {list(want)} ([B or N_seq, H_L, d_k, d_v]), "
                             f"got {tuple(initial_state.shape)}")
    return H_A, H_L, H_R


def check_mixer_forward(name: str, x: torch.Tensor, hidden_size: int, attention_mask, use_cache, past_key_values,
                        kwargs: dict):
    """Validate a mixer layer's HF-style call; returns the `cu_seqlens` keyword (the only one accepted)."""
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    if kwargs:
        raise TypeError(f"{name}.forward got unexpected keyword arguments {sorted(kwargs)}; only cu_seqlens is "
                        "accepted")
    if (use_cache or past_key_values is not None) and cu_seqlens is not None:
        raise ValueError(f"{name}: packed sequences (cu_seqlens) cannot be used with an inference cache; generate "
                         "each sequence separately (or as an unpadded batch of equal lengths)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"hidden_states must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [B, T, {hidden_size}], got {tuple(x.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(f"{name} does not support padded batches (attention_mask with zeros); pack the sequences "
                         "and pass cu_seqlens instead")
    return cu_seqlens
