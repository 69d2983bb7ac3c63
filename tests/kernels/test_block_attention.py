"""natsl's block-sparse softmax-branch kernels (`natsl.kernels.block_attention`) under the Triton interpreter, in
float32, against their PyTorch twin `naive_block_attention` (float64) and the twin against the spec's reference:
output and the gradients of q, k, v and the softmax gate (the router gradient); dense and packed input, partial
blocks, both diagonal policies, all-softmax / all-linear routings, T = 1, head dims that are not powers of two;
the index plan; input errors."""

import pytest
import torch
from helpers import assert_close, gen, random_cu_seqlens
from hypothesis import example, given
from hypothesis import strategies as st

import natsl.kernels.block_attention as ba
from natsl.kernels.block_attention import block_attention, block_sparse_plan
from natsl.kernels.index import block_layout
from natsl.kernels.naive import naive_block_attention
from natsl.layers.routing import Routing
from natsl.reference import softmax_branch_reference


def _case(seed, B, T, Hr, G, D, DV, C, packed, kind, p_soft=0.5, dtype=torch.float32):
    """`packed`: False (dense), True (random packed sequences) or the `cu_seqlens` tensor itself."""
    gn = gen(seed)
    H = Hr * G
    if isinstance(packed, torch.Tensor):
        cu = packed
    else:
        cu = random_cu_seqlens(gn, T, int(torch.randint(1, min(T, 4) + 1, (1,), generator=gn))) if packed else None
    lay = block_layout(T, C, cu)
    q, k = (torch.randn(B, T, H, D, generator=gn, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=gn, dtype=dtype)
    soft = torch.rand(B, lay.N, Hr, generator=gn) < p_soft
    if kind == "all_softmax":
        soft[:] = True
    elif kind == "all_linear":
        soft[:] = False
    gate = torch.ones(B, lay.N, Hr, dtype=torch.float64, requires_grad=True)
    return [x.requires_grad_() for x in (q, k, v)], soft, gate, lay, cu


def _kernel_vs_twin(seed, B, T, Hr, G, D, DV, C, packed, kind, own, p_soft=0.5):
    (q, k, v), soft, gate, lay, _ = _case(seed, B, T, Hr, G, D, DV, C, packed, kind, p_soft)
    scale = D ** -0.5
    o = block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, C, gate=gate, own=own)
    assert o.dtype == q.dtype and o.shape == (B, T, Hr * G, DV)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    gd = gate.detach().clone().requires_grad_()
    ref = naive_block_attention(qd, kd, vd, soft, lay.token_block, lay.token_seq, scale=scale, gate=gd, own=own)
    assert_close("o", ref, o, 1e-5, atol=1e-6)
    do = torch.randn(ref.shape, generator=gen(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad((o * do.float()).sum(), (q, k, v, gate))
    ref_grads = torch.autograd.grad((ref * do).sum(), (qd, kd, vd, gd))
    for name, r, g in zip(("dq", "dk", "dv", "dgate"), ref_grads, grads):
        assert_close(name, r, g, 1e-4, atol=1e-5)
    assert (grads[3][~soft] == 0).all(), "linear blocks get no softmax-gate gradient (router_grad='selected')"
    return grads


case_st = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), B=st.integers(1, 2), T=st.integers(1, 90), Hr=st.integers(1, 2), G=st.integers(1, 2),
    D=st.sampled_from([16, 24]), DV=st.sampled_from([16, 40]), C=st.sampled_from([16, 32]), packed=st.booleans(),
    kind=st.sampled_from(["random", "all_softmax", "all_linear"]), own=st.booleans()))


@given(c=case_st)
@example(c=dict(seed=1, B=2, T=90, Hr=2, G=2, D=16, DV=40, C=16, packed=False, kind="random", own=True))
@example(c=dict(seed=2, B=1, T=77, Hr=1, G=2, D=24, DV=16, C=16, packed=True, kind="random", own=True))
@example(c=dict(seed=3, B=1, T=64, Hr=2, G=1, D=16, DV=16, C=16, packed=False, kind="random", own=False))
@example(c=dict(seed=4, B=1, T=1, Hr=1, G=1, D=16, DV=16, C=16, packed=False, kind="all_softmax", own=True))
def test_kernels_match_twin(c):
    if c["packed"]:
        c = {**c, "B": 1}
    _kernel_vs_twin(**c)


def test_block_size_64_and_router_gradient_not_vacuous():
    grads = _kernel_vs_twin(seed=5, B=1, T=200, Hr=2, G=1, D=16, DV=16, C=64, packed=False, kind="random", own=True,
                            p_soft=0.7)
    assert grads[3].abs().sum() > 0


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("p_soft", [0.6, 1.0])
def test_packed_sequences_starting_at_odd_and_even_blocks(own, p_soft):
    """Packed input whose sequences start at blocks 0, 1, 3 and 7 and end in partial blocks (N = 11): no query sees
    a block of another sequence; output and every gradient against the twin."""
    cu = torch.tensor([0, 16, 40, 97, 150])  # sequences start at blocks 0, 1, 3, 7
    lay = block_layout(150, 16, cu)
    assert lay.N == 11 and lay.block_first.tolist()[:8] == [True, True, False, True, False, False, False, True]
    _kernel_vs_twin(seed=11, B=1, T=150, Hr=2, G=2, D=16, DV=24, C=16, packed=cu, kind="random", own=own,
                    p_soft=p_soft)


def test_block_size_128():
    """The largest block size the kernels take (128 × 128 tiles), packed input."""
    _kernel_vs_twin(seed=6, B=1, T=300, Hr=1, G=2, D=16, DV=16, C=128, packed=True, kind="random", own=True)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("own", [True, False])
def test_twin_matches_reference(packed, own):
    """The twin is the softmax branch of spec §1.3/§1.5/§1.7 (`natsl.reference`), gate gradient included."""
    B = 1 if packed else 2
    (q, k, v), soft, _, lay, cu = _case(7, B, 45, 2, 2, 8, 12, 8, packed, "random", dtype=torch.float64)
    w = torch.stack([soft, ~soft], -1).double().requires_grad_()
    route = Routing(w, 8, "both" if own else "linear", cu)
    gate = route.gates("selected")[0]
    ref = softmax_branch_reference(q, k, v, route, gate, 8 ** -0.5)
    out = naive_block_attention(q, k, v, soft, lay.token_block, lay.token_seq, scale=8 ** -0.5, gate=gate, own=own)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = torch.randn(ref.shape, generator=gen(8), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * do).sum(), (q, k, v, w), retain_graph=True)  # the gate's graph is shared
    for a, b in zip(g_ref, torch.autograd.grad((out * do).sum(), (q, k, v, w))):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_plan_lists_the_past_softmax_blocks():
    """`kstart[b, r, lo:hi]` of block n are exactly the first rows of the softmax blocks of (b, r) before n in n's
    sequence; `seq_end[n]` is one past the last block of n's sequence."""
    gn = gen(11)
    cu = torch.tensor([0, 50, 51, 130, 200])
    C = 16
    lay = block_layout(200, C, cu)
    soft = torch.rand(2, lay.N, 3, generator=gn) < 0.5
    plan = block_sparse_plan(soft, lay.block_first, lay.block_start, lay.block_len, C)
    assert plan["C"] == C
    bs = lay.block_seq
    for b in range(2):
        for r in range(3):
            for n in range(lay.N):
                want = [j for j in range(n) if soft[b, j, r] and bs[j] == bs[n]]
                lo, hi = int(plan["lo"][b, n, r]), int(plan["hi"][b, n, r])
                assert plan["kstart"][b, r, lo:hi].tolist() == [int(lay.block_start[j]) for j in want]
    for n in range(lay.N):
        assert int(plan["seq_end"][n]) == max(j for j in range(lay.N) if bs[j] == bs[n]) + 1


@pytest.mark.parametrize("packed", [False, True])
def test_tile_descriptors_and_pointer_loads_agree(monkeypatch, packed):
    """Power-of-two head dims can read their tiles through tensor descriptors (TMA), others through pointers: the
    forward, dq and dk/dv kernels give the same output and gradients (router gradient included) either way, partial
    blocks and packed sequences included (descriptor rows past a block's end are masked, zero-weighted or
    zero-filled)."""
    (q, k, v), soft, gate, lay, _ = _case(12, 2, 150, 2, 2, 16, 32, 16,
                                          torch.tensor([0, 37, 150]) if packed else False, "random")
    const = ba._launch_args(q, k, v, 16)[5]
    assert ba._tile_descriptors("fwd", 16, const, q, k, v) is not None  # the default: the forward takes them
    assert ba._tile_descriptors("fwd", 16, const, q[..., :12], k, v) is None  # not a tile's width
    monkeypatch.setattr(ba, "DESCRIPTORS", {"fwd": 0, "dq": 151, "dkdv": 150})  # from a sequence length on
    assert ba._tile_descriptors("dq", 16, const, q, k, v) is None
    assert ba._tile_descriptors("dkdv", 16, const, q, k, v) is not None
    do = torch.randn(2, 150, 4, 32, generator=gen(13))

    def run(on: bool):
        monkeypatch.setattr(ba, "DESCRIPTORS", dict.fromkeys(("fwd", "dq", "dkdv"), 0 if on else None))
        o = block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, 16, gate=gate)
        return (o, *torch.autograd.grad((o * do).sum(), (q, k, v, gate)))

    for name, a, b in zip(("o", "dq", "dk", "dv", "dgate"), run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_program_orders_agree(monkeypatch, packed):
    """Block-major and (batch, head)-major program orders (`HEAD_MAJOR`) do the same work per program: output and
    every gradient (router gradient included) equal bit for bit, batch 2, packed sequences and partial blocks."""
    (q, k, v), soft, gate, lay, _ = _case(14, 2, 150, 2, 2, 16, 32, 16,
                                          torch.tensor([0, 37, 150]) if packed else False, "random")
    do = torch.randn(2, 150, 4, 32, generator=gen(15))

    def run(head_major: bool):
        monkeypatch.setattr(ba, "HEAD_MAJOR", dict.fromkeys(("fwd", "dq", "dkdv"), head_major))
        o = block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, 16, gate=gate)
        return (o, *torch.autograd.grad((o * do).sum(), (q, k, v, gate)))

    for name, a, b in zip(("o", "dq", "dk", "dv", "dgate"), run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_forward_over_widely_spread_scores():
    """Key norms that grow along the sequence move the rows' running max by factors of 2**10 to 2**33 from one past
    block to the next (the online softmax's rescale of the accumulated output): the output and gradients still equal
    the float64 twin (the LSE included, through the backward)."""
    (q, k, v), soft, gate, lay, _ = _case(21, 1, 160, 1, 2, 16, 16, 16, False, "all_softmax")
    with torch.no_grad():
        q.mul_(3.0)
        k.mul_(torch.linspace(0.5, 6.0, 160)[None, :, None, None])
    o = block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, 16, gate=gate)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    gd = gate.detach().clone().requires_grad_()
    ref = naive_block_attention(qd, kd, vd, soft, lay.token_block, lay.token_seq, scale=16 ** -0.5, gate=gd)
    assert_close("o", ref, o, 1e-5, atol=1e-6)
    do = torch.randn(ref.shape, generator=gen(22), dtype=torch.float64)
    grads = torch.autograd.grad((o * do.float()).sum(), (q, k, v, gate))
    for name, r, g in zip(("dq", "dk", "dv", "dgate"), torch.autograd.grad((ref * do).sum(), (qd, kd, vd, gd)), grads):
        assert_close(name, r, g, 1e-4, atol=1e-5)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
    """diagonal='linear' with no past softmax block: o = 0, gradients finite (and zero)."""
    (q, k, v), soft, gate, lay, _ = _case(9, 1, 40, 1, 1, 16, 16, 16, False, "all_linear")
    o = block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, 16, gate=gate, own=False)
    assert (o == 0).all()
    grads = torch.autograd.grad(o.sum(), (q, k, v, gate))
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_input_errors():
    (q, k, v), soft, _, lay, _ = _case(0, 1, 32, 2, 1, 16, 16, 16, False, "random")
    with pytest.raises(ValueError, match="block_size"):
        block_attention(q, k, v, soft, lay.block_first, lay.block_start, lay.block_len, 24)
    with pytest.raises(TypeError, match="one dtype"):
        block_attention(q, k.double(), v, soft, lay.block_first, lay.block_start, lay.block_len, 16)
    with pytest.raises(ValueError, match="multiple of the router heads"):
        block_attention(q, k, v, soft.repeat(1, 1, 2)[..., :3], lay.block_first, lay.block_start, lay.block_len, 16)


def test_strided_views_of_a_fused_projection():
    """q, k, v as slices of one `[B, T, 3·H·D]` tensor (what a fused q/k/v projection gives): the same output and
    gradients as contiguous inputs (the backward writes dense gradients)."""
    gn = gen(13)
    B, T, H, D, C = 2, 70, 2, 16, 16
    lay = block_layout(T, C)
    soft = torch.rand(B, lay.N, 1, generator=gn) < 0.6
    fused = torch.randn(B, T, 3 * H * D, generator=gn, requires_grad=True)
    views = [fused[..., i * H * D:(i + 1) * H * D].view(B, T, H, D) for i in range(3)]
    dense = [x.detach().clone().requires_grad_() for x in views]
    do = torch.randn(B, T, H, D, generator=gn)
    outs = [block_attention(*xs, soft, lay.block_first, lay.block_start, lay.block_len, C) for xs in (views, dense)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    (g_fused,) = torch.autograd.grad((outs[0] * do).sum(), (fused,))
    g_dense = torch.autograd.grad((outs[1] * do).sum(), dense)
    torch.testing.assert_close(g_fused, torch.cat([g.reshape(B, T, -1) for g in g_dense], -1), rtol=0, atol=0)
