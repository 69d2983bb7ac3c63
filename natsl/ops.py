"""The NAtS-L op (spec §1, §3): the softmax branch and the linear branch of one layer call over a routing."""

from __future__ import annotations

import torch

from natsl.kernels.index import num_blocks
from natsl.layers.linear.branch import linear_branch
from natsl.layers.routing import Routing
from natsl.layers.softmax import softmax_branch
from natsl.utils import check_natsl_inputs


def natsl_attention(q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, q_l: torch.Tensor, k_l: torch.Tensor,
                    v_l: torch.Tensor, routing: torch.Tensor, *, linear_backend: str, g: torch.Tensor | None = None,
                    beta: torch.Tensor | None = None, block_size: int = 64, diagonal: str = "both",
                    decay_through_softmax: bool = True, router_grad: str = "selected",
                    scale_softmax: float | None = None, scale_linear: float | None = None,
                    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                    cu_seqlens: torch.Tensor | None = None, softmax_backend: str = "auto", linear_impl: str = "auto",
                    validate: bool = False):
    """NAtS-L attention: the fast paths of `natsl.reference.natsl_attention_reference` (same arguments and results).

    Args (beyond the reference's):
        softmax_backend (str): `"auto"`, `"sdpa"`, `"flex"`, `"flash"` or `"triton"` (see `natsl.layers.softmax`).
            Default: `"auto"` (the fastest backend that supports the call).
        linear_impl (str): `"auto"`, `"fla"` (fla's Triton ops) or `"torch"` (pure PyTorch).
            Default: `"auto"` (`"fla"` on CUDA, `"torch"` elsewhere).
        validate (bool): also check that `routing` is one-hot and has the right block count (host syncs).
            Default: `False`.

    Returns:
        `o_s [B, T, H_A, d_va]`, `o_l [B, T, H_L, d_v]` in the input dtype, and `final_state
        [B or N_seq, H_L, d_k, d_v]` (float32) or `None`.
    """
    check_natsl_inputs(q_s, k_s, v_s, q_l, k_l, v_l, routing, linear_backend=linear_backend, g=g, beta=beta,
                       initial_state=initial_state, cu_seqlens=cu_seqlens, router_grad=router_grad)
    route = Routing(routing, block_size, diagonal, cu_seqlens)
    T = q_s.shape[1]
    if validate:
        route.validate(T)
    elif cu_seqlens is None and num_blocks(T, block_size) != route.N:
        raise ValueError(f"routing has {route.N} blocks, but T={T} with block_size={block_size} needs "
                         f"{num_blocks(T, block_size)}")
    o_s = softmax_branch(q_s, k_s, v_s, route, backend=softmax_backend, scale=scale_softmax, router_grad=router_grad)
    o_l, final_state = linear_branch(q_l, k_l, v_l, route, backend=linear_backend, g=g, beta=beta, impl=linear_impl,
                                     scale=scale_linear, decay_through_softmax=decay_through_softmax,
                                     router_grad=router_grad, initial_state=initial_state,
                                     output_final_state=output_final_state)
    return o_s, o_l, final_state
