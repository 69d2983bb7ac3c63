"""The linear branch (`natsl.layers.linear.branch.linear_branch`, spec §1.4, §1.5, §1.7, §3.2) against the dense
float64 reference: outputs, final state and the gradients of every input (q, k, v, g, beta, initial state and the
routing), for all five backends and every composition path (delta rule, additive, probes), and over fla's ops
under the Triton interpreter."""

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, gen, linear_gate_inputs, random_cu_seqlens
from hypothesis import example, given
from hypothesis import strategies as st

from natsl.kernels.index import num_blocks
from natsl.layers.linear import TORCH_LINEAR_OPS
from natsl.layers.linear.branch import LINEAR_IMPLS, linear_branch, resolve_linear_op
from natsl.layers.routing import Routing, routing_gates
from natsl.reference import linear_branch_reference

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]


def make_case(seed, backend, B, T, Hr, G, K, V, C, p_soft, packed=False, init=True, dtype=torch.float64,
              routing=None):
    """Random inputs. `routing`: None (random with `p_soft`), "softmax" or "linear" (all blocks of that type)."""
    gn = gen(seed)
    H = Hr * G

    def r(*s):
        return torch.randn(*s, generator=gn, dtype=dtype)

    x = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V))
    x.update(linear_gate_inputs(gn, backend, B, T, H, K, dtype))
    cu = random_cu_seqlens(gn, T, min(T, 3)) if packed else None
    if init:
        x["initial_state"] = 0.5 * r(B if cu is None else cu.numel() - 1, H, K, V)
    N = num_blocks(T, C, cu)
    soft = torch.rand(B, N, Hr, generator=gn) < p_soft
    if routing is not None:
        soft = torch.full_like(soft, routing == "softmax")
    w = torch.stack([soft, ~soft], -1).to(dtype)
    return x, w, cu


def run_both(backend, x, w, cu, C, *, impl="torch", diagonal="both", dts=True, router_grad="selected",
             routing_grad=True, scale=0.7, ref_dtype=torch.float64):
    """Outputs and gradients of natsl and of the reference for one case: two dicts name → tensor."""
    cot_gen = gen(12345)
    results = []
    for which in ("natsl", "ref"):
        dtype = None if which == "natsl" else ref_dtype
        leaves = {n: t.detach().to(dtype or t.dtype).requires_grad_() for n, t in x.items()}
        rw = w.detach().to(dtype or w.dtype).requires_grad_(routing_grad)
        route = Routing(rw, C, diagonal, cu)
        if which == "natsl":
            o, s = linear_branch(leaves["q"], leaves["k"], leaves["v"], route, backend=backend, g=leaves.get("g"),
                                 beta=leaves.get("beta"), impl=impl, scale=scale, decay_through_softmax=dts,
                                 router_grad=router_grad, initial_state=leaves.get("initial_state"),
                                 output_final_state=True)
        else:
            _, gate = routing_gates(rw, router_grad)
            o, s = linear_branch_reference(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("beta"),
                                           route, gate, backend=backend, scale=scale, decay_through_softmax=dts,
                                           initial_state=leaves.get("initial_state"))
        results.append((o, s, leaves, rw))
    (o, s, leaves, rw), (o_ref, s_ref, leaves_ref, rw_ref) = results
    cot_o = torch.randn(o_ref.shape, generator=cot_gen, dtype=torch.float64)
    cot_s = torch.randn(s_ref.shape, generator=cot_gen, dtype=torch.float64)
    out = {"o": o, "final_state": s}
    ref = {"o": o_ref, "final_state": s_ref}
    for res, (oo, ss, lv, rr) in ((out, results[0]), (ref, results[1])):
        names = list(lv) + (["routing"] if routing_grad else [])
        tensors = list(lv.values()) + ([rr] if routing_grad else [])
        loss = (oo.double() * cot_o).sum() + (ss.double() * cot_s).sum()
        for n, gr in zip(names, torch.autograd.grad(loss, tensors)):
            res[f"d{n}"] = gr
    return out, ref


def check(out, ref, ratio, atol):
    for n in ref:
        assert_close(n, ref[n], out[n], ratio, atol=atol)


case = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), B=st.integers(1, 2), T=st.integers(1, 100),
    HrG=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]), K=st.sampled_from([4, 16]), V=st.sampled_from([3, 16]),
    C=st.sampled_from([8, 16]), p_soft=st.sampled_from([0.0, 0.3, 0.6, 1.0]), packed=st.booleans(),
    init=st.booleans(), diagonal=st.sampled_from(["both", "softmax", "linear"]), dts=st.booleans(),
    router_grad=st.sampled_from(["selected", "both"]), routing_grad=st.booleans()))


@given(c=case)
@example(c=dict(seed=1, backend="gdn", B=2, T=77, HrG=(2, 2), K=16, V=16, C=16, p_soft=0.3, packed=False, init=True,
                diagonal="both", dts=True, router_grad="selected", routing_grad=True))  # partial last block
@example(c=dict(seed=2, backend="gla", B=1, T=90, HrG=(2, 1), K=4, V=3, C=8, p_soft=0.6, packed=True, init=True,
                diagonal="both", dts=False, router_grad="both", routing_grad=True))
@example(c=dict(seed=3, backend="deltanet", B=1, T=64, HrG=(1, 2), K=16, V=3, C=8, p_soft=1.0, packed=False,
                init=False, diagonal="both", dts=True, router_grad="both", routing_grad=True))  # all softmax
@example(c=dict(seed=4, backend="mamba2", B=2, T=33, HrG=(2, 1), K=4, V=16, C=16, p_soft=0.0, packed=False,
                init=True, diagonal="softmax", dts=True, router_grad="selected", routing_grad=False))  # all linear
@example(c=dict(seed=5, backend="linear_attn", B=1, T=50, HrG=(2, 2), K=16, V=3, C=8, p_soft=0.6, packed=True,
                init=True, diagonal="linear", dts=True, router_grad="both", routing_grad=False))
def test_torch_impl_matches_reference(c):
    Hr, G = c["HrG"]
    B = 1 if c["packed"] else c["B"]
    packed = c["packed"] and c["T"] >= 2
    x, w, cu = make_case(c["seed"], c["backend"], B, c["T"], Hr, G, c["K"], c["V"], c["C"], c["p_soft"],
                         packed=packed, init=c["init"])
    out, ref = run_both(c["backend"], x, w, cu, c["C"], diagonal=c["diagonal"], dts=c["dts"],
                        router_grad=c["router_grad"], routing_grad=c["routing_grad"])
    check(out, ref, ratio=1e-9, atol=1e-11)


# every composition path (delta / additive / probes) with and without routing gradients, per backend
PATHS = [
    pytest.param(backend, dts, diagonal, routing_grad,
                 id=f"{backend}-{'decay' if dts else 'nodecay'}-{diagonal}-{'routegrad' if routing_grad else 'frozen'}")
    for backend in BACKENDS for dts in (True, False) for diagonal in ("both", "softmax")
    for routing_grad in (True, False)
]


@pytest.mark.parametrize("backend,dts,diagonal,routing_grad", PATHS)
def test_paths(backend, dts, diagonal, routing_grad):
    x, w, cu = make_case(7, backend, 2, 45, 2, 2, 8, 5, 8, 0.4, init=True)
    out, ref = run_both(backend, x, w, cu, 8, diagonal=diagonal, dts=dts, router_grad="both",
                        routing_grad=routing_grad)
    check(out, ref, ratio=1e-9, atol=1e-11)


@pytest.mark.parametrize("C", [24, 64], ids=["C24", "C64"])
@pytest.mark.parametrize("backend", ["gdn", "deltanet"])
def test_delta_block_sizes(backend, C):
    """Blocks longer than 16 (block-recursive triangular inverse) and not a power of two (padded), packed too."""
    for packed in (False, True):
        x, w, cu = make_case(17, backend, 1 if packed else 2, 150, 2, 1, 4, 3, C, 0.5, packed=packed, init=True)
        out, ref = run_both(backend, x, w, cu, C, router_grad="both")
        check(out, ref, ratio=1e-9, atol=1e-11)


def test_unit_lower_inverse():
    from natsl.layers.linear.branch import _unit_lower_inverse

    for n in (1, 5, 16, 37, 64):
        L = (0.5 * torch.randn(3, 2, n, n, generator=gen(n), dtype=torch.float64)).tril(-1)
        eye = torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(_unit_lower_inverse(L), torch.linalg.inv(eye + L), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_per_sequence_loop(backend):
    """Blocks restart per packed sequence: packed call == one call per sequence (and == the reference)."""
    lens, C, H = [13, 1, 30, 20], 8, 2
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x, w, _ = make_case(11, backend, 1, T, 1, H, 4, 3, C, 0.5, init=False)
    N = num_blocks(T, C, cu)
    soft = torch.rand(1, N, 1, generator=gen(3)) < 0.5
    w = torch.stack([soft, ~soft], -1).double()
    o, s = linear_branch(x["q"], x["k"], x["v"], Routing(w, C, "both", cu), backend=backend, g=x.get("g"),
                         beta=x.get("beta"), impl="torch", output_final_state=True)
    blk = 0
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        nb = -(-(b - a) // C)
        sl = {k_: (t[:, a:b] if t is not None else None) for k_, t in x.items()}
        o_n, s_n = linear_branch(sl["q"], sl["k"], sl["v"], Routing(w[:, blk:blk + nb], C), backend=backend,
                                 g=sl.get("g"), beta=sl.get("beta"), impl="torch", output_final_state=True)
        assert_close(f"o[seq {n}]", o_n, o[:, a:b], 1e-12, atol=1e-12)
        assert_close(f"final_state[seq {n}]", s_n[0], s[n], 1e-12, atol=1e-12)
        blk += nb


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_linear_is_the_plain_recurrence(backend):
    """With every block linear (and no initial state) the branch is one plain call of the recurrence."""
    x, w, _ = make_case(5, backend, 2, 37, 2, 1, 4, 3, 8, 0.0, init=False, routing="linear")
    o, s = linear_branch(x["q"], x["k"], x["v"], Routing(w, 8), backend=backend, g=x.get("g"), beta=x.get("beta"),
                         impl="torch", output_final_state=True)
    o_p, s_p = TORCH_LINEAR_OPS[backend](x["q"], x["k"], x["v"], x.get("g"), x.get("beta"), output_final_state=True)
    assert_close("o", o_p, o, 1e-12, atol=1e-12)
    assert_close("final_state", s_p, s, 1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal(backend):
    """Perturbing tokens after t leaves outputs up to t unchanged (routing of later blocks included)."""
    x, w, _ = make_case(9, backend, 1, 40, 1, 2, 4, 3, 8, 0.5, init=True)
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


@pytest.mark.parametrize("backend", ["gdn", "gla"])
def test_float32_dtypes_and_no_grad(backend):
    """float32 in → float32 out, float32 state; under no_grad (no routing gradient path) still exact."""
    x, w, _ = make_case(13, backend, 1, 30, 2, 1, 8, 4, 8, 0.5, init=True, dtype=torch.float32)
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


def test_validation():
    x, w, _ = make_case(0, "gdn", 1, 16, 1, 1, 4, 3, 8, 0.5, init=False)
    route = Routing(w, 8)
    with pytest.raises(ValueError, match="linear_impl must be one of .*'auto', 'fla', 'torch'"):
        linear_branch(x["q"], x["k"], x["v"], route, backend="gdn", g=x["g"], beta=x["beta"], impl="cuda")
    with pytest.raises(ValueError, match="linear_backend"):
        linear_branch(x["q"], x["k"], x["v"], route, backend="retnet", impl="torch")
    with pytest.raises(ValueError, match="router_grad"):
        linear_branch(x["q"], x["k"], x["v"], route, backend="gdn", g=x["g"], beta=x["beta"], impl="torch",
                      router_grad="none")
    with pytest.raises(ValueError, match="does not fit"):
        linear_branch(x["q"], x["k"], x["v"], Routing(torch.cat([w, w]), 8), backend="gdn", g=x["g"],
                      beta=x["beta"], impl="torch")
    assert LINEAR_IMPLS == ("auto", "fla", "torch")
    assert resolve_linear_op("gdn", "auto", torch.device("cpu")) is TORCH_LINEAR_OPS["gdn"]


def test_fla_missing_raises_import_error_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setitem(sys.modules, "fla.ops", None)
    x, w, _ = make_case(0, "gdn", 1, 16, 1, 1, 4, 3, 8, 0.5, init=False)
    with pytest.raises(ImportError, match="pip install .*flash-linear-attention"):
        linear_branch(x["q"], x["k"], x["v"], Routing(w, 8), backend="gdn", g=x["g"], beta=x["beta"], impl="fla")


# fla's Triton ops under the interpreter (tests/conftest.py): float32, one or two cases per backend; a few
# seconds each. C=16 blocks are shorter than fla's 64-token chunk: the block batches run as 16-token sequences.
FLA_CASES = [
    pytest.param("gdn", dict(B=2, T=45, C=16, dts=True, packed=False), id="gdn"),
    pytest.param("gdn", dict(B=1, T=50, C=16, dts=False, packed=True), id="gdn-probes-packed"),
    pytest.param("deltanet", dict(B=1, T=40, C=16, dts=True, packed=True), id="deltanet-packed"),
    pytest.param("gla", dict(B=1, T=40, C=16, dts=True, packed=False), id="gla"),
    pytest.param("mamba2", dict(B=2, T=40, C=16, dts=True, packed=False), id="mamba2"),
    pytest.param("mamba2", dict(B=1, T=40, C=16, dts=False, packed=False), id="mamba2-probes"),
    pytest.param("linear_attn", dict(B=1, T=70, C=64, dts=True, packed=False), id="linear_attn-C64"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend,cfg", FLA_CASES)
def test_fla_impl_interpreted_matches_reference(backend, cfg):
    pytest.importorskip("fla")
    x, w, cu = make_case(21, backend, cfg["B"], cfg["T"], 2, 1, 16, 16, cfg["C"], 0.5, packed=cfg["packed"],
                         init=True, dtype=torch.float32)
    out, ref = run_both(backend, x, w, cu, cfg["C"], impl="fla", dts=cfg["dts"], scale=16 ** -0.5)
    check(out, ref, ratio=2e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_compiled_block_maths(packed, monkeypatch):
    """`NATSL_COMPILE=on`: the delta rule's block maths (`_delta_blocks`, the router-gradient correction) traced as
    one graph each (`fullgraph=True`) and run through AOTAutograd (`aot_eager`: Inductor's codegen is covered by the
    GPU test) give the reference's outputs and gradients, router gradient included."""
    import natsl.layers.linear.branch as br

    monkeypatch.setenv("NATSL_COMPILE", "on")
    monkeypatch.setattr(br, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    x, w, cu = make_case(17, "gdn", 1 if packed else 2, 150, 2, 1, 4, 3, 64, 0.5, packed=packed, init=True)
    out, ref = run_both("gdn", x, w, cu, 64, router_grad="both")
    check(out, ref, ratio=1e-9, atol=1e-11)
    used = {k[0].__name__ for k in br._COMPILED if k[1] == "aot_eager"}
    assert {"_delta_blocks", "_dense_gate_grad" if not packed else "_gate_grad_blocks"} <= used


def test_bucket_blocks_pads_at_most_a_quarter_or_seven_blocks():
    from natsl.layers.linear.branch import bucket_blocks

    sizes = [bucket_blocks(n) for n in range(1, 5000)]
    assert all(n <= b <= max(n + 7, n * 1.25) and b % 8 == 0 for n, b in zip(range(1, 5000), sizes))
    for lo in (32, 64, 1024, 2048):  # the sizes used for (lo, 2·lo]
        assert len({b for n, b in zip(range(1, 5000), sizes) if lo < n <= 2 * lo}) == 4


def test_cudagraphs_mode_pads_the_block_batch(monkeypatch):
    """`NATSL_COMPILE=cudagraphs`: the softmax-block batch is padded to `bucket_blocks` rows of −1 (zero blocks)
    before the WY solve, with and without autograd (on CPU the padded solve runs eager; the CUDA graphs themselves
    are tested in tests/gpu), and outputs and gradients, router gradient included, equal the reference."""
    import natsl.layers.linear.branch as br

    seen = []
    real = br._delta_blocks

    def spy(qb, *rest):
        seen.append(qb.shape[0])
        return real(qb, *rest)

    monkeypatch.setattr(br, "_delta_blocks", spy)
    monkeypatch.setenv("NATSL_COMPILE", "cudagraphs")
    x, w, cu = make_case(23, "gdn", 2, 330, 2, 1, 4, 3, 16, 0.5, init=True)
    n_soft = int(w[..., 0].sum())
    assert br.bucket_blocks(n_soft) > n_soft
    out, ref = run_both("gdn", x, w, cu, 16, router_grad="both")
    check(out, ref, ratio=1e-9, atol=1e-11)
    assert seen and set(seen) == {br.bucket_blocks(n_soft)}
    route = Routing(w, 16)
    gx = {n: x.get(n) for n in ("g", "beta", "initial_state")}
    with torch.no_grad():
        o_pad = linear_branch(x["q"], x["k"], x["v"], route, backend="gdn", impl="torch", scale=0.7, **gx)[0]
    assert seen[-1] == br.bucket_blocks(n_soft)
    monkeypatch.setenv("NATSL_COMPILE", "off")
    with torch.no_grad():
        o_eager = linear_branch(x["q"], x["k"], x["v"], route, backend="gdn", impl="torch", scale=0.7, **gx)[0]
    assert seen[-1] == n_soft
    torch.testing.assert_close(o_pad, ref["o"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(o_pad, o_eager, rtol=1e-12, atol=1e-12)


class _ReplayedBody:
    """Stand-in for a captured CUDA graph on CPU: capture runs `body` once (its outputs are the static outputs);
    `replay` reruns it and overwrites those outputs in place, as a graph replay does."""

    def __init__(self, body):
        self.body, self.out = body, body()
        self.replays = 0

    def replay(self):
        self.replays += 1
        for o, new in zip(self.out, self.body()):
            if o is not None:
                o.copy_(new)


def test_block_graphs_copy_in_clone_out_and_recompute_the_backward(monkeypatch):
    """`_BlockGraphs` / `_GraphedBlockMath` (the `NATSL_COMPILE=cudagraphs` path) with the capture replaced by
    `_ReplayedBody`: two forwards of one signature before one backward (two layers), a third signature, and a
    no-grad call give the outputs and gradients of plain autograd on the eager maths. Outputs that were not cloned
    out of the static buffers, or a backward that used the last forward's inputs, would fail."""
    import natsl.layers.linear.branch as br

    captured = []

    def capture(body):
        captured.append(_ReplayedBody(body))
        return captured[-1], captured[-1].out

    monkeypatch.setattr(br._BlockGraphs, "_capture", staticmethod(capture))
    monkeypatch.setattr(br, "_BLOCK_GRAPHS", __import__("collections").OrderedDict())
    fn = br._delta_blocks.__wrapped__
    g = gen(3)

    def inputs(nb):
        x = [torch.randn(nb, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(2)]
        x.append(torch.randn(nb, 16, 2, 5, generator=g, dtype=torch.float64))
        x.append(torch.rand(nb, 16, 2, generator=g, dtype=torch.float64))
        x.append(-torch.rand(nb, 16, 2, generator=g, dtype=torch.float64))
        return [t.requires_grad_() for t in x]

    calls = [inputs(3), inputs(3), inputs(5)]
    outs = [br._replay(fn, (*x, 0.5)) for x in calls]
    cots = [[torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out] for out in outs]
    loss = sum((o * c).sum() for out, cot in zip(outs, cots) for o, c in zip(out, cot))
    leaves = [t for x in calls for t in x]
    got = torch.autograd.grad(loss, leaves)
    ref_outs = [fn(*x, 0.5) for x in calls]
    ref_loss = sum((o * c).sum() for out, cot in zip(ref_outs, cots) for o, c in zip(out, cot))
    want = torch.autograd.grad(ref_loss, leaves)
    for out, ref in zip(outs, ref_outs):
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(br._BLOCK_GRAPHS) == 2 and len(captured) == 4  # forward + backward graph per signature
    with torch.no_grad():
        again = br._replay(fn, (*calls[0], 0.5))
    torch.testing.assert_close(again[1], ref_outs[0][1], rtol=1e-12, atol=1e-12)
    assert len(captured) == 4 and captured[0].replays == 3


def test_compile_mode_is_checked(monkeypatch):
    monkeypatch.setenv("NATSL_COMPILE", "yes")
    x, w, cu = make_case(1, "gdn", 1, 20, 1, 1, 4, 3, 8, 0.5)
    with pytest.raises(ValueError, match="NATSL_COMPILE"):
        run_both("gdn", x, w, cu, 8)
