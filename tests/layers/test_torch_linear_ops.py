"""The pure-PyTorch linear recurrences (`natsl.layers.linear.torch_ops`, spec §1.4 / §3.4) against a token-by-token
float64 recurrence written from §1.4, and against fla's Triton chunk ops (under the Triton interpreter on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from fla.ops.gla import chunk_gla
from fla.ops.linear_attn import chunk_linear_attn
from fla.ops.simple_gla import chunk_simple_gla
from helpers import assert_close, gen
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from natsl.layers.linear import TORCH_LINEAR_OPS

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]
G_SHAPE = {"gdn": "head", "mamba2": "head", "gla": "key"}
USES_BETA = ("gdn", "deltanet")


def _step(backend, S, k, v, g, beta):
    """One token of §1.4 for all heads: `S [H, K, V]`, `k [H, K]`, `v [H, V]`, `g [H]` or `[H, K]`, `beta [H]`."""
    if backend in ("gdn", "mamba2"):
        S = g.exp()[:, None, None] * S
    elif backend == "gla":
        S = g.exp()[:, :, None] * S
    if backend in USES_BETA:
        v = beta[:, None] * (v - torch.einsum("hk,hkv->hv", k, S))
    return S + k[:, :, None] * v[:, None, :]


def recurrence(backend, q, k, v, g=None, beta=None, *, scale=None, initial_state=None, cu_seqlens=None):
    """Token-by-token reference. Inputs `[B, T, H, *]`; returns `o [B, T, H, V]`, `final_state [N, H, K, V]`."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        spans = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    outs, finals = [], []
    for i, (b, s, e) in enumerate(spans):
        S = q.new_zeros(H, K, v.shape[-1]) if initial_state is None else initial_state[i]
        o = []
        for t in range(s, e):
            S = _step(backend, S, k[b, t], v[b, t], None if g is None else g[b, t], None if beta is None else beta[b, t])
            o.append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        outs.append(torch.stack(o) if o else q.new_zeros(0, H, v.shape[-1]))
        finals.append(S)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o, torch.stack(finals)


def make_inputs(backend, seed, B, T, H, K, V, *, n_states=None, init=True, dtype=torch.float64):
    """Leaf tensors for `backend` (unit-norm keys, activated beta, log-sigmoid decays), keyed by argument name."""
    gn = gen(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gn, dtype=dtype)

    x = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V)}
    if backend in G_SHAPE:
        x["g"] = F.logsigmoid(r(B, T, H, K) if G_SHAPE[backend] == "key" else r(B, T, H))
    if backend in USES_BETA:
        x["beta"] = torch.rand(B, T, H, generator=gn, dtype=dtype)
    if init:
        x["initial_state"] = r(B if n_states is None else n_states, H, K, V) * 0.5
    return {name: t.requires_grad_() for name, t in x.items()}


def outputs_and_grads(fn, x, seed, **kwargs):
    """`o, final_state` of `fn(**x)` and the gradients of a random linear functional of both w.r.t. every input."""
    o, S = fn(**x, **kwargs)
    gn = gen(seed + 1)
    do, dS = (torch.randn(t.shape, generator=gn, dtype=torch.float64).to(t) for t in (o, S))
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(x.values()))
    return o, S, dict(zip(x, grads))


def assert_all_close(name, ref, out, ratio, atol):
    """Relative RMSE ≤ ratio, or max abs error ≤ atol (some gradients are exactly zero, e.g. dg when S = 0)."""
    (o_r, S_r, g_r), (o, S, g) = ref, out
    assert_close(f"{name} o", o_r, o, ratio, atol)
    assert_close(f"{name} final_state", S_r, S, ratio, atol)
    for arg in g_r:
        assert_close(f"{name} d{arg}", g_r[arg], g[arg], ratio, atol)


def torch_op(backend):
    op = TORCH_LINEAR_OPS[backend]

    def call(q, k, v, g=None, beta=None, initial_state=None, **kw):
        return op(q, k, v, g, beta, initial_state=initial_state, output_final_state=True, **kw)
    return call


def reference(backend):
    def call(q, k, v, g=None, beta=None, initial_state=None, **kw):
        return recurrence(backend, q, k, v, g, beta, initial_state=initial_state, **kw)
    return call


def test_registry():
    assert set(TORCH_LINEAR_OPS) == set(BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), T=st.sampled_from([1, 15, 16, 17, 63, 64, 65, 100, 130]),
       H=st.integers(1, 2), K=st.sampled_from([4, 8, 16]), V=st.sampled_from([3, 8]), init=st.booleans(),
       scale=st.sampled_from([None, 0.7]))
@example(seed=0, B=2, T=1, H=2, K=8, V=3, init=True, scale=None)
@example(seed=1, B=1, T=17, H=1, K=4, V=8, init=False, scale=None)
@example(seed=2, B=2, T=64, H=2, K=16, V=8, init=True, scale=0.7)
@example(seed=3, B=1, T=100, H=2, K=8, V=3, init=True, scale=None)
def test_matches_recurrence(backend, seed, B, T, H, K, V, init, scale):
    """fp64 outputs, final state and gradients of every input (incl. initial_state) equal the recurrence."""
    x = make_inputs(backend, seed, B, T, H, K, V, init=init)
    ref = outputs_and_grads(reference(backend), x, seed, scale=scale)
    out = outputs_and_grads(torch_op(backend), x, seed, scale=scale)
    assert out[0].dtype == out[1].dtype == torch.float64
    assert_all_close(backend, ref, out, 1e-9, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None)
@given(seed=st.integers(0, 2**16), lens=st.lists(st.integers(0, 80), min_size=1, max_size=4), init=st.booleans(),
       cu_dtype=st.sampled_from([torch.int32, torch.int64]))
@example(seed=0, lens=[17, 64, 1, 0, 40], init=True, cu_dtype=torch.int32)
def test_packed_matches_per_sequence(backend, seed, lens, init, cu_dtype):
    """Packed input with `cu_seqlens` (int32 or int64, empty sequences allowed) equals one call per sequence."""
    assume(sum(lens) > 0)
    H, K, V = 2, 8, 4
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=cu_dtype)
    x = make_inputs(backend, seed, 1, sum(lens), H, K, V, n_states=len(lens), init=init)
    op = TORCH_LINEAR_OPS[backend]

    def per_sequence(q, k, v, g=None, beta=None, initial_state=None):
        outs = []
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            h0 = None if initial_state is None else initial_state[i:i + 1]
            outs.append(op(q[:, s:e], k[:, s:e], v[:, s:e], None if g is None else g[:, s:e],
                           None if beta is None else beta[:, s:e], initial_state=h0, output_final_state=True))
        return torch.cat([o for o, _ in outs], 1), torch.cat([S for _, S in outs])

    packed = outputs_and_grads(torch_op(backend), x, seed, cu_seqlens=cu)
    assert_all_close(f"{backend} packed vs per-sequence", outputs_and_grads(per_sequence, x, seed), packed, 1e-12, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_recurrence(backend):
    """The packed path against the recurrence directly (restarts at every offset, per-sequence initial states)."""
    cu = torch.tensor([0, 17, 17, 81, 100])
    x = make_inputs(backend, 3, 1, 100, 2, 8, 4, n_states=4)
    ref = outputs_and_grads(reference(backend), x, 3, cu_seqlens=cu)
    assert_all_close(backend, ref, outputs_and_grads(torch_op(backend), x, 3, cu_seqlens=cu), 1e-9, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype):
    """o keeps the input dtype, the final state is fp32 (fp64 for fp64 input); low precision only rounds."""
    x = make_inputs(backend, 5, 2, 70, 2, 16, 8)
    ref_o, ref_S = torch_op(backend)(**x)
    o, S = torch_op(backend)(**{n: t.detach().to(dtype) for n, t in x.items()})
    assert o.dtype == dtype
    assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ratio = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert_close(f"{backend} o", ref_o, o, ratio)
    assert_close(f"{backend} final_state", ref_S, S, ratio)


@pytest.mark.parametrize("backend", ["gdn", "gla", "mamba2"])
def test_strong_decay_stays_finite(backend):
    """Decays far below fp32 range inside one chunk (e^{-40·63}) give finite fp32 values and gradients."""
    x = make_inputs(backend, 7, 1, 130, 2, 8, 4)
    with torch.no_grad():
        x["g"].mul_(0).sub_(40.0)
    ref = outputs_and_grads(reference(backend), x, 7)
    out = outputs_and_grads(torch_op(backend), {n: t.detach().float().requires_grad_() for n, t in x.items()}, 7)
    assert_all_close(backend, ref, out, 1e-5, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation(backend):
    x = {n: t.detach() for n, t in make_inputs(backend, 0, 2, 5, 2, 4, 3).items()}
    op = TORCH_LINEAR_OPS[backend]
    q, k, v, g, beta, h0 = x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), x["initial_state"]
    with pytest.raises(ValueError, match="k must"):
        op(q, k[..., :2], v, g, beta)
    with pytest.raises(ValueError, match="v must"):
        op(q, k, v[:, :3], g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        op(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(q[:1], k[:1], v[:1], None if g is None else g[:1], None if beta is None else beta[:1],
           cu_seqlens=torch.tensor([0, 3, 2, 5]))
    if backend in G_SHAPE:
        with pytest.raises(ValueError, match="g "):
            op(q, k, v, None, beta)
        with pytest.raises(ValueError, match="g "):
            op(q, k, v, g[..., :1, None] if G_SHAPE[backend] == "head" else g[..., 0], beta)
    else:
        with pytest.raises(ValueError, match="g must be None"):
            op(q, k, v, q[..., 0], beta)
    if backend in USES_BETA:
        with pytest.raises(ValueError, match="beta"):
            op(q, k, v, g, None)
    else:
        with pytest.raises(ValueError, match="beta must be None"):
            op(q, k, v, g, q[..., 0])


def fla_op(backend):
    """fla's chunk op for `backend`, in natsl's convention (no in-kernel norms/activations, no output normalisation)."""
    def call(q, k, v, g=None, beta=None, initial_state=None, scale=None, cu_seqlens=None):
        kw = dict(scale=scale, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens)
        if backend == "gdn":
            return chunk_gated_delta_rule(q, k, v, g, beta, **kw)
        if backend == "deltanet":
            # `chunk_delta_rule` refuses fp32; the gated rule with g = 0 is the delta rule.
            return chunk_gated_delta_rule(q, k, v, torch.zeros_like(beta), beta, **kw)
        if backend == "gla":
            return chunk_gla(q, k, v, g, **kw)
        if backend == "mamba2":
            return chunk_simple_gla(q, k, v, g=g, **kw)
        return chunk_linear_attn(q, k, v, normalize=False, **kw)
    return call


@pytest.mark.parametrize("layout", ["dense", "varlen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fla(backend, layout, device):
    """fp32 fla (interpreted on CPU) agrees with the fp64 torch op: o, final state, and all gradients.

    V != K catches a transposed state layout; dense uses the default scale, varlen an explicit one and int32
    offsets (flash-attn's convention; fla documents LongTensor and accepts both).
    """
    if layout == "dense":
        B, T, n_states, cu, scale = 2, 100, None, None, None
    else:
        B, T, n_states, cu, scale = 1, 128, 3, torch.tensor([0, 37, 100, 128], dtype=torch.int32, device=device), 0.5
    x = make_inputs(backend, 11, B, T, 2, 32, 16, n_states=n_states, dtype=torch.float32)
    x = {n: t.detach().to(device).requires_grad_() for n, t in x.items()}
    out = outputs_and_grads(fla_op(backend), x, 11, scale=scale, cu_seqlens=cu)
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    ref = outputs_and_grads(torch_op(backend), x64, 11, scale=scale, cu_seqlens=cu)
    assert_all_close(f"fla {backend} {layout}", ref, out, 1e-4, 1e-6)
