"""The NAtS-L linear branch (spec §1.4, §1.7, §3.2) as one masked chunk pass.

With chunk = routing block, the branch is the backend's chunked recurrence in which only the state write sees the
keys `k·m` (`m` per token: 1 in linear blocks, 0 in softmax blocks); outputs, the WY solve and `v_new` use the real
inputs. `m` is the relaxed linear gate of spec §1.7, so the router gradient is the commit/decay interpolation
`S' = D(S) + m·W`. On CUDA (and under the Triton interpreter) the pass runs over fla's chunk functions
(`natsl.layers.linear.masked`); on the CPU its PyTorch twin (`torch_ops.torch_masked_chunk`). The maths:
`natsl/layers/README.md`, section "Linear branch".
"""

from __future__ import annotations

import torch

from natsl.layers.linear.torch_ops import check_linear_inputs
from natsl.layers.routing import LINEAR, Routing
from natsl.utils import LINEAR_BACKENDS, ROUTER_GRADS, check_choice, to_dtype

LINEAR_IMPLS = ("auto", "fla", "torch")


def resolve_linear_impl(impl: str, device: torch.device, block_size: int, backend: str = "gdn") -> str:
    """`"fla"` or `"torch"` for `impl` (`"auto"`: fla on CUDA when the block size is 64, the size run on the H200;
    else PyTorch). Raises `ValueError` for `impl="fla"` with a block size fla's chunk functions do not take for
    `backend` (`fla_block_sizes`), and `ImportError` with the install command when fla is asked for but missing."""
    from natsl.layers.linear.masked import FLA_CHUNK, fla_block_sizes

    check_choice("linear_impl", impl, LINEAR_IMPLS)
    if impl == "auto":
        impl = "fla" if torch.device(device).type == "cuda" and block_size == FLA_CHUNK else "torch"
    if impl == "fla":
        sizes = fla_block_sizes(backend)
        if block_size not in sizes:
            raise ValueError(f"linear_impl='fla' with linear backend {backend!r} takes block_size in {sizes} (one "
                             f"routing block is one fla chunk of that size), got block_size={block_size}; use "
                             f"linear_impl='torch' for other block sizes")
        from natsl.layers.linear.fla_ops import require_fla

        require_fla()
    return impl


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, backend: str,
                  g: torch.Tensor | None = None, beta: torch.Tensor | None = None, impl: str = "auto",
                  scale: float | None = None, decay_through_softmax: bool = True, router_grad: str = "selected",
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    r"""Linear-branch output `o_L` of a routed layer call (spec §1.4) with the router gradient of spec §1.7.

    Equal (up to float rounding) to `natsl.reference.linear_branch_reference`; held to it by
    `tests/layers/test_linear_branch.py` (CPU: both impls) and `tests/gpu/test_linear_branch_gpu.py` (bf16).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]` linear queries / keys (`H` a multiple of the router heads `Hr`; head `h`
            follows router head `h // (H / Hr)`).
        v (torch.Tensor): `[B, T, H, V]`.
        routing (Routing): block types `[B, N, Hr, 2]` (index 0 = softmax), block size and `cu_seqlens` for packed
            input (`B = 1`; blocks restart per sequence, a sequence's last block may be partial).
        backend (str): `"gdn"`, `"deltanet"`, `"gla"`, `"mamba2"` or `"linear_attn"`.
        g (torch.Tensor, Optional): log decay `[B, T, H]` (gdn, mamba2) or `[B, T, H, K]` (gla).
        beta (torch.Tensor, Optional): activated write strength `[B, T, H]` (gdn, deltanet).
        impl (str): `"auto"` (fla on CUDA if `block_size == 64`, else PyTorch), `"fla"` (fla's chunk functions;
            block sizes 16, 32, 64, and 128 except for the delta rule: `masked.fla_block_sizes`) or `"torch"` (any
            block size). Default: `"auto"`.
        scale (float, Optional): read-out scale. Default: `K ** -0.5`.
        decay_through_softmax (bool): whether softmax blocks decay the carried state. Default: `True`.
        router_grad (str): `"selected"` or `"both"` (spec §1.7). Default: `"selected"`.
        initial_state (torch.Tensor, Optional): `[B or N_seq, H, K, V]`.
        output_final_state (bool): return the state after the last block. Default: `False`.

    Returns:
        `o [B, T, H, V]` in the dtype of `q`, and `final_state [B or N_seq, H, K, V]` (float32; float64 for
        float64 inputs) or `None`.
    """
    check_choice("linear_backend", backend, LINEAR_BACKENDS)
    check_choice("router_grad", router_grad, ROUTER_GRADS)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a natsl Routing, got {type(routing).__name__}")
    check_linear_inputs(backend, q, k, v, g, beta, initial_state, routing.cu_seqlens)
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    B, T, H, K = q.shape
    Hr = routing.num_router_heads
    if routing.B != B or H % Hr:
        raise ValueError(f"routing {tuple(routing.weights.shape)} does not fit B={B} and H={H} linear heads "
                         f"(a multiple of the router heads)")
    impl = resolve_linear_impl(impl, q.device, routing.block_size, backend)
    scale = K ** -0.5 if scale is None else float(scale)
    cdt = torch.promote_types(q.dtype, torch.float32)
    z = None  # decay_through_softmax=False: the carried state decays in linear blocks only (hard types, no gradient)
    if not decay_through_softmax:
        z = _is_linear(routing).to(cdt).repeat_interleave(H // Hr, dim=-1)
    if impl == "fla":
        from natsl.layers.linear.masked import masked_chunk

        # m_L of spec §1.7 is the routing's linear weight: with "selected" the backward kernel keeps the gradient
        # of the blocks routed linear (m = 1) itself, so no mask op and no copy enter the graph; with one linear
        # head per router head the weights go in whole and the kernel writes their gradient (no select node)
        m = to_dtype(routing.weights, cdt)
        if Hr != H:
            m = m[..., LINEAR].repeat_interleave(H // Hr, dim=-1)
        cu = routing.cu_seqlens
        o, final = masked_chunk(backend, q, k, v, g, beta, block_mask=m, block_decay=z, scale=scale,
                                initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu,
                                token_block=None if cu is None else routing.layout(T).token_block,
                                chunk_size=routing.block_size, select_grad=router_grad == "selected")
    else:
        from natsl.layers.linear.torch_ops import torch_masked_chunk

        m = _block_gates(routing, router_grad, cdt).repeat_interleave(H // Hr, dim=-1)  # [B, N, H] linear gate m_L
        o, final = torch_masked_chunk(backend, q, k, v, g, beta, write_mask=_per_token(routing, m, T),
                                      decay_mask=None if z is None else _per_token(routing, z, T),
                                      chunk_size=routing.block_size, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=routing.cu_seqlens)
    if final is not None:
        final = to_dtype(final, cdt)
    return to_dtype(o, q.dtype), final


def _per_token(routing: Routing, x: torch.Tensor, T: int) -> torch.Tensor:
    """`[B, N, H]` per (block, head) → `[B, T, H]` per (token, head) (`masked.blocks_to_tokens` over the routing)."""
    from natsl.layers.linear.masked import blocks_to_tokens

    return blocks_to_tokens(x, T, routing.block_size, None if routing.cu_seqlens is None else routing.layout(T).token_block)


def _block_gates(routing: Routing, router_grad: str, dtype: torch.dtype) -> torch.Tensor:
    """`m_L` of spec §1.7, `[B, N, Hr]` in `dtype`: the routing's linear weight, which carries its straight-through
    gradient; with `router_grad="selected"` only in blocks routed linear (`routing.gates` without its float64
    copies)."""
    lin = routing.weights[..., LINEAR].to(dtype)
    if router_grad == "selected":
        lin = torch.where(_is_linear(routing), lin, 0.0)
    return lin


def _is_linear(routing: Routing) -> torch.Tensor:
    """`[B, N, Hr]` bool: the block is routed linear (the argmax of the one-hot weights, without an argmax)."""
    return routing.weights.detach()[..., LINEAR] > 0.5
