"""The softmax branch of NAtS-L (spec §1.3, §1.5, §1.7, §3.3): four backends with one signature.

Every backend has `name`, `not_supported_reasons(q, k, v, routing, router_grad) -> list[str]` and
`forward(q, k, v, routing, *, scale, router_grad) -> o`, and equals `natsl.reference.softmax_branch_reference`
(outputs and gradients of q, k, v and the routing). `softmax_branch` validates, resolves and calls one.
"""

from __future__ import annotations

import logging

import torch

from natsl.layers.routing import Routing
from natsl.layers.softmax.blocksparse import TritonSoftmax
from natsl.layers.softmax.flash import FlashSoftmax, flash_decode
from natsl.layers.softmax.flex import FlexSoftmax
from natsl.layers.softmax.sdpa import SdpaSoftmax
from natsl.utils import ROUTER_GRADS, check_choice

logger = logging.getLogger(__name__)

SOFTMAX_BACKENDS = {"flash": FlashSoftmax(), "flex": FlexSoftmax(), "sdpa": SdpaSoftmax(), "triton": TritonSoftmax()}
# "auto" takes the first backend that supports the call, per device type (fastest first, measured on the H200:
# benchmarks/RESULTS.md, "natsl's Triton kernels"). natsl's `triton` kernels are the fastest forward and
# forward+backward at 4k-64k (1.05-3x flex, 3-5x flash) and compile once per dtype and head dims, not per T; flex
# (once per T) and flash take the calls triton cannot (block sizes outside 16-128, head dims above 256)
AUTO_ORDER = {"cuda-train": ("triton", "flex", "flash", "sdpa"), "cuda": ("triton", "flash", "flex", "sdpa"),
              "cpu": ("sdpa",)}
_INSTALL_HINT = {
    "flash": "use torch >= 2.10 (torch.nn.attention.varlen) on a CUDA GPU with fp16/bf16 inputs, or for inference "
             "install flash-attn-4 (`pip install flash-attn-4`, or `pip install natsl[flash4]`)",
    "flex": "FlexAttention needs torch >= 2.5; its backward needs a CUDA device",
    "sdpa": "",
    "triton": "run on a CUDA GPU with float16/bfloat16/float32 inputs and block_size in (16, 32, 64, 128)",
}
_logged: set = set()


def auto_kind(device_type: str, train: bool) -> str:
    """The `AUTO_ORDER` key of a call: `"cuda-train"` on CUDA with autograd recording, else the device type."""
    return "cuda-train" if device_type == "cuda" and train else device_type


def resolve(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
            router_grad: str = "selected"):
    """The backend object for `name` (`"auto"`, `"flash"`, `"flex"`, `"sdpa"`, `"triton"`) that runs this call.

    `"auto"` takes the first supporting backend of `AUTO_ORDER[auto_kind(...)]` and logs its choice once per
    (device, choice, reasons). An explicitly named backend that cannot run raises `ValueError` with every reason.
    """
    if name != "auto":
        check_choice("softmax backend", name, ("auto", *SOFTMAX_BACKENDS))
        backend = SOFTMAX_BACKENDS[name]
        reasons = backend.not_supported_reasons(q, k, v, routing, router_grad)
        if reasons:
            hint = f" (to enable it: {_INSTALL_HINT[name]})" if _INSTALL_HINT[name] else ""
            raise ValueError(f"softmax backend {name!r} cannot run this call: " + "; ".join(reasons) + hint)
        return backend
    skipped = []
    train = torch.is_grad_enabled() and (routing.weights.requires_grad or any(x.requires_grad for x in (q, k, v)))
    for cand in AUTO_ORDER.get(auto_kind(q.device.type, train), ("sdpa",)):
        backend = SOFTMAX_BACKENDS[cand]
        reasons = backend.not_supported_reasons(q, k, v, routing, router_grad)
        if not reasons:
            key = (q.device.type, cand, tuple(skipped))
            if key not in _logged and not torch.compiler.is_compiling():  # logging breaks a torch.compile graph
                _logged.add(key)
                why = "; ".join(skipped)
                logger.info("softmax backend 'auto' -> %r on %s%s", cand, q.device.type,
                            f" (skipped: {why})" if why else "")
            return backend
        skipped.append(f"{cand}: " + ", ".join(reasons))
    raise ValueError("no softmax backend supports this call: " + "; ".join(skipped))


def _check_inputs(q, k, v, routing: Routing) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"{name} must be a floating-point tensor [B, T, H_A, d], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    B, T, H, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H_A, d_v] = [{B}, {T}, {H}, *], got {tuple(v.shape)}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a natsl.Routing, got {type(routing).__name__}")
    if routing.B != B:
        raise ValueError(f"routing has batch {routing.B}, inputs have {B}")
    if H % routing.num_router_heads:
        raise ValueError(f"softmax heads H_A={H} must be a multiple of the router heads {routing.num_router_heads}")
    if routing.cu_seqlens is None and -(-T // routing.block_size) != routing.N:
        raise ValueError(f"routing has {routing.N} blocks, but T={T} with block_size={routing.block_size} needs "
                         f"{-(-T // routing.block_size)}")


def softmax_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, backend: str = "auto",
                   scale: float | None = None, router_grad: str = "selected") -> torch.Tensor:
    """The softmax branch `o_A` of spec §1.3 / §1.5 with the router gradient of §1.7.

    Args:
        q, k (torch.Tensor): `[B, T, H_A, d]` softmax queries / keys (head `a` belongs to router head
            `a // (H_A / Hr)`).
        v (torch.Tensor): `[B, T, H_A, d_v]`.
        routing (Routing): block types (and `cu_seqlens` for packed input, `B == 1`).
        backend (str): `"auto"`, `"flash"`, `"flex"`, `"sdpa"` or `"triton"`. Default: `"auto"`.
        scale (float, Optional): score scale. Default: `d ** -0.5`.
        router_grad (str): `"selected"` or `"both"` (spec §1.7; only `sdpa` supports `"both"` when the routing
            requires grad). Default: `"selected"`.

    Returns:
        `o [B, T, H_A, d_v]` in the dtype of `q`.
    """
    check_choice("router_grad", router_grad, ROUTER_GRADS)
    _check_inputs(q, k, v, routing)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve(backend, q, k, v, routing, router_grad)
    return impl.forward(q, k, v, routing, scale=scale, router_grad=router_grad).to(q.dtype)


__all__ = ["SOFTMAX_BACKENDS", "AUTO_ORDER", "auto_kind", "FlashSoftmax", "FlexSoftmax", "SdpaSoftmax", "flash_decode",
           "resolve", "softmax_branch", "TritonSoftmax"]
