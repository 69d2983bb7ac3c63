"""The linear branch (`natsl.layers.linear.branch.linear_branch`, spec §1.4, §1.7, §3.2) against the dense float64
reference `natsl.reference.linear_branch_reference`: output, final state and the gradients of every input (q, k, v,
g, beta, initial state and the routing weights, i.e. the router gradient), for all five backends, over the
PyTorch masked chunk pass (`impl="torch"`, float64, any block size) and over fla's chunk functions with natsl's
`masked_write_bwd` kernel (`impl="fla"`, float32, block sizes 16-128, under the Triton interpreter on CPU)."""

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, gen, linear_gate_inputs, random_cu_seqlens, rel_err
from hypothesis import example, given, settings
from hypothesis import strategies as st

from natsl.kernels.index import num_blocks
from natsl.layers.linear import TORCH_LINEAR_OPS
from natsl.layers.linear.branch import LINEAR_IMPLS, linear_branch, resolve_linear_impl
from natsl.layers.routing import Routing, routing_gates
from natsl.reference import linear_branch_reference

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]


def make_case(seed, backend, B, T, Hr, G, K, V, C, *, routing="random", p_soft=0.5, lens=None, n_seq=None,
              init=True, dtype=torch.float64):
    """Random inputs `(x, w, cu)`: tensors by argument name, one-hot routing weights `[B, N, Hr, 2]` and packed
    offsets. `routing`: "random" (softmax with probability `p_soft`), "mixed" (random with both types present),
    "softmax" or "linear" (every block), "heads" (router head 0 all softmax, the others all linear). Packed
    (`B = 1`) with sequence lengths `lens`, or `n_seq` random ones."""
    gn = gen(seed)
    H = Hr * G

    def r(*s):
        return torch.randn(*s, generator=gn, dtype=dtype)

    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V))
    x.update(linear_gate_inputs(gn, backend, B, T, H, K, dtype))
    cu = None
    if lens is not None:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    elif n_seq is not None:
        cu = random_cu_seqlens(gn, T, n_seq)
    if init:
        x["initial_state"] = 0.5 * r(B if cu is None else cu.numel() - 1, H, K, V)
    N = num_blocks(T, C, cu)
    soft = torch.rand(B, N, Hr, generator=gn) < p_soft
    if routing == "mixed":
        assert soft.numel() >= 2
        soft.view(-1)[:2] = torch.tensor([True, False])
    elif routing in ("softmax", "linear"):
        soft = torch.full_like(soft, routing == "softmax")
    elif routing == "heads":
        soft = torch.zeros_like(soft)
        soft[..., 0] = True
    w = torch.stack([soft, ~soft], -1).to(dtype)
    return x, w, cu


def outputs_and_grads(backend, x, w, cu, C, *, impl, dts, router_grad, scale, dtype, final_state=True, frozen=()):
    """`{o, final_state, dq, dk, dv, dg, dbeta, dinitial_state, drouting}` of `linear_branch` (`impl` given) or of
    the reference (`impl=None`), for the inputs cast to `dtype` and fixed random cotangents of o and final state
    (`final_state=False`: `output_final_state=False`, and the loss and the result leave the final state out).
    The inputs named in `frozen` do not require grad (and have no entry)."""
    leaves = {n: t.detach().to(dtype).requires_grad_(n not in frozen) for n, t in x.items()}
    rw = w.detach().to(dtype).requires_grad_()
    route = Routing(rw, C, "both", cu)
    if impl is None:
        _, gate = routing_gates(rw, router_grad)
        o, s = linear_branch_reference(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("beta"),
                                       route, gate, backend=backend, scale=scale, decay_through_softmax=dts,
                                       initial_state=leaves.get("initial_state"))
    else:
        o, s = linear_branch(leaves["q"], leaves["k"], leaves["v"], route, backend=backend, g=leaves.get("g"),
                             beta=leaves.get("beta"), impl=impl, scale=scale, decay_through_softmax=dts,
                             router_grad=router_grad, initial_state=leaves.get("initial_state"),
                             output_final_state=final_state)
        assert o.dtype == dtype and (s.dtype == dtype if final_state else s is None)
    cot = gen(12345)
    loss = (o.double() * torch.randn(o.shape, generator=cot, dtype=torch.float64)).sum()
    res = {"o": o}
    if final_state:
        loss = loss + (s.double() * torch.randn(s.shape, generator=cot, dtype=torch.float64)).sum()
        res["final_state"] = s
    names = [f"d{n}" for n in leaves if n not in frozen] + ["drouting"]
    tensors = [t for n, t in leaves.items() if n not in frozen] + [rw]
    # without the final state, a routing whose every block is the last of its sequence has no effect
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)]
    return {**res, **dict(zip(names, grads))}


def run_both(backend, x, w, cu, C, *, impl="torch", dts=True, router_grad="selected", scale=None,
             dtype=torch.float64, final_state=True, frozen=()):
    scale = x["q"].shape[-1] ** -0.5 if scale is None else scale
    kw = dict(dts=dts, router_grad=router_grad, scale=scale, final_state=final_state, frozen=frozen)
    out = outputs_and_grads(backend, x, w, cu, C, impl=impl, dtype=dtype, **kw)
    ref = outputs_and_grads(backend, x, w, cu, C, impl=None, dtype=torch.float64, **kw)
    assert set(out) == set(ref)
    return out, ref


def check(out, ref, ratio=1e-9, atol=1e-11):
    for n in ref:
        assert_close(n, ref[n], out[n], ratio, atol=atol)


# impl="torch" (float64): every backend, block size, layout, routing and option


TORCH_LAYOUTS = {
    "dense": dict(B=2, T=45),  # 45 = 11·4 + 1 = 5·8 + 5 = 2·16 + 13: a partial last block for C = 4, 8, 16
    "packed": dict(B=1, T=64, lens=[13, 1, 30, 20]),  # partial last blocks, a one-token sequence
}


@pytest.mark.parametrize("router_grad", ["selected", "both"])
@pytest.mark.parametrize("dts", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
@pytest.mark.parametrize("C", [4, 8, 16], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_impl_matches_reference(backend, C, layout, dts, router_grad):
    """Random routings (both types present), 2 router heads of 2 heads each, initial states, partial blocks."""
    lay = TORCH_LAYOUTS[layout]
    seed = 1000 * BACKENDS.index(backend) + 10 * C + (layout == "packed") + 2 * dts
    x, w, cu = make_case(seed, backend, lay["B"], lay["T"], 2, 2, 4, 3, C, routing="mixed", lens=lay.get("lens"))
    out, ref = run_both(backend, x, w, cu, C, dts=dts, router_grad=router_grad, scale=0.7)
    check(out, ref)


@pytest.mark.parametrize("routing", ["softmax", "linear", "heads"])
@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_impl_uniform_routings(backend, layout, routing):
    """All blocks softmax (no write reaches the carried state; it only decays), all blocks linear, and one router
    head all softmax while the other is all linear."""
    lay = TORCH_LAYOUTS[layout]
    x, w, cu = make_case(7, backend, lay["B"], lay["T"], 2, 1, 4, 3, 8, routing=routing, lens=lay.get("lens"))
    for dts in (True, False):
        for router_grad in ("selected", "both"):
            out, ref = run_both(backend, x, w, cu, 8, dts=dts, router_grad=router_grad)
            check(out, ref)
            if routing == "softmax" and router_grad == "selected":
                assert not out["drouting"].any()


case = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), B=st.integers(1, 2), T=st.integers(1, 100),
    HrG=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]), K=st.sampled_from([4, 8]), V=st.sampled_from([3, 8]),
    C=st.sampled_from([4, 8, 16]), routing=st.sampled_from(["random", "softmax", "linear"]),
    p_soft=st.sampled_from([0.3, 0.6]), n_seq=st.sampled_from([None, 1, 2, 3]), init=st.booleans(),
    dts=st.booleans(), router_grad=st.sampled_from(["selected", "both"]), final_state=st.booleans()))


@settings(deadline=None)
@given(c=case)
@example(c=dict(seed=1, backend="gdn", B=2, T=1, HrG=(2, 1), K=4, V=3, C=4, routing="random", p_soft=0.6,
                n_seq=None, init=True, dts=True, router_grad="both", final_state=True))  # T = 1
@example(c=dict(seed=2, backend="gla", B=1, T=1, HrG=(1, 2), K=4, V=3, C=16, routing="linear", p_soft=0.3,
                n_seq=1, init=True, dts=False, router_grad="selected", final_state=True))  # packed, one sequence of one token
@example(c=dict(seed=3, backend="deltanet", B=2, T=64, HrG=(2, 2), K=8, V=3, C=16, routing="random", p_soft=0.6,
                n_seq=None, init=False, dts=True, router_grad="both", final_state=False))  # T a multiple of the block size
@example(c=dict(seed=4, backend="mamba2", B=1, T=97, HrG=(2, 1), K=4, V=8, C=8, routing="random", p_soft=0.3,
                n_seq=3, init=True, dts=False, router_grad="both", final_state=True))  # packed, random lengths
@example(c=dict(seed=5, backend="linear_attn", B=2, T=33, HrG=(1, 1), K=8, V=8, C=4, routing="softmax",
                p_soft=0.3, n_seq=None, init=True, dts=True, router_grad="both", final_state=False))
def test_torch_impl_matches_reference_property(c):
    Hr, G = c["HrG"]
    n_seq = None if c["n_seq"] is None else min(c["n_seq"], c["T"])
    B = 1 if n_seq is not None else c["B"]
    x, w, cu = make_case(c["seed"], c["backend"], B, c["T"], Hr, G, c["K"], c["V"], c["C"], routing=c["routing"],
                         p_soft=c["p_soft"], n_seq=n_seq, init=c["init"])
    out, ref = run_both(c["backend"], x, w, cu, c["C"], dts=c["dts"], router_grad=c["router_grad"],
                        final_state=c["final_state"])
    check(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_per_sequence_loop(backend):
    """Blocks restart per packed sequence: the packed call equals one call per sequence (outputs, final states
    and the router gradient of each sequence's blocks)."""
    lens, C = [13, 1, 30, 20], 8
    x, w, cu = make_case(11, backend, 1, sum(lens), 2, 1, 4, 3, C, routing="mixed", lens=lens, init=True)
    rw = w.clone().requires_grad_()
    o, s = linear_branch(x["q"], x["k"], x["v"], Routing(rw, C, "both", cu), backend=backend, g=x.get("g"),
                         beta=x.get("beta"), impl="torch", initial_state=x["initial_state"], output_final_state=True)
    (drw,) = torch.autograd.grad((o * o).sum() + s.sum(), rw)
    blk = 0
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        nb = -(-(b - a) // C)
        sl = {k_: t[:, a:b] for k_, t in x.items() if k_ != "initial_state"}
        rw_n = w[:, blk:blk + nb].clone().requires_grad_()
        o_n, s_n = linear_branch(sl["q"], sl["k"], sl["v"], Routing(rw_n, C), backend=backend, g=sl.get("g"),
                                 beta=sl.get("beta"), impl="torch", initial_state=x["initial_state"][n:n + 1],
                                 output_final_state=True)
        (drw_n,) = torch.autograd.grad((o_n * o_n).sum() + s_n.sum(), rw_n)
        assert_close(f"o[seq {n}]", o_n, o[:, a:b], 1e-12, atol=1e-12)
        assert_close(f"final_state[seq {n}]", s_n[0], s[n], 1e-12, atol=1e-12)
        assert_close(f"drouting[seq {n}]", drw_n, drw[:, blk:blk + nb], 1e-12, atol=1e-12)
        blk += nb


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_linear_is_the_plain_recurrence(backend):
    """With every block linear the branch is one plain call of the recurrence."""
    x, w, _ = make_case(5, backend, 2, 37, 2, 1, 4, 3, 8, routing="linear", init=True)
    o, s = linear_branch(x["q"], x["k"], x["v"], Routing(w, 8), backend=backend, g=x.get("g"), beta=x.get("beta"),
                         impl="torch", initial_state=x["initial_state"], output_final_state=True)
    o_p, s_p = TORCH_LINEAR_OPS[backend](x["q"], x["k"], x["v"], x.get("g"), x.get("beta"),
                                         initial_state=x["initial_state"], output_final_state=True)
    assert_close("o", o_p, o, 1e-12, atol=1e-12)
    assert_close("final_state", s_p, s, 1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal(backend):
    """Perturbing tokens after t (and the routing of later blocks) leaves outputs up to t unchanged."""
    x, w, _ = make_case(9, backend, 1, 40, 1, 2, 4, 3, 8, init=True)
    t = 21

    def run(xx, ww):
        return linear_branch(xx["q"], xx["k"], xx["v"], Routing(ww, 8), backend=backend, g=xx.get("g"),
                             beta=xx.get("beta"), impl="torch", initial_state=xx["initial_state"])[0]

    x2 = {n: (v.clone() if n == "initial_state" else torch.cat([v[:, :t + 1], v[:, t + 1:] + 1], 1))
          for n, v in x.items()}
    if "g" in x2:
        x2["g"] = torch.cat([x["g"][:, :t + 1], x["g"][:, t + 1:] - 0.3], 1)
    if "beta" in x2:
        x2["beta"] = torch.cat([x["beta"][:, :t + 1], x["beta"][:, t + 1:] * 0.5], 1)
    w2 = w.clone()
    w2[:, t // 8 + 1:] = w2[:, t // 8 + 1:].flip(-1)
    assert torch.equal(run(x, w)[:, :t + 1], run(x2, w2)[:, :t + 1])


@pytest.mark.parametrize("router_grad", ["selected", "both"])
def test_last_block_router_gradient_is_zero_without_the_final_state(router_grad):
    """Spec §1.7: the last block of every sequence changes only the carried state, so without the final state in
    the loss its router gradient is exactly zero (and the other blocks' is not)."""
    lens, C = [13, 1, 30, 20], 8
    x, w, cu = make_case(4, "gdn", 1, sum(lens), 2, 1, 4, 3, C, routing="mixed", lens=lens)
    rw = w.clone().requires_grad_()
    o, _ = linear_branch(x["q"], x["k"], x["v"], Routing(rw, C, "both", cu), backend="gdn", g=x["g"],
                         beta=x["beta"], impl="torch", router_grad=router_grad, initial_state=x["initial_state"])
    (drw,) = torch.autograd.grad((o * torch.randn(o.shape, generator=gen(1), dtype=o.dtype)).sum(), rw)
    last = torch.tensor(lens).add(C - 1).div(C, rounding_mode="floor").cumsum(0) - 1
    assert not drw[:, last].any()
    assert drw[..., 1].ne(0).any()


@pytest.mark.parametrize("backend", ["gdn", "gla"])
def test_float32_dtypes_and_no_grad(backend):
    """float32 in → float32 out, float32 state; under no_grad still equal to the reference."""
    x, w, _ = make_case(13, backend, 1, 30, 2, 1, 8, 4, 8, init=True, dtype=torch.float32)
    with torch.no_grad():
        o, s = linear_branch(x["q"], x["k"], x["v"], Routing(w.requires_grad_(), 8), backend=backend, g=x.get("g"),
                             beta=x.get("beta"), impl="torch", initial_state=x["initial_state"],
                             output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    _, gate = routing_gates(w.double())
    o_ref, s_ref = linear_branch_reference(*(None if t is None else t.double() for t in (
        x["q"], x["k"], x["v"], x.get("g"), x.get("beta"))), Routing(w.double(), 8), gate, backend=backend,
        scale=8 ** -0.5, decay_through_softmax=True, initial_state=x["initial_state"].double())
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", s_ref, s, 1e-5)


def test_no_final_state_by_default():
    x, w, _ = make_case(2, "mamba2", 1, 20, 1, 1, 4, 3, 8)
    o, s = linear_branch(x["q"], x["k"], x["v"], Routing(w, 8), backend="mamba2", g=x["g"], impl="torch")
    assert s is None and o.shape == (1, 20, 1, 3)


# impl="fla": fla's chunk functions + natsl's masked_write_bwd under the Triton interpreter (float32, C = 64)

# (backend, layout, decay_through_softmax, router_grad, Hr, G, init); dense: B = 2, T = 130 (two full blocks and a
# partial one); packed: sequences of 70, 1 and 129 tokens (partial last blocks, a one-token sequence)
FLA_CASES = [
    ("gdn", "dense", True, "selected", 2, 1, True),
    ("gdn", "packed", False, "both", 1, 2, True),
    ("gdn", "dense", False, "selected", 2, 1, True),
    ("deltanet", "dense", True, "both", 1, 2, True),
    ("deltanet", "packed", True, "selected", 2, 1, True),
    ("gla", "dense", False, "both", 2, 1, True),
    ("gla", "packed", True, "selected", 1, 2, True),
    ("mamba2", "dense", True, "both", 1, 2, False),
    ("mamba2", "packed", False, "selected", 2, 1, True),
    ("linear_attn", "dense", True, "selected", 2, 1, True),
    ("linear_attn", "packed", True, "both", 1, 2, False),
    ("gdn", "whole", True, "selected", 1, 2, True),
    ("mamba2", "whole", False, "both", 2, 1, True),
]
# whole: dense, T = 128 (whole blocks only)
FLA_LAYOUTS = {"dense": dict(B=2, T=130), "packed": dict(B=1, T=200, lens=[70, 1, 129]), "whole": dict(B=2, T=128)}
# floor of the float32 tolerance (relative RMSE): 10x above the worst the fla path reaches here (1e-6, dg) and far
# below what a dropped or wrong term of the masked backward gives (mutating masked_write_bwd's dk / dg / dv / dm / z
# terms or the state passes' read q·exp(G − G·z) gave 7e-3 or more)
FLA_FLOOR = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend,layout,dts,router_grad,Hr,G,init", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-{'decay' if c[2] else 'nodecay'}-{c[3]}-{'init' if c[6] else 'noinit'}")
    for c in FLA_CASES])
def test_fla_impl_interpreted_matches_reference(backend, layout, dts, router_grad, Hr, G, init):
    """float32 fla path vs the float64 reference, every output and gradient: relative RMSE within 2x that of the
    PyTorch path in float32 (the style guide's rule), with the floor `FLA_FLOOR`."""
    pytest.importorskip("fla")
    lay = FLA_LAYOUTS[layout]
    seed = 100 + FLA_CASES.index((backend, layout, dts, router_grad, Hr, G, init))
    x, w, cu = make_case(seed, backend, lay["B"], lay["T"], Hr, G, 16, 32, 64, routing="mixed",
                         lens=lay.get("lens"), init=init)
    kw = dict(dts=dts, router_grad=router_grad, dtype=torch.float32)
    out, ref = run_both(backend, x, w, cu, 64, impl="fla", **kw)
    out_torch = outputs_and_grads(backend, x, w, cu, 64, impl="torch", scale=16 ** -0.5, **kw)
    for n in ref:
        err_torch = rel_err(ref[n], out_torch[n])
        assert_close(n, ref[n], out[n], max(2 * err_torch, FLA_FLOOR), atol=1e-7)
    assert out["drouting"][..., 1].ne(0).any()


@pytest.mark.slow
@pytest.mark.parametrize("backend,B,T,lens,dts,final_state,frozen", [
    pytest.param("gdn", 2, 1, None, True, True, (), id="gdn-one_token"),
    pytest.param("gla", 2, 64, None, False, False, (), id="gla-one_block-nodecay-no_final_state"),
    pytest.param("mamba2", 1, 129, [64, 65], False, False, (), id="mamba2-packed_full_blocks-nodecay-no_final_state"),
    pytest.param("gdn", 2, 130, None, False, True, ("g",), id="gdn-nodecay-frozen_gate"),
    pytest.param("gla", 1, 200, [70, 1, 129], False, True, ("g",), id="gla-packed-nodecay-frozen_gate"),
])
def test_fla_impl_interpreted_edge_cases(backend, B, T, lens, dts, final_state, frozen):
    """One token; one full block per row; packed sequences of whole blocks and a one-token block; without the
    final state (its gradient `dht` is then absent); a gate that needs no gradient (the backward then skips dg
    and its decay_through_softmax=False correction)."""
    pytest.importorskip("fla")
    x, w, cu = make_case(31, backend, B, T, 2, 1, 16, 16, 64, routing="mixed", lens=lens)
    out, ref = run_both(backend, x, w, cu, 64, impl="fla", dts=dts, router_grad="both", dtype=torch.float32,
                        final_state=final_state, frozen=frozen)
    check(out, ref, FLA_FLOOR, atol=1e-7)


# input validation


def _small():
    x, w, _ = make_case(0, "gdn", 1, 16, 1, 1, 4, 3, 8, init=False)
    return x, w


# (backend, block size, B, T, packed lengths): every block size fla's kernels take per backend family, dense and
# packed (partial last blocks, a one-token sequence)
FLA_BLOCK_CASES = [
    ("gdn", 16, 2, 45, None), ("gdn", 32, 1, 80, [40, 1, 39]), ("deltanet", 16, 1, 50, [30, 20]),
    ("deltanet", 32, 2, 70, None), ("mamba2", 128, 1, 330, [200, 1, 129]), ("mamba2", 32, 2, 70, None),
    ("gla", 128, 2, 150, None), ("gla", 16, 1, 50, [20, 1, 29]), ("linear_attn", 128, 1, 200, [130, 70]),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend,C,B,T,lens", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'packed' if c[4] else 'dense'}")
                                               for c in FLA_BLOCK_CASES])
def test_fla_impl_interpreted_other_block_sizes(backend, C, B, T, lens):
    """Routing blocks of 16, 32 and (not for the delta rule) 128 tokens on the fla path, one block = one fla chunk
    of that size: every output and gradient, the router's included, against the float64 reference."""
    pytest.importorskip("fla")
    x, w, cu = make_case(41 + C, backend, B, T, 2, 1, 16, 16, C, routing="mixed", lens=lens)
    out, ref = run_both(backend, x, w, cu, C, impl="fla", dts=False, router_grad="both", dtype=torch.float32)
    check(out, ref, FLA_FLOOR, atol=1e-7)
    assert out["drouting"][..., 1].ne(0).any()


def test_fla_block_sizes():
    """The fla path takes the chunk sizes of fla's kernels (the delta rule: 16, 32, 64; the others also 128) and
    names them otherwise."""
    x, w = _small()
    with pytest.raises(ValueError, match=r"'gdn' takes block_size in \(16, 32, 64\).*got block_size=8"):
        linear_branch(x["q"], x["k"], x["v"], Routing(w, 8), backend="gdn", g=x["g"], beta=x["beta"], impl="fla")
    for backend, bad in (("gdn", 128), ("deltanet", 96), ("mamba2", 256), ("gla", 48)):
        with pytest.raises(ValueError, match="block_size"):
            resolve_linear_impl("fla", torch.device("cpu"), bad, backend)
    for backend, ok in (("gdn", 32), ("mamba2", 128), ("linear_attn", 16)):
        assert resolve_linear_impl("fla", torch.device("cpu"), ok, backend) == "fla"


def test_resolve_linear_impl():
    assert LINEAR_IMPLS == ("auto", "fla", "torch")
    assert resolve_linear_impl("auto", torch.device("cpu"), 64) == "torch"
    assert resolve_linear_impl("auto", torch.device("cpu"), 8) == "torch"
    assert resolve_linear_impl("torch", torch.device("cpu"), 8) == "torch"
    assert resolve_linear_impl("fla", torch.device("cpu"), 64) == "fla"
    assert resolve_linear_impl("auto", torch.device("cuda"), 64) == "fla"  # a device type; no GPU needed
    assert resolve_linear_impl("auto", torch.device("cuda"), 16) == "torch"
    assert resolve_linear_impl("auto", torch.device("cuda"), 128, "mamba2") == "torch"  # only 64 has run on the H200
    x, w, _ = make_case(3, "gla", 1, 70, 2, 1, 4, 3, 64, routing="mixed")
    args = (x["q"], x["k"], x["v"], Routing(w, 64))
    kw = dict(backend="gla", g=x["g"], initial_state=x["initial_state"], output_final_state=True)
    auto, torch_ = linear_branch(*args, impl="auto", **kw), linear_branch(*args, impl="torch", **kw)
    assert torch.equal(auto[0], torch_[0]) and torch.equal(auto[1], torch_[1])


def test_validation():
    x, w = _small()
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    route = Routing(w, 8)
    with pytest.raises(ValueError, match="linear_impl must be one of .*'auto', 'fla', 'torch'"):
        linear_branch(q, k, v, route, backend="gdn", g=g, beta=beta, impl="cuda")
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        linear_branch(q, k, v, route, backend="retnet", impl="torch")
    with pytest.raises(ValueError, match="router_grad must be one of"):
        linear_branch(q, k, v, route, backend="gdn", g=g, beta=beta, impl="torch", router_grad="none")
    with pytest.raises(TypeError, match="floating point"):
        linear_branch(q.long(), k.long(), v.long(), route, backend="gdn", g=g, beta=beta, impl="torch")
    with pytest.raises(ValueError, match="does not fit"):  # routing batch 2, inputs batch 1
        linear_branch(q, k, v, Routing(torch.cat([w, w]), 8), backend="gdn", g=g, beta=beta, impl="torch")
    with pytest.raises(ValueError, match="does not fit"):  # 3 router heads for 1 linear head
        linear_branch(q, k, v, Routing(w.expand(-1, -1, 3, -1), 8), backend="gdn", g=g, beta=beta, impl="torch")
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        linear_branch(q, k[..., :3], v, route, backend="gdn", g=g, beta=beta, impl="torch")
    with pytest.raises(TypeError, match="Routing"):
        linear_branch(q, k, v, w, backend="gdn", g=g, beta=beta, impl="torch")


# (backend, the g / beta / initial_state passed): each one the backend's recurrence does not take
GATE_MISUSE = [
    pytest.param("gdn", ("beta",), id="gdn-without_g"),
    pytest.param("gdn", ("g_head",), id="gdn-without_beta"),
    pytest.param("mamba2", (), id="mamba2-without_g"),
    pytest.param("mamba2", ("g_key",), id="mamba2-per_key_g"),
    pytest.param("gla", ("g_head",), id="gla-per_head_g"),
    pytest.param("linear_attn", ("g_head",), id="linear_attn-with_g"),
    pytest.param("deltanet", ("g_head", "beta"), id="deltanet-with_g"),
    pytest.param("gdn", ("g_head", "beta", "two_states"), id="gdn-initial_state_of_two_sequences"),
]


@pytest.mark.parametrize("impl", ["torch", "fla"])
@pytest.mark.parametrize("backend,passed", GATE_MISUSE)
def test_gate_inputs_are_checked_against_the_backend(backend, passed, impl):
    """Both impls reject a g / beta / initial_state that the backend does not take, as the PyTorch path does."""
    x, w, _ = make_case(0, "gdn", 1, 64, 1, 1, 16, 16, 64, routing="linear", init=False, dtype=torch.float32)
    gk = linear_gate_inputs(gen(1), "gla", 1, 64, 1, 16, torch.float32)["g"]
    given = dict(beta=x["beta"], g_head=x["g"], g_key=gk, two_states=torch.zeros(2, 1, 16, 16))
    names = dict(beta="beta", g_head="g", g_key="g", two_states="initial_state")
    kw = {names[p]: given[p] for p in passed}
    with pytest.raises(ValueError, match="g|beta|initial_state"):
        linear_branch(x["q"], x["k"], x["v"], Routing(w, 64), backend=backend, impl=impl, **kw)


def test_fla_missing_raises_import_error_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setitem(sys.modules, "fla.ops", None)
    x, w, _ = make_case(0, "gdn", 1, 16, 1, 1, 4, 3, 64, init=False)
    with pytest.raises(ImportError, match="pip install .*flash-linear-attention"):
        linear_branch(x["q"], x["k"], x["v"], Routing(w, 64), backend="gdn", g=x["g"], beta=x["beta"], impl="fla")


def _op_inputs(T=20, B=1):
    """Arguments of `natsl.natsl_attention`: 2 softmax heads and 1 linear head over one router head, C = 8."""
    gn = gen(0)
    qs, ks, vs = (torch.randn(B, T, 2, 4, generator=gn, dtype=torch.float64) for _ in range(3))
    ql, kl, vl = (torch.randn(B, T, 1, 8, generator=gn, dtype=torch.float64) for _ in range(3))
    return qs, ks, vs, ql, F.normalize(kl, dim=-1), vl


@pytest.mark.parametrize("cu", [[0, 5, 5, 20], [0, 12, 8, 20]], ids=["empty_sequence", "decreasing"])
def test_op_rejects_cu_seqlens_not_strictly_increasing(cu):
    import natsl

    qs, ks, vs, ql, kl, vl = _op_inputs()
    routing = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(2, 1).view(1, 4, 1, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        natsl.natsl_attention(qs, ks, vs, ql, kl, vl, routing, linear_backend="linear_attn", block_size=8,
                              cu_seqlens=torch.tensor(cu), softmax_backend="sdpa", linear_impl="torch")


def test_layer_rejects_integer_hidden_states_and_bad_cu_seqlens():
    from natsl.layers.natsl_attention import NAtSLAttention

    layer = NAtSLAttention(hidden_size=16, num_heads=1, head_dim=8, expand_v=1, num_softmax_heads=2,
                           num_router_heads=1, block_size=8, linear_backend="gdn", softmax_backend="sdpa",
                           linear_impl="torch")
    x = torch.randn(1, 20, 16, generator=gen(0))
    with pytest.raises(TypeError, match="hidden_states must be a floating-point tensor"):
        layer(torch.ones(1, 20, 16, dtype=torch.long))
    for cu in ([0, 5, 5, 20], [0, 12, 8, 20], [0, 5, 19]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            layer(x, cu_seqlens=torch.tensor(cu))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32/int64 tensor"):
        layer(x, cu_seqlens=torch.tensor([0.0, 5.0, 20.0]))
    layer(x, cu_seqlens=torch.tensor([0, 5, 20]))  # a valid packing runs
