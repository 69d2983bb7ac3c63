"""The pure-PyTorch linear recurrences (`natsl.layers.linear.torch_ops`, spec §1.4 / §3.4) against a token-by-token
float64 recurrence written from §1.4, and against fla's Triton chunk ops (under the Triton interpreter on CPU); the
masked chunk pass (`torch_masked_chunk`, spec §1.7 / §3.2) against the block rule of §1.4 / §1.7 built from that
recurrence."""

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
from natsl.layers.linear.torch_ops import CHUNK_SIZE, GLA_CHUNK_SIZE, torch_masked_chunk

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


# ---------------------------------------------------------------------------------------------------------------
# The masked chunk pass (spec §1.4 block rule, §1.7 linear gate, §3.2): chunk = routing block.


def chunk_spans(B, T, C, cu_seqlens=None):
    """Per sequence `(batch row, [(start, end) of each chunk])`; chunks restart at every sequence start."""
    seqs = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    return [(b, [(c, min(c + C, e)) for c in range(s, e, C)]) for b, s, e in seqs]


def per_token(x_blk, B, T, spans):
    """Per-chunk values `[n_chunks, H]` (chunks in `spans` order) → per-token `[B, T, H]` (differentiable)."""
    rows, toks, blks = [], [], []
    for b, chunks in spans:
        for s, e in chunks:
            rows += [b] * (e - s)
            toks += range(s, e)
            blks += [len(set(blks))] * (e - s)
    return x_blk.new_zeros(B, T, x_blk.shape[-1]).index_put((torch.tensor(rows), torch.tensor(toks)), x_blk[blks])


def masked_recurrence(backend, q, k, v, g=None, beta=None, *, m, z=None, C, scale=None, initial_state=None,
                      cu_seqlens=None):
    """§1.4 / §1.7 per chunk from the token recurrence: `o` = the virtual run `R^{≤t}(S)` with real inputs from the
    chunk's start state `S`; carried state `D(S) + m · (R(S) − Δ(S))`, `Δ` the decay only (the run with `k = 0`),
    `D = Δ`, or the identity where the chunk's decay mask is 0. `m`, `z`: per chunk and head `[n_chunks, H]`."""
    B, T, H, K = q.shape
    spans = chunk_spans(B, T, C, cu_seqlens)
    outs, finals, j = [[] for _ in range(B)], [], 0
    for i, (b, chunks) in enumerate(spans):
        S = q.new_zeros(1, H, K, v.shape[-1]) if initial_state is None else initial_state[i:i + 1]
        for s, e in chunks:
            x = [None if t is None else t[b:b + 1, s:e] for t in (q, k, v, g, beta)]
            o, R = recurrence(backend, *x, scale=scale, initial_state=S)
            _, decayed = recurrence(backend, x[0], torch.zeros_like(x[1]), *x[2:], scale=scale, initial_state=S)
            zj = 1.0 if z is None else z[j][:, None, None]
            S = zj * decayed + (1 - zj) * S + m[j][:, None, None] * (R - decayed)
            outs[b].append(o)
            j += 1
        finals.append(S)
    return torch.cat([torch.cat(o, 1) for o in outs]), torch.cat(finals)


def masked_token_recurrence(backend, q, k, v, g=None, beta=None, *, m, z=None, C, scale=None, initial_state=None,
                            cu_seqlens=None):
    """The same with masks per token `[B, T, H]`: token t adds `m_t ·` its write `R_t − decay_t(R_{t−1})` to a
    separately decayed carried write, and the chunk's start state decays only where `z_t = 1`. Equals
    :func:`masked_recurrence` for masks constant within each chunk."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    outs, finals = [[] for _ in range(B)], []
    for i, (b, chunks) in enumerate(chunk_spans(B, T, C, cu_seqlens)):
        S = q.new_zeros(H, K, v.shape[-1]) if initial_state is None else initial_state[i]
        for s, e in chunks:
            R, W = S, torch.zeros_like(S)
            for t in range(s, e):
                x = (v[b, t], None if g is None else g[b, t], None if beta is None else beta[b, t])
                k0 = torch.zeros_like(k[b, t])  # a token with k = 0 only decays: decay_t(X) = _step(X, k0)
                R_new = _step(backend, R, k[b, t], *x)
                outs[b].append(scale * torch.einsum("hk,hkv->hv", q[b, t], R_new))
                W = _step(backend, W, k0, *x) + m[b, t][:, None, None] * (R_new - _step(backend, R, k0, *x))
                zt = 1.0 if z is None else z[b, t][:, None, None]
                S, R = zt * _step(backend, S, k0, *x) + (1 - zt) * S, R_new
            S = S + W
        finals.append(S)
    return torch.stack([torch.stack(o) for o in outs]), torch.stack(finals)


def block_masks(kind, n, H, seed):
    """`[n, H]` 0/1 masks per chunk and head: random, all zero or all one; None for "none"."""
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand(n, H, generator=gen(seed), dtype=torch.float64) < 0.5).double()
    return torch.full((n, H), float(kind == "ones"), dtype=torch.float64)


# name -> (lens: one int = dense B=2 with T tokens, a list = packed sequence lengths; C; write mask; decay mask;
#          initial state; scale)
MASKED_CASES = {
    "dense-C4": (13, 4, "random", "random", True, None),
    "dense-C8": (20, 8, "random", "none", False, 0.7),
    "dense-T1": (1, 4, "random", "random", True, None),
    "dense-multiple-m0": (16, 8, "zeros", "random", True, None),
    "dense-m1-z0": (11, 4, "ones", "zeros", True, None),
    "dense-m1": (9, 8, "ones", "none", True, None),
    "packed-C4": ([5, 0, 9, 1], 4, "random", "random", True, None),
    "packed-C8": ([3, 17], 8, "random", "none", False, None),
    "packed-m0-z0": ([6, 7], 4, "zeros", "zeros", True, None),
    "packed-m1": ([8, 4, 5], 4, "ones", "random", True, 0.7),
}


def masked_case(backend, case, seed):
    """Leaf inputs (incl. the per-chunk write mask `m`), the per-chunk decay mask, and the call arguments."""
    lens, C, m_kind, z_kind, init, scale = MASKED_CASES[case]
    if isinstance(lens, int):
        B, T, cu = 2, lens, None
    else:
        B, T, cu = 1, sum(lens), torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    H, K, V = 2, 4, 3
    x = make_inputs(backend, seed, B, T, H, K, V, n_states=None if cu is None else len(lens), init=init)
    spans = chunk_spans(B, T, C, cu)
    n = sum(len(c) for _, c in spans)
    x["m"] = block_masks(m_kind, n, H, seed + 2).requires_grad_()
    z = block_masks(z_kind, n, H, seed + 3)
    return x, z, dict(B=B, T=T, C=C, scale=scale, cu_seqlens=cu, spans=spans)


def masked_op(backend, z, *, B, T, C, scale, cu_seqlens, spans):
    def call(q, k, v, g=None, beta=None, initial_state=None, m=None):
        return torch_masked_chunk(backend, q, k, v, g, beta, write_mask=per_token(m, B, T, spans),
                                  decay_mask=None if z is None else per_token(z, B, T, spans), chunk_size=C,
                                  scale=scale, initial_state=initial_state, output_final_state=True,
                                  cu_seqlens=cu_seqlens)
    return call


def masked_reference(backend, z, *, B, T, C, scale, cu_seqlens, spans):
    def call(q, k, v, g=None, beta=None, initial_state=None, m=None):
        return masked_recurrence(backend, q, k, v, g, beta, m=m, z=z, C=C, scale=scale, initial_state=initial_state,
                                 cu_seqlens=cu_seqlens)
    return call


@pytest.mark.parametrize("case", list(MASKED_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_chunk_matches_block_rule(backend, case):
    """fp64 o, final state and the gradients of every input (incl. the write mask, continuous in the reference)
    equal §1.4's block rule with §1.7's linear gate, for dense / packed (partial and empty sequences) inputs."""
    seed = 100 + list(MASKED_CASES).index(case)
    x, z, kw = masked_case(backend, case, seed)
    ref = outputs_and_grads(masked_reference(backend, z, **kw), x, seed)
    out = outputs_and_grads(masked_op(backend, z, **kw), x, seed)
    assert out[0].dtype == out[1].dtype == torch.float64
    assert_all_close(f"masked {backend} {case}", ref, out, 1e-9, 1e-12)


@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_chunk_per_token_masks(backend, layout):
    """Write masks varying within a chunk (continuous) and per-token decay masks: the op's per-token write-mask
    gradient and its decay `exp(Σ z_t g_t)` equal the per-token form of the gate."""
    B, T, cu = (2, 10, None) if layout == "dense" else (1, 12, torch.tensor([0, 7, 7, 12]))
    H, K, V, C = 2, 4, 3, 4
    x = make_inputs(backend, 7, B, T, H, K, V, n_states=None if cu is None else 3)
    x["m"] = torch.rand(B, T, H, generator=gen(8), dtype=torch.float64).requires_grad_()
    z = (torch.rand(B, T, H, generator=gen(9)) < 0.5).double()

    def op(q, k, v, g=None, beta=None, initial_state=None, m=None):
        return torch_masked_chunk(backend, q, k, v, g, beta, write_mask=m, decay_mask=z, chunk_size=C,
                                  initial_state=initial_state, output_final_state=True, cu_seqlens=cu)

    def ref(q, k, v, g=None, beta=None, initial_state=None, m=None):
        return masked_token_recurrence(backend, q, k, v, g, beta, m=m, z=z, C=C, initial_state=initial_state,
                                       cu_seqlens=cu)
    assert_all_close(f"masked {backend} per token", outputs_and_grads(ref, x, 7), outputs_and_grads(op, x, 7),
                     1e-9, 1e-12)


@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_chunk_ones_is_plain_op(backend, layout):
    """m = 1 (and z = 1 or None) is the plain op: exactly at its default chunk size, to rounding at chunk sizes
    4 and 5 (the chunked maths is the same code; only the chunking changes)."""
    B, T, cu = (2, 37, None) if layout == "dense" else (1, 40, torch.tensor([0, 17, 17, 40]))
    x = make_inputs(backend, 13, B, T, 2, 4, 3, n_states=None if cu is None else 3)
    default = GLA_CHUNK_SIZE if backend == "gla" else CHUNK_SIZE
    plain = outputs_and_grads(torch_op(backend), x, 13, cu_seqlens=cu)
    ones = torch.ones(B, T, 2, dtype=torch.float64)
    for chunk, z in [(default, None), (default, ones), (4, None), (5, ones)]:
        def op(q, k, v, g=None, beta=None, initial_state=None, chunk=chunk, z=z):
            return torch_masked_chunk(backend, q, k, v, g, beta, write_mask=ones, decay_mask=z, chunk_size=chunk,
                                      initial_state=initial_state, output_final_state=True, cu_seqlens=cu)
        out = outputs_and_grads(op, x, 13)
        if chunk == default and z is None:
            assert torch.equal(plain[0], out[0]) and torch.equal(plain[1], out[1])
        assert_all_close(f"masked ones {backend} C={chunk}", plain, out, 1e-12, 1e-13)


def test_masked_chunk_dtype_and_decay_mask_gradient():
    """fp32 in: o fp32, final state fp32; a decay mask that requires grad gets none (it is a hard switch)."""
    x = {n: t.detach().float() for n, t in make_inputs("gdn", 3, 1, 9, 2, 4, 3).items()}
    z = torch.ones(1, 9, 2, requires_grad=True)
    m = torch.ones(1, 9, 2, requires_grad=True)
    o, S = torch_masked_chunk("gdn", x["q"], x["k"], x["v"], x["g"], x["beta"], write_mask=m, decay_mask=z,
                              chunk_size=4, initial_state=x["initial_state"], output_final_state=True)
    assert o.dtype == S.dtype == torch.float32
    (o.sum() + S.sum()).backward()
    assert z.grad is None and m.grad is not None
    o, S = torch_masked_chunk("gdn", x["q"], x["k"], x["v"], x["g"], x["beta"], write_mask=m, chunk_size=4)
    assert S is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_chunk_validation(backend):
    x = {n: t.detach() for n, t in make_inputs(backend, 0, 2, 5, 2, 4, 3).items()}
    q, k, v, g, beta = x["q"], x["k"], x["v"], x.get("g"), x.get("beta")
    m = torch.ones(2, 5, 2, dtype=torch.float64)

    def call(**kw):
        args = dict(backend=backend, q=q, k=k, v=v, g=g, beta=beta, write_mask=m, chunk_size=4) | kw
        return torch_masked_chunk(args.pop("backend"), args.pop("q"), args.pop("k"), args.pop("v"), **args)
    with pytest.raises(ValueError, match=r"backend must be one of \['deltanet', 'gdn', 'gla', 'linear_attn', 'mamba2'\]"):
        call(backend="gated_deltanet")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            call(chunk_size=bad)
    for bad in (4.0, True, None):
        with pytest.raises(TypeError, match="chunk_size must be a positive int"):
            call(chunk_size=bad)
    with pytest.raises(TypeError, match="write_mask must be a torch.Tensor"):
        call(write_mask=None)
    with pytest.raises(ValueError, match=r"write_mask must have shape \[B, T, H\] = \(2, 5, 2\)"):
        call(write_mask=m[:, :4])
    with pytest.raises(ValueError, match="decay_mask must have shape"):
        call(decay_mask=m[..., None])
    with pytest.raises(ValueError, match="k must"):
        call(k=k[..., :2])
    with pytest.raises(ValueError, match="g must be None" if g is None else "g "):
        call(g=q[..., 0] if g is None else None)
    with pytest.raises(ValueError, match="beta must be None" if beta is None else "beta"):
        call(beta=q[..., 0] if beta is None else None)
