"""Softmax-branch backends (spec §1.3, §1.5, §1.7, §3.3) against the dense reference, on CPU.

- `sdpa`: outputs and gradients of q, k, v and the routing (`router_grad` "selected" and "both").
- `flash`: the whole algorithm (dyadic decomposition, LSE merge, custom backward, gate gradient) with the
  pure-torch varlen kernel standing in for flash-attn (both head-dim conventions), same checks ("selected").
- `flex`: forward through FlexAttention (CPU, no autograd); outputs and gradients, gate gradient included, through
  the same compacted layout and mask as dense attention (FlexAttention has no CPU backward); its BlockMask tiles.
- `triton`: natsl's block-sparse kernels under the Triton interpreter (float32), outputs and every gradient.
- `flash_decode`, the torch varlen kernel itself, `resolve` / `softmax_branch` errors.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, gen
from hypothesis import example, given
from hypothesis import strategies as st

from natsl.kernels.index import num_blocks
from natsl.layers.routing import Routing
from natsl.layers.softmax import AUTO_ORDER, SOFTMAX_BACKENDS, auto_kind, flash_decode, resolve, softmax_branch
from natsl.layers.softmax.flash import FlashSoftmax, TorchVarlen, build_plan
from natsl.layers.softmax.flex import (
    KERNEL_OPTIONS,
    FlexSoftmax,
    _layout,
    _make_block_mask,
    _mask_fn,
    _tile_lists,
    block_mask_tensors,
    gate_key_sums,
)
from natsl.reference import softmax_branch_reference

ROUTINGS = ["random", "all_softmax", "all_linear", "one_head_softmax"]


def make_case(seed, B, T, Hr, G, d, dv, C, packed, diagonal, kind, p_soft=0.5, dtype=torch.float64):
    """Inputs `(q, k, v, weights, cu_seqlens)`; `weights [B, N, Hr, 2]` one-hot, requires grad."""
    g = gen(seed)
    H = Hr * G
    q, k = (torch.randn(B, T, H, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    cu = None
    if packed:
        n_seq = int(torch.randint(1, min(T, 4) + 1, (1,), generator=g))
        cuts = sorted(torch.randperm(T - 1, generator=g)[: n_seq - 1].add(1).tolist())
        cu = torch.tensor([0, *cuts, T])
    N = num_blocks(T, C, cu)
    soft = torch.rand(B, N, Hr, generator=g) < p_soft
    if kind == "all_softmax":
        soft[:] = True
    elif kind == "all_linear":
        soft[:] = False
    elif kind == "one_head_softmax":
        soft[:] = False
        soft[..., 0] = True
    w = torch.stack([soft, ~soft], -1).to(dtype)
    return [x.requires_grad_() for x in (q, k, v, w)], cu


def reference(q, k, v, w, C, diagonal, cu, router_grad, scale):
    route = Routing(w, C, diagonal, cu)
    gate = route.gates(router_grad)[0]
    return softmax_branch_reference(q.double(), k.double(), v.double(), route, gate, scale)


def check_backend(fn, case, dtype, seed, check_grads=True):
    (q, k, v, w), cu, C, diagonal, router_grad = case
    scale = q.shape[-1] ** -0.5
    ref = reference(q, k, v, w, C, diagonal, cu, router_grad, scale)
    out = fn(q, k, v, Routing(w, C, diagonal, cu), scale, router_grad)
    assert out.dtype == q.dtype and out.shape == ref.shape
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert_close("o", ref, out, tol, atol=tol)
    if not check_grads:
        return
    do = torch.randn(ref.shape, generator=gen(seed + 7), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * do).sum(), (q, k, v, w), allow_unused=True)
    g_out = torch.autograd.grad((out.double() * do).sum(), (q, k, v, w), allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv", "d_routing"), g_ref, g_out):
        a = torch.zeros_like(w) if a is None else a
        b = torch.zeros_like(w) if b is None else b
        assert_close(name, a, b, tol * 10, atol=tol * 10)


def sdpa_fn(q, k, v, route, scale, router_grad):
    return softmax_branch(q, k, v, route, backend="sdpa", scale=scale, router_grad=router_grad)


def flash_fn(equal_dims, radix_bits=4):
    backend = FlashSoftmax(TorchVarlen(equal_head_dims=equal_dims), radix_bits=radix_bits)

    def fn(q, k, v, route, scale, router_grad):
        return backend.forward(q, k, v, route, scale=scale, router_grad=router_grad)
    return fn


case_st = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), B=st.integers(1, 2), T=st.integers(1, 100), Hr=st.integers(1, 2),
    G=st.integers(1, 2), d=st.sampled_from([4, 8, 16]), dv=st.sampled_from([4, 12, 16]), C=st.sampled_from([8, 16]),
    packed=st.booleans(), diagonal=st.sampled_from(["both", "linear"]), kind=st.sampled_from(ROUTINGS),
    p_soft=st.sampled_from([0.3, 0.6, 0.9]), router_grad=st.sampled_from(["selected", "both"]),
    equal_dims=st.booleans(), radix_bits=st.sampled_from([1, 2, 4])))

EX_PACKED = dict(seed=3, B=1, T=77, Hr=2, G=2, d=8, dv=12, C=8, packed=True, diagonal="both", kind="random",
                 p_soft=0.6, router_grad="selected", equal_dims=True, radix_bits=1)
EX_DENSE = dict(seed=5, B=2, T=100, Hr=2, G=1, d=16, dv=4, C=8, packed=False, diagonal="both", kind="random",
                p_soft=0.9, router_grad="selected", equal_dims=False, radix_bits=2)
EX_LINEAR_DIAG = dict(seed=9, B=1, T=40, Hr=1, G=2, d=4, dv=12, C=16, packed=False, diagonal="linear",
                      kind="one_head_softmax", p_soft=0.5, router_grad="both", equal_dims=True, radix_bits=4)


def _build(c, dtype=torch.float64):
    if c["packed"]:
        c = {**c, "B": 1}
    tensors, cu = make_case(c["seed"], c["B"], c["T"], c["Hr"], c["G"], c["d"], c["dv"], c["C"], c["packed"],
                            c["diagonal"], c["kind"], c["p_soft"], dtype)
    return (tensors, cu, c["C"], c["diagonal"], c["router_grad"]), c


@given(c=case_st)
@example(c=EX_PACKED)
@example(c=EX_DENSE)
@example(c=EX_LINEAR_DIAG)
def test_sdpa_matches_reference(c):
    case, c = _build(c)
    check_backend(sdpa_fn, case, torch.float64, c["seed"])


@given(c=case_st)
@example(c=EX_PACKED)
@example(c=EX_DENSE)
@example(c={**EX_LINEAR_DIAG, "router_grad": "selected"})
def test_flash_algorithm_matches_reference(c):
    case, c = _build({**c, "router_grad": "selected"})
    check_backend(flash_fn(c["equal_dims"], c["radix_bits"]), case, torch.float64, c["seed"])


def triton_fn(q, k, v, route, scale, router_grad):
    return softmax_branch(q, k, v, route, backend="triton", scale=scale, router_grad=router_grad)


@given(c=case_st)
@example(c=EX_PACKED)
@example(c=EX_DENSE)
@example(c={**EX_LINEAR_DIAG, "router_grad": "selected"})
def test_triton_matches_reference(c):
    """natsl's Triton kernels (interpreter, float32; blocks of 16: the kernels' smallest tile)."""
    case, c = _build({**c, "router_grad": "selected", "C": 16}, torch.float32)
    check_backend(triton_fn, case, torch.float32, c["seed"])


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_float32(backend):
    c = {**EX_PACKED, "seed": 11}
    case, c = _build(c, torch.float32)
    fn = sdpa_fn if backend == "sdpa" else flash_fn(True)
    check_backend(fn, case, torch.float32, c["seed"])


@given(c=case_st)
@example(c=EX_PACKED)
@example(c=EX_LINEAR_DIAG)
def test_flex_forward_matches_reference(c):
    case, c = _build(c)
    (q, k, v, w), cu, C, diagonal, _ = case
    q, k, v, w = (x.detach() for x in (q, k, v, w))
    scale = q.shape[-1] ** -0.5
    ref = reference(q, k, v, w, C, diagonal, cu, "selected", scale)
    out = softmax_branch(q, k, v, Routing(w, C, diagonal, cu), backend="flex", scale=scale)
    assert_close("o", ref, out, 1e-9, atol=1e-9)


def test_router_gradient_is_not_vacuous():
    """The examples above compare non-trivial routing gradients: nonzero for selected blocks, and for unselected
    blocks only with router_grad='both'."""
    case, c = _build(EX_DENSE)
    (q, k, v, w), cu, C, diagonal, _ = case
    scale = q.shape[-1] ** -0.5
    soft = w[..., 0].detach().bool()
    for rg in ("selected", "both"):
        out = sdpa_fn(q, k, v, Routing(w, C, diagonal, cu), scale, rg)
        (gw,) = torch.autograd.grad(out.pow(2).sum(), (w,))
        assert gw[..., 0][soft].abs().sum() > 0
        unselected = gw[..., 0][~soft & (torch.arange(w.shape[1])[None, :, None] < w.shape[1] - 1)]
        assert (unselected.abs().sum() > 0) == (rg == "both")


@pytest.mark.parametrize("M", [4, 8, 16, 32])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("diagonal", ["both", "linear"])
def test_flex_block_mask_covers_exactly(M, packed, diagonal):
    """Over queries × [compact | own] keys: the mask equals the reference's visibility (mapped through the compact
    slots), every visible pair lies in a listed tile, every `full` tile is visible in every pair."""
    C = 8
    for seed in range(4):
        (q, k, v, w), cu = make_case(seed, 1 if packed else 2, 61, 2, 1, 4, 4, C, packed, diagonal, "random")
        route = Routing(w.detach(), C, diagonal, cu)
        T = q.shape[1]
        p, lo, tok, valid, inv, tok_slot, NC = _layout(route, T, M)
        assert NC % M == 0 and NC >= route.N * C
        # every softmax token has one slot, which reads it back (the compact gather's backward relies on it)
        has = tok_slot >= 0
        assert torch.equal(has, route.token_mask(T).permute(0, 2, 1))
        assert int(has.sum()) == int(valid.sum())
        assert torch.equal(torch.gather(tok, 2, tok_slot.clamp(min=0))[has], torch.arange(T).expand_as(has)[has])
        own_on = diagonal != "linear"
        L = NC + T if own_on else NC
        mm = _mask_fn(route, T, 1, NC, p, lo, valid, own_on)
        B = q.shape[0]
        ar = torch.arange
        vis = mm(ar(B).view(B, 1, 1, 1), ar(2).view(1, 2, 1, 1), ar(T).view(1, 1, T, 1), ar(L).view(1, 1, 1, L))
        # back to token space: compact slot -> its source token, own key -> itself
        dense = route.dense_mask(T)  # [B, Hr, T, T]
        mapped = torch.zeros_like(dense)
        src = torch.cat([tok, ar(T).expand(B, 2, T)], -1)[..., :L] if own_on else tok
        for b in range(B):
            for r in range(2):
                mapped[b, r].index_put_((ar(T)[:, None].expand(T, L), src[b, r][None, :].expand(T, L)), vis[b, r],
                                        accumulate=True)
        assert torch.equal(mapped, dense), "compact + own visibility differs from the reference mask"
        assert int(vis.sum()) == int(dense.sum()), "a key is visible twice (compact and own)"
        partial, full = block_mask_tensors(route, T, M)
        assert not (partial & full).any()
        tq, tk = ar(T) // M, ar(L) // M
        listed = (partial | full)[:, :, tq][:, :, :, tk]
        assert not (vis & ~listed).any(), "a visible pair falls in a skipped tile"
        assert not (full[:, :, tq][:, :, :, tk] & ~vis).any(), "a full tile holds an invisible pair"


def _dense_of(num, idx, ncols):
    """The dense tile mask `[.., R, ncols]` listed by `(num [.., R], idx [.., R, *])`."""
    out = torch.zeros(*num.shape, ncols, dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(x) for x in num.shape)).tolist():
        pos = tuple(pos)
        cols = idx[pos][:num[pos]].long()
        assert cols.unique().numel() == cols.numel() and bool((cols[1:] > cols[:-1]).all()), "not sorted/unique"
        out[pos][cols] = True
    return out


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("diagonal", ["both", "linear"])
def test_flex_block_lists_round_trip(G, diagonal):
    """The BlockMasks built from the tile tensors (lists by cumsum + scatter, per router head, repeated for its G heads)
    list exactly the `partial` and `full` tiles, in both directions (kv lists per query tile, q lists per key tile),
    for the attention and for the transposed gate pass (compact tiles as queries)."""
    (q, k, v, w), cu = make_case(2, 2, 150, 2, G, 4, 4, 8, False, diagonal, "random")
    route = Routing(w.detach(), 8, diagonal, cu)
    M = 16
    NC = _layout(route, 150, M)[-1]
    nkc = NC // M
    partial, full = block_mask_tensors(route, 150, M)
    kv, qs, t_kv, t_qs = _tile_lists(partial, full, G, nkc, True)
    main = _make_block_mask(kv, qs, M, None, (150, partial.shape[-1] * M))
    t = _make_block_mask(t_kv, t_qs, M, None, (nkc * M, 150))
    rep = [x.repeat_interleave(G, 1) for x in (partial, full)]
    for bm, (part, fl) in ((main, rep), (t, [x[..., :nkc].transpose(-1, -2) for x in rep])):
        nq, nk = part.shape[-2:]
        assert torch.equal(_dense_of(bm.kv_num_blocks, bm.kv_indices, nk), part)
        assert torch.equal(_dense_of(bm.full_kv_num_blocks, bm.full_kv_indices, nk), fl)
        assert torch.equal(_dense_of(bm.q_num_blocks, bm.q_indices, nq), part.transpose(-1, -2))
        assert torch.equal(_dense_of(bm.full_q_num_blocks, bm.full_q_indices, nq), fl.transpose(-1, -2))
    assert rep[0].any() and rep[1][..., :nkc].any()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_flex_compiled_kernels_on_cpu(packed, monkeypatch):
    """The backend's FlexAttention call compiled by Inductor for the CPU (inference only there, and without LSE
    output, so not the gate pass): its BlockMask lists (compiled, skipped and full tiles are honoured, unlike eager
    CPU FlexAttention) and `mask_mod` with its clamped indices give the reference output."""
    from torch.nn.attention.flex_attention import flex_attention

    import natsl.layers.softmax.flex as fx

    compiled = torch.compile(flex_attention, dynamic=False)
    monkeypatch.setattr(fx, "_flex_fn", lambda device: compiled)
    B, T, Hr, G, C, M = (1 if packed else 2), 300, 2, 2, 16, 32
    (q, k, v, w), cu = make_case(6, B, T, Hr, G, 16, 16, C, packed, "both", "random", p_soft=0.4,
                                 dtype=torch.float32)
    q, k, v, w = (x.detach() for x in (q, k, v, w))
    route = Routing(w, C, "both", cu)
    scale = 0.25
    with torch.no_grad():
        out = FlexSoftmax(mask_block=M).forward(q, k, v, route, scale=scale)
    ref = reference(q, k, v, w, C, "both", cu, "selected", scale)
    assert_close("o", ref, out, 2e-5, atol=2e-5)

    partial, full = block_mask_tensors(route, T, M)
    assert full.any() and partial.any()  # both kinds of tiles were exercised


def test_gate_key_sums_flex_equals_dense_and_the_direct_sum():
    """The transposed gate pass: FlexAttention (as on CUDA, here its CPU forward) and the dense twin both give
    `Σ_t exp(q_t·k_s·scale − lse_t) Δ_t` over visible pairs; a query without keys (lse −inf) adds nothing."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = gen(4)
    B, H, NC, T, d, scale = 1, 2, 24, 40, 8, 0.3
    kc, qt = torch.randn(B, H, NC, d, generator=g), torch.randn(B, H, T, d, generator=g)
    delta, lse = torch.randn(B, H, T, generator=g), torch.randn(B, H, T, generator=g) + 3
    lse[0, 1, 5] = float("-inf")

    def t_mask(b, h, s_idx, t_idx):
        return (s_idx + h) % 3 <= t_idx % 4

    block = create_block_mask(t_mask, B, H, NC, T, device="cpu", BLOCK_SIZE=8)
    ar = torch.arange
    vis = t_mask(0, ar(H).view(H, 1, 1), ar(NC).view(1, NC, 1), ar(T).view(1, 1, T))[None]
    vis = vis & torch.isfinite(lse)[:, :, None, :]
    e = torch.exp(kc.double() @ qt.double().transpose(-1, -2) * scale - lse.double()[:, :, None, :])
    direct = torch.where(vis, e * delta.double()[:, :, None, :], 0.0).sum(-1)
    dense = gate_key_sums(kc, qt, delta, lse, t_mask, block, scale, use_flex=False)
    flex = gate_key_sums(kc, qt, delta, lse, t_mask, block, scale, use_flex=True)
    torch.testing.assert_close(dense, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flex.double(), direct, rtol=1e-4, atol=1e-4)


@given(c=case_st)
@example(c=EX_PACKED)
@example(c=EX_DENSE)
@example(c={**EX_LINEAR_DIAG, "router_grad": "selected"})
def test_flex_layout_matches_reference_with_gradients(c):
    """The flex backend's compacted layout, mask and gate-gradient taps (dense attention on CPU, with autograd):
    outputs and gradients of q, k, v and the routing (`selected`)."""
    case, c = _build({**c, "router_grad": "selected"})
    backend = FlexSoftmax(mask_block=16)

    def fn(q, k, v, route, scale, router_grad):
        return backend.forward(q, k, v, route, scale=scale, router_grad=router_grad)
    check_backend(fn, case, torch.float64, c["seed"])


@pytest.mark.parametrize("radix_bits", [1, 2, 3, 4])
def test_flash_plan_levels_partition_the_past(radix_bits):
    """Each (query, past softmax key) pair of a router head appears in exactly one level's varlen sequence."""
    (q, k, v, w), cu = make_case(1, 1, 97, 2, 1, 4, 4, 4, True, "both", "random", p_soft=0.6)
    route = Routing(w.detach(), 4, "both", cu)
    T = q.shape[1]
    plan = build_plan(route, T, radix_bits)
    Hr = 2
    count = torch.zeros(Hr, T, T, dtype=torch.long)
    for lvl in plan.levels:
        cq, ck = lvl.cu_q.long(), lvl.cu_k.long()
        assert lvl.max_q == int((cq[1:] - cq[:-1]).max()) and lvl.max_k == int((ck[1:] - ck[:-1]).max())
        q_rows, k_rows = plan.q_rows[lvl.q], plan.k_rows[lvl.k]
        assert cq[-1] == q_rows.numel() and ck[-1] == k_rows.numel()
        for s in range(cq.numel() - 1):
            qr, kr = q_rows[cq[s]:cq[s + 1]], k_rows[ck[s]:ck[s + 1]]
            r = qr[0] % Hr
            assert (qr % Hr == r).all() and (kr % Hr == r).all()
            count[r, (qr // Hr)[:, None], (kr // Hr)[None, :]] += 1
    lay = route.layout(T)
    tb, ts = lay.token_block, lay.token_seq
    past = (tb[None, :] < tb[:, None]) & (ts[:, None] == ts[None, :])
    want = past[None] & route.token_mask(T)[0].T[:, None, :]
    assert torch.equal(count, want.long())
    assert len(plan.levels) >= (2 if radix_bits <= 2 else 1)


def test_torch_varlen_kernel_matches_per_sequence_sdpa():
    g = gen(0)
    lens_q, lens_k = [3, 1, 5], [4, 6, 5]
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 10, 15], dtype=torch.int32)
    q = torch.randn(9, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(15, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(15, 2, 6, generator=g, dtype=torch.float64)
    for causal in (False, True):
        out, lse = TorchVarlen(False).fwd(q, k, v, cu_q, cu_k, 5, 6, causal, 0.3)
        for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
            qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            mask = torch.ones(lq, lk, dtype=torch.bool)
            if causal:  # flash-attn's bottom-right alignment
                mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
            s = torch.einsum("qhd,khd->hqk", qs, ks) * 0.3
            s = s.masked_fill(~mask, float("-inf"))
            want = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                                  attn_mask=mask, scale=0.3).transpose(0, 1)
            torch.testing.assert_close(out[cu_q[i]:cu_q[i + 1]], want)
            torch.testing.assert_close(lse[:, cu_q[i]:cu_q[i + 1]], s.logsumexp(-1))


@pytest.mark.parametrize("equal_dims", [True, False])
def test_flash_decode_matches_dense(equal_dims):
    g = gen(1)
    B, Hr, G, d, dv = 2, 3, 2, 8, 12
    lens = torch.tensor([5, 0, 9, 1, 3, 7])  # (b, r) row-major; one pair without keys
    cu = F.pad(lens.cumsum(0), (1, 0))
    q = torch.randn(B, Hr * G, d, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu[-1]), G, d, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu[-1]), G, dv, generator=g, dtype=torch.float64)
    out, lse = flash_decode(q, k, v, cu, int(lens.max()), kernel=TorchVarlen(equal_dims), return_lse=True)
    assert out.shape == (B, Hr * G, dv) and lse.shape == (B, Hr * G)
    for b in range(B):
        for r in range(Hr):
            i = b * Hr + r
            ks, vs = k[cu[i]:cu[i + 1]], v[cu[i]:cu[i + 1]]
            for gg in range(G):
                h = r * G + gg
                if lens[i] == 0:
                    assert (out[b, h] == 0).all() and lse[b, h] == float("-inf")
                    continue
                s = ks[:, gg] @ q[b, h] * d ** -0.5
                torch.testing.assert_close(out[b, h], torch.softmax(s, 0) @ vs[:, gg])
                torch.testing.assert_close(lse[b, h], s.logsumexp(0).float())


def _small_inputs(requires_grad=False, router_requires_grad=False):
    (q, k, v, w), cu = make_case(0, 1, 20, 2, 1, 8, 8, 8, False, "both", "random")
    q, k, v, w = (x.detach() for x in (q, k, v, w))
    q.requires_grad_(requires_grad)
    w.requires_grad_(router_requires_grad)
    return q, k, v, Routing(w, 8)


def test_resolve_auto_on_cpu_is_sdpa(caplog):
    q, k, v, route = _small_inputs()
    with caplog.at_level(logging.INFO, logger="natsl.layers.softmax"):
        assert resolve("auto", q, k, v, route).name == "sdpa"
        assert resolve("auto", q, k, v, route).name == "sdpa"
    assert len([r for r in caplog.records if "auto" in r.getMessage()]) <= 1  # logged once


def test_auto_order_kinds():
    """CUDA calls prefer natsl's triton kernels (training: flex next, inference: flash next), CPU sdpa; every order
    lists real backends."""
    assert auto_kind("cuda", True) == "cuda-train" and auto_kind("cuda", False) == "cuda"
    assert auto_kind("cpu", True) == auto_kind("cpu", False) == "cpu"
    assert AUTO_ORDER["cuda-train"][:2] == ("triton", "flex") and AUTO_ORDER["cuda"][:2] == ("triton", "flash")
    assert AUTO_ORDER["cpu"] == ("sdpa",)
    assert all(set(order) <= set(SOFTMAX_BACKENDS) for order in AUTO_ORDER.values())


def test_unknown_backend_raises():
    q, k, v, route = _small_inputs()
    with pytest.raises(ValueError, match="flash.*flex.*sdpa"):
        softmax_branch(q, k, v, route, backend="xformers")
    with pytest.raises(ValueError, match="router_grad"):
        softmax_branch(q, k, v, route, router_grad="none")


def test_explicit_flash_on_cpu_lists_every_reason():
    q, k, v, route = _small_inputs(router_requires_grad=True)
    with pytest.raises(ValueError) as err:
        softmax_branch(q, k, v, route, backend="flash", router_grad="both")
    msg = str(err.value)
    for part in ("fa4", "varlen", "CUDA", "float16/bfloat16", "pip install flash-attn-4", "natsl[flash4]",
                 "router_grad='both'", "inference only"):
        assert part in msg, part


def test_flex_kernel_options_per_dtype():
    """natsl's measured tiles for 16-bit inputs, FlexAttention's defaults for float32, explicit options for all."""
    default = FlexSoftmax()
    assert default.options_for(torch.bfloat16) == default.options_for(torch.float16) == KERNEL_OPTIONS
    assert default.options_for(torch.float32) is None
    mine = {"BLOCK_M": 32}
    assert FlexSoftmax(kernel_options=mine).options_for(torch.float32) == mine
    assert FlexSoftmax(kernel_options=mine).options_for(torch.bfloat16) == mine


def test_explicit_triton_lists_its_reasons(monkeypatch):
    """Off CUDA (without the interpreter), float64, an unsupported block size and router_grad='both' are named."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, route = _small_inputs(requires_grad=True, router_requires_grad=True)
    with pytest.raises(ValueError) as err:
        softmax_branch(q, k, v, route, backend="triton", router_grad="both")
    msg = str(err.value)
    for part in ("CUDA", "float64", "block_size 8", "router_grad='both'", "to enable it"):
        assert part in msg, part


def test_explicit_flex_router_grad_both_raises():
    q, k, v, route = _small_inputs(requires_grad=True, router_requires_grad=True)
    with pytest.raises(ValueError, match="router_grad='both'"):
        softmax_branch(q, k, v, route, backend="flex", router_grad="both")
    assert SOFTMAX_BACKENDS["flex"].not_supported_reasons(q, k, v, route, "selected") == []


def test_backend_options_validated():
    with pytest.raises(ValueError, match="radix_bits"):
        FlashSoftmax(radix_bits=0)
    with pytest.raises(ValueError, match="mask_block"):
        FlexSoftmax(mask_block=0)


def test_input_validation():
    q, k, v, route = _small_inputs()
    with pytest.raises(ValueError, match="k must have the shape"):
        softmax_branch(q, k[:, :-1], v, route)
    with pytest.raises(ValueError, match="multiple of the router heads"):
        softmax_branch(q[:, :, :1], k[:, :, :1], v[:, :, :1], route)
    with pytest.raises(ValueError, match="blocks"):
        softmax_branch(q[:, :9], k[:, :9], v[:, :9], route)


@pytest.mark.parametrize("diagonal", ["both", "linear"])
def test_flex_plan_compiles_to_the_eager_result(diagonal):
    """The flex call's routing-derived tensors (`_plan`: layout, tile lists both ways, gather rows) compiled by
    Inductor (for the CPU) equal the eager ones bit for bit; packed sequences and a partial block. (The backend runs
    `_plan` compiled on CUDA, eagerly on CPU.)"""
    from natsl.layers.softmax import flex as fx

    (q, k, v, w), cu = make_case(3, 1, 150, 2, 2, 4, 4, 8, True, diagonal, "random", p_soft=0.4)
    route = Routing(w.detach(), 8, diagonal, cu)
    args = (*fx.routing_tensors(route, 150), 150, 16, 8, 4, diagonal != "linear", True)
    eager = fx._plan(*args)
    compiled = torch.compile(fx._plan, dynamic=False)(*args)
    flat_e, flat_c = torch.utils._pytree.tree_leaves(eager), torch.utils._pytree.tree_leaves(compiled)
    assert len(flat_e) == len(flat_c)
    for a, b in zip(flat_e, flat_c):
        assert (a is None and b is None) or torch.equal(a, b)
    assert sum(a is None for a in flat_e) == (1 if diagonal == "linear" else 0)  # back_own: no own segment


def test_flex_compiled_plan_failure_falls_back_to_eager(monkeypatch, caplog):
    """If compiling `_plan` fails, `_run_plan` logs it once and returns the eager result from then on."""
    from natsl.layers.softmax import flex as fx

    (q, k, v, w), cu = make_case(5, 1, 40, 2, 2, 2, 2, 8, True, "both", "random", p_soft=0.5)
    route = Routing(w.detach(), 8, "both", cu)
    args = (*fx.routing_tensors(route, 40), 40, 16, 8, 2, True, False)
    calls = []

    def broken(fn):
        def call(*a):
            calls.append(1)
            raise RuntimeError("inductor codegen failed")
        return call

    monkeypatch.setattr(fx, "_static_compiled", broken)
    monkeypatch.setattr(fx, "_compiled_plan_ok", True)
    with caplog.at_level("WARNING", logger=fx.__name__):
        first = fx._run_plan(True, *args)
        second = fx._run_plan(True, *args)
    assert calls == [1] and not fx._compiled_plan_ok
    assert sum("compiling the routing plan failed" in r.getMessage() for r in caplog.records) == 1
    for a, b, c in zip(*(torch.utils._pytree.tree_leaves(x) for x in (fx._plan(*args), first, second))):
        assert (a is None and b is None and c is None) or (torch.equal(a, b) and torch.equal(a, c))
