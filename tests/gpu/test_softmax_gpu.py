"""Softmax-branch backends on the GPU in bf16 against the float64 reference (spec §1.3, §1.7, §3.3).

Rule (flash-attn's): `err(out, ref_fp64) <= 2 * err(plain torch bf16, ref_fp64) + atol`, max abs error, for the
output and the gradients of q, k, v and the routing. Backends: sdpa, flex, flash over torch's varlen flash
kernels and over flash-attn-4, natsl's Triton kernels (`triton-tma`: with every kernel reading its tiles through
tensor descriptors; `triton-head-major`: with every kernel's programs in (batch, head)-major order; each backend
skipped with its reasons where it cannot run).

Run on the H200 with `NATSL_TEST_DEVICE=cuda pytest -q -m gpu tests/gpu/test_softmax_gpu.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import natsl.kernels.block_attention as ba
import natsl.kernels.gather_scatter as gs
from natsl.kernels.index import num_blocks
from natsl.layers.routing import Routing
from natsl.layers.softmax import SOFTMAX_BACKENDS, flash_decode
from natsl.layers.softmax.flash import FlashSoftmax, TorchVarlen
from natsl.reference import softmax_branch_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gs.interpreted(), reason="set NATSL_TEST_DEVICE=cuda: the Triton interpreter is on"),
]

DEV = "cuda"
# (B, T, Hr, G, d, dv, C, cu_seqlens, diagonal, p_softmax)
CASES = {
    "paper-heads": (1, 1024, 6, 2, 64, 128, 64, None, "both", 0.25),
    "batch2-partial": (2, 1000, 2, 2, 64, 64, 64, None, "both", 0.5),
    "packed": (1, 1024, 2, 3, 64, 128, 64, [0, 300, 301, 777, 1024], "both", 0.5),
    "diag-linear": (1, 640, 3, 1, 64, 128, 64, None, "linear", 0.5),
}
BACKENDS = {
    "sdpa": SOFTMAX_BACKENDS["sdpa"],
    "flex": SOFTMAX_BACKENDS["flex"],
    "flash-varlen": FlashSoftmax("varlen"),
    "flash-fa4": FlashSoftmax("fa4"),
    "triton": SOFTMAX_BACKENDS["triton"],
    # natsl's kernels with every kernel's tiles read through tensor descriptors (TMA; the default: from a length on)
    "triton-tma": SOFTMAX_BACKENDS["triton"],
    # natsl's kernels with every kernel's programs in (batch, head)-major order (`block_attention.HEAD_MAJOR`)
    "triton-head-major": SOFTMAX_BACKENDS["triton"],
}


def make(case, seed=0):
    B, T, Hr, G, d, dv, C, cu, diagonal, p = case
    g = torch.Generator(device=DEV).manual_seed(seed)
    H = Hr * G
    q, k = (torch.randn(B, T, H, d, generator=g, device=DEV) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, device=DEV)
    cu = None if cu is None else torch.tensor(cu, device=DEV)
    N = num_blocks(T, C, cu)
    soft = torch.rand(B, N, Hr, generator=g, device=DEV) < p
    w = torch.stack([soft, ~soft], -1).float()
    return q, k, v, w, cu


def grads(out, leaves, do):
    return torch.autograd.grad((out.float() * do).sum(), leaves)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# flash-attn-4 compiles per shape (tens of seconds each): fewer cases for it
PAIRS = [(b, c) for b in BACKENDS for c in CASES if b != "flash-fa4" or c == "paper-heads"]


@pytest.mark.parametrize(("backend", "case"), PAIRS, ids=[f"{b}-{c}" for b, c in PAIRS])
def test_backend_bf16_vs_reference(monkeypatch, backend, case):
    B, T, Hr, G, d, dv, C, _, diagonal, _ = CASES[case]
    if backend == "triton-tma":
        monkeypatch.setattr(ba, "DESCRIPTORS", dict.fromkeys(("fwd", "dq", "dkdv"), 0))
    if backend == "triton-head-major":
        monkeypatch.setattr(ba, "HEAD_MAJOR", dict.fromkeys(("fwd", "dq", "dkdv"), True))
    q32, k32, v32, w32, cu = make(CASES[case])
    scale = d ** -0.5
    impl = BACKENDS[backend]

    def leaves(dtype):
        return [x.detach().to(dtype).requires_grad_() for x in (q32, k32, v32)] + [w32.clone().requires_grad_()]

    q, k, v, w = leaves(torch.bfloat16)
    route = Routing(w, C, diagonal, cu)
    reasons = impl.not_supported_reasons(q, k, v, route, "selected")
    if reasons:
        pytest.skip("; ".join(reasons))
    out = impl.forward(q, k, v, route, scale=scale, router_grad="selected")

    qr, kr, vr, wr = leaves(torch.float64)
    wr = wr.double().detach().requires_grad_()
    route_r = Routing(wr, C, diagonal, cu)
    ref = softmax_branch_reference(qr, kr, vr, route_r, route_r.gates("selected")[0], scale)
    qb, kb, vb, wb = leaves(torch.bfloat16)
    route_b = Routing(wb, C, diagonal, cu)
    base = softmax_branch_reference(qb, kb, vb, route_b, route_b.gates("selected")[0].to(torch.bfloat16), scale)

    do = torch.randn(ref.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    g_out = grads(out, (q, k, v, w), do)
    g_ref = grads(ref, (qr, kr, vr, wr), do)
    g_base = grads(base, (qb, kb, vb, wb), do)
    names = ("o", "dq", "dk", "dv", "d_routing")
    for name, a, r, b in zip(names, (out, *g_out), (ref, *g_ref), (base, *g_base)):
        e_out, e_base = max_err(a, r), max_err(b, r)
        atol = 1e-3 * max(r.abs().max().item(), 1e-3)
        assert e_out <= 2 * e_base + atol, f"{backend}/{case} {name}: err {e_out:.3e} > 2*{e_base:.3e} + {atol:.1e}"


@pytest.mark.parametrize("kernel", ["varlen", "fa4"])
def test_flash_decode_gpu(kernel):
    kern, reasons = FlashSoftmax(kernel).select_kernel(torch.device(DEV), torch.bfloat16)
    if kern is None:
        pytest.skip("; ".join(reasons))
    g = torch.Generator(device=DEV).manual_seed(2)
    B, Hr, G, d, dv = 2, 3, 2, 64, 128
    lens = torch.tensor([130, 0, 64, 1, 700, 257], device=DEV)
    cu = F.pad(lens.cumsum(0), (1, 0))
    q = torch.randn(B, Hr * G, d, generator=g, device=DEV)
    k = torch.randn(int(cu[-1]), G, d, generator=g, device=DEV)
    v = torch.randn(int(cu[-1]), G, dv, generator=g, device=DEV)
    out, lse = flash_decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, int(lens.max()), kernel=kern,
                            return_lse=True)
    ref, ref_lse = flash_decode(q.double(), k.double(), v.double(), cu, int(lens.max()), kernel=TorchVarlen(False),
                                return_lse=True)
    base = torch.zeros_like(ref)
    for i in range(B * Hr):  # plain torch in bf16, pair by pair
        b, r = divmod(i, Hr)
        if lens[i] == 0:
            continue
        qs = q[b, r * G:(r + 1) * G].bfloat16()[:, None]  # [G, 1, d]
        ks, vs = (x[cu[i]:cu[i + 1]].bfloat16().transpose(0, 1) for x in (k, v))  # [G, n, *]
        p = torch.softmax((qs @ ks.transpose(1, 2)) * d ** -0.5, -1)
        base[b, r * G:(r + 1) * G] = (p @ vs)[:, 0].double()
    assert max_err(out, ref) <= 2 * max_err(base, ref) + 1e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) < 2e-2


@pytest.mark.parametrize("backend", ["auto", "triton", "flex"])
def test_layer_training_under_autocast(monkeypatch, backend):
    """A training step of the layer on CUDA (fp32 weights, bf16 autocast) with `softmax_backend=backend` runs that
    backend (`"auto"`: the first of AUTO_ORDER["cuda-train"]) and matches the same layer with `sdpa` under the 2x
    rule against the float64 layer: output and the router's gradient (T=200: a partial last block)."""
    from natsl import NAtSLAttention
    from natsl.layers.softmax import AUTO_ORDER

    calls = []
    cls = type(SOFTMAX_BACKENDS[AUTO_ORDER["cuda-train"][0] if backend == "auto" else backend])
    first_forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **kw: calls.append(1) or first_forward(self, *a, **kw))

    def layer_of(sb, dtype=torch.float32):
        torch.manual_seed(0)
        layer = NAtSLAttention(hidden_size=256, num_heads=2, head_dim=64, expand_v=2, num_softmax_heads=4,
                               num_router_heads=2, block_size=64, linear_backend="gdn", linear_impl="torch",
                               softmax_backend=sb).to(DEV)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.add_(torch.randn_like(p) * (1.0 if "router" in name else 0.02))
        return layer.to(dtype)

    x = torch.randn(2, 200, 256, generator=torch.Generator(device=DEV).manual_seed(3), device=DEV)
    results = {}
    for sb, dtype in ((backend, torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)):
        calls.clear()
        layer = layer_of(sb, dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            out = layer(x.to(dtype))[0]
        out.float().pow(2).mean().backward()
        results[(sb, dtype)] = (out.double(), layer.router.proj.weight.grad.double())
        assert (len(calls) > 0) == (sb == backend), f"{sb}: {cls.__name__} called {len(calls)} times"
    ref = results[("sdpa", torch.float64)]
    for i, name in enumerate(("out", "router grad")):
        e_auto = max_err(results[(backend, torch.float32)][i], ref[i])
        e_sdpa = max_err(results[("sdpa", torch.float32)][i], ref[i])
        atol = 1e-3 * ref[i].abs().max().item()
        assert torch.isfinite(results[(backend, torch.float32)][i]).all()
        assert e_auto <= 2 * e_sdpa + atol, f"{name}: auto {e_auto:.3e} vs sdpa {e_sdpa:.3e}"


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_float32_vs_sdpa(backend):
    """`flex` (FlexAttention's own per-dtype tiles, `FlexSoftmax.options_for`) and `triton` (IEEE float32 dots) in
    float32 against float64 `sdpa`: output and the q, k, v and routing gradients within 2x of `sdpa` in float32
    (+1e-5 of the largest value)."""
    q, k, v, w, _ = make((1, 1000, 2, 2, 64, 128, 64, None, "both", 0.3), seed=5)
    do = torch.randn_like(v)
    res = {}
    for bk, dt in ((backend, torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float64)):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        r = w.detach().to(dt).requires_grad_()
        o = SOFTMAX_BACKENDS[bk].forward(*xs, Routing(r, 64), scale=64 ** -0.5)
        o.backward(do.to(dt))
        res[(bk, dt)] = [o, *(x.grad for x in xs), r.grad]
    ref = res[("sdpa", torch.float64)]
    for i, name in enumerate(("o", "dq", "dk", "dv", "drouting")):
        e_flex, e_sdpa = (max_err(res[(b, torch.float32)][i], ref[i]) for b in (backend, "sdpa"))
        assert e_flex <= 2 * e_sdpa + 1e-5 * ref[i].abs().max().item(), f"{name}: {e_flex:.2e} vs {e_sdpa:.2e}"
