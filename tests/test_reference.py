"""The dense reference (spec §2) against an independent re-derivation, degenerate routings, causality, packing,
finite differences of the relaxed gates, and input validation."""

import pytest
import torch
import torch.nn.functional as F
from helpers import gen, linear_gate_inputs, random_cu_seqlens
from hypothesis import example, given
from hypothesis import strategies as st
from rederivation import rederive

from natsl.kernels.index import num_blocks
from natsl.layers.routing import Routing, routing_gates
from natsl.reference import (
    linear_branch_reference,
    natsl_attention_reference,
    softmax_branch_reference,
)

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]


def make_inputs(seed, backend, B, T, HR, ra, rl, dk=4, dv=6, n_seq=None, p_soft=0.4, C=4, init=False,
                dtype=torch.float64):
    """Random op inputs. `ra`, `rl`: softmax / linear heads per router head. Returns (args, kwargs)."""
    gn = gen(seed)
    HA, HL = HR * ra, HR * rl

    def r(*s):
        return torch.randn(*s, generator=gn, dtype=dtype)

    q_s, k_s, v_s = r(B, T, HA, dk), r(B, T, HA, dk), r(B, T, HA, dv)
    q_l = r(B, T, HL, dk)
    k_l = F.normalize(r(B, T, HL, dk), dim=-1)
    v_l = r(B, T, HL, dv)
    kw = dict(linear_backend=backend, block_size=C, **linear_gate_inputs(gn, backend, B, T, HL, dk, dtype))
    cu = None
    if n_seq is not None:
        cu = kw["cu_seqlens"] = random_cu_seqlens(gn, T, n_seq)
    N = num_blocks(T, C, cu)
    soft = torch.rand(B, N, HR, generator=gn) < p_soft
    kw["routing"] = torch.stack([soft, ~soft], -1).to(dtype)
    if init:
        kw["initial_state"] = r(B if cu is None else len(cu) - 1, HL, dk, dv) * 0.5
    return [q_s, k_s, v_s, q_l, k_l, v_l], kw


def call_ref(args, kw, **extra):
    kw = dict(kw)
    routing = kw.pop("routing")
    return natsl_attention_reference(*args, routing, **kw, **extra)


def grads_of(outs, leaves, seed):
    gn = gen(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=gn, dtype=o.dtype)).sum() for o in outs if o is not None)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


case = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), B=st.integers(1, 2), T=st.integers(1, 14),
    HR=st.integers(1, 2), ra=st.integers(1, 2), rl=st.integers(1, 2), packed=st.booleans(),
    diagonal=st.sampled_from(["both", "linear"]), decay_through=st.booleans(),
    router_grad=st.sampled_from(["selected", "both"]), init=st.booleans()))


@given(c=case)
@example(c=dict(seed=1, backend="gdn", B=2, T=13, HR=2, ra=2, rl=1, packed=False, diagonal="both",
                decay_through=True, router_grad="selected", init=True))
@example(c=dict(seed=2, backend="gla", B=1, T=14, HR=1, ra=1, rl=2, packed=True, diagonal="both",
                decay_through=False, router_grad="both", init=True))
def test_reference_matches_rederivation(c):
    B = 1 if c["packed"] else c["B"]
    n_seq = min(3, c["T"]) if c["packed"] and c["T"] > 1 else None
    args, kw = make_inputs(c["seed"], c["backend"], B, c["T"], c["HR"], c["ra"], c["rl"], n_seq=n_seq,
                           init=c["init"])
    leaves = [*args, kw["routing"]] + [kw[n] for n in ("g", "beta", "initial_state") if n in kw]
    for x in leaves:
        x.requires_grad_(True)
    out = call_ref(args, kw, diagonal=c["diagonal"], decay_through_softmax=c["decay_through"],
                   router_grad=c["router_grad"], output_final_state=True)
    gate_s, gate_l = routing_gates(kw["routing"], c["router_grad"])
    cu = kw.get("cu_seqlens")
    exp = rederive(*args, gate_s, gate_l, backend=c["backend"], g=kw.get("g"), beta=kw.get("beta"), C=4,
                   diagonal=c["diagonal"], decay_through=c["decay_through"], init=kw.get("initial_state"),
                   cu=None if cu is None else cu.tolist())
    for name, a, b in zip(["o_s", "o_l", "final_state"], out, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    ga, gb = grads_of(out, leaves, c["seed"]), grads_of(exp, leaves, c["seed"])
    for i, (a, b) in enumerate(zip(ga, gb)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of input {i}")


@pytest.mark.parametrize("T", [1, 5, 12, 13])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_softmax_is_causal_softmax_attention(backend, T):
    args, kw = make_inputs(0, backend, 2, T, 2, 2, 1)
    kw["routing"] = torch.zeros_like(kw["routing"])
    kw["routing"][..., 0] = 1
    o_s, _, _ = call_ref(args, kw)
    q, k, v = (x.transpose(1, 2) for x in args[:3])
    exp = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o_s, exp)


def plain_recurrence(backend, q, k, v, g, beta, init=None):
    """The backend's recurrence with no routing at all (spec §1.4 table), token by token."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype) if init is None else init
    outs = []
    for t in range(T):
        if backend in ("gdn", "mamba2"):
            S = S * g[:, t].exp()[..., None, None]
        if backend == "gla":
            S = S * g[:, t].exp()[..., None]
        kt, vt = k[:, t], v[:, t]
        if backend in ("gdn", "deltanet"):
            vt = beta[:, t, :, None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., None] * vt[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * K ** -0.5)
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("decay_through", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_linear_is_plain_recurrence(backend, decay_through):
    args, kw = make_inputs(1, backend, 2, 11, 2, 1, 2, init=True)
    kw["routing"] = torch.zeros_like(kw["routing"])
    kw["routing"][..., 1] = 1
    _, o_l, final = call_ref(args, kw, output_final_state=True, decay_through_softmax=decay_through)
    exp_o, exp_s = plain_recurrence(backend, *args[3:], kw.get("g"), kw.get("beta"), kw["initial_state"])
    torch.testing.assert_close(o_l, exp_o)
    torch.testing.assert_close(final, exp_s)


def test_all_linear_diagonal_linear_softmax_output_is_zero_before_any_softmax_block():
    args, kw = make_inputs(3, "gdn", 1, 9, 1, 1, 1)
    kw["routing"] = torch.zeros_like(kw["routing"])
    kw["routing"][..., 1] = 1
    o_s, _, _ = call_ref(args, kw, diagonal="linear")
    assert torch.equal(o_s, torch.zeros_like(o_s))


@given(seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS), t=st.integers(0, 12),
       diagonal=st.sampled_from(["both", "linear"]))
def test_causality(seed, backend, t, diagonal):
    """Changing inputs after t (later tokens of t's own block included) and the routing of blocks ≥ blk(t)."""
    T, C = 13, 4
    args, kw = make_inputs(seed, backend, 1, T, 2, 1, 1, C=C)
    out = call_ref(args, kw, diagonal=diagonal)
    gn = gen(seed + 7)
    args2 = [x.clone() for x in args]
    for x in args2:
        x[:, t + 1:] += torch.randn(x[:, t + 1:].shape, generator=gn, dtype=x.dtype)
    kw2 = dict(kw)
    for n in ("g", "beta"):
        if n in kw:
            kw2[n] = kw[n].clone()
            kw2[n][:, t + 1:] = kw2[n][:, t + 1:] * 0.5
    kw2["routing"] = kw["routing"].clone()
    kw2["routing"][:, t // C:] = kw["routing"][:, t // C:].flip(-1)
    out2 = call_ref(args2, kw2, diagonal=diagonal)
    for a, b in zip(out[:2], out2[:2]):
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_per_sequence(backend):
    args, kw = make_inputs(4, backend, 1, 23, 2, 2, 1, n_seq=3, init=True)
    cu = kw["cu_seqlens"].tolist()
    out = call_ref(args, kw, output_final_state=True)
    lay = Routing(kw["routing"], 4, "both", kw["cu_seqlens"]).layout(23)
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        blocks = lay.block_seq == n
        sub_kw = {k: v[:, s:e] for k, v in kw.items() if k in ("g", "beta")}
        sub_kw.update(linear_backend=backend, block_size=4, routing=kw["routing"][:, blocks],
                      initial_state=kw["initial_state"][n:n + 1])
        o_s, o_l, fin = call_ref([x[:, s:e] for x in args], sub_kw, output_final_state=True)
        torch.testing.assert_close(out[0][:, s:e], o_s)
        torch.testing.assert_close(out[1][:, s:e], o_l)
        torch.testing.assert_close(out[2][n:n + 1], fin)


@pytest.mark.parametrize("router_grad", ["selected", "both"])
@pytest.mark.parametrize("backend,decay_through", [("gdn", True), ("gdn", False), ("gla", True), ("linear_attn", True),
                                                    ("mamba2", False), ("deltanet", True)])
def test_routing_grad_is_finite_difference_of_relaxed_gates(backend, decay_through, router_grad):
    args, kw = make_inputs(5, backend, 1, 14, 2, 2, 1, p_soft=0.5, init=True)
    routing = kw["routing"].clone().requires_grad_(True)
    kw["routing"] = routing
    out = call_ref(args, kw, router_grad=router_grad, decay_through_softmax=decay_through, output_final_state=True)
    gn = gen(9)
    weights = [torch.randn(o.shape, generator=gn, dtype=o.dtype) for o in out]
    (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), routing)

    route = Routing(routing.detach(), 4)
    is_soft = route.is_softmax()

    def f(m_A, m_L):
        o_s = softmax_branch_reference(*args[:3], route, m_A, 4 ** -0.5)
        o_l, fin = linear_branch_reference(*args[3:], kw.get("g"), kw.get("beta"), route, m_L, backend=backend,
                                           scale=4 ** -0.5, decay_through_softmax=decay_through,
                                           initial_state=kw["initial_state"])
        return sum((o * w).sum() for o, w in zip((o_s, o_l, fin), weights))

    m_A, m_L = routing[..., 0].detach().clone(), routing[..., 1].detach().clone()
    eps = 1e-6
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in m_A.shape)).tolist():
        idx = tuple(idx)
        for gate, which in ((m_A, 0), (m_L, 1)):
            selected = bool(is_soft[idx]) == (which == 0)
            if router_grad == "selected" and not selected:
                assert grad[(*idx, which)] == 0
                continue
            hi, lo = gate.clone(), gate.clone()
            hi[idx] += eps
            lo[idx] -= eps
            args_hi = (hi, m_L) if which == 0 else (m_A, hi)
            args_lo = (lo, m_L) if which == 0 else (m_A, lo)
            fd = (f(*args_hi) - f(*args_lo)) / (2 * eps)
            torch.testing.assert_close(grad[(*idx, which)], fd, rtol=1e-5, atol=1e-7)
    # the last block's type has no effect on the outputs; with a final state only its linear gate matters
    assert (grad[:, -1, :, 0] == 0).all()


def test_softmax_gate_gradient_formula():
    """Spec §1.7: dL/dm_A(j) = Σ_a Σ_{t: blk(t)>j} Σ_{s∈j} P_ts (dO_t·v_s − dO_t·O_t), at m=1 and at m=0."""
    args, kw = make_inputs(6, "linear_attn", 1, 12, 1, 2, 1, p_soft=0.5)
    q, k, v = args[:3]
    routing = kw["routing"].clone().requires_grad_(True)
    kw["routing"] = routing
    o_s, _, _ = call_ref(args, kw, router_grad="both")
    dO = torch.randn(o_s.shape, generator=gen(3), dtype=o_s.dtype)
    (grad,) = torch.autograd.grad((o_s * dO).sum(), routing)
    route = Routing(routing.detach(), 4)
    mask = route.dense_mask(12)[0]  # [Hr, T, T], Hr = 1
    scores = torch.einsum("thd,shd->hts", q[0], k[0]) * 4 ** -0.5
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1, keepdim=True)
    P = (scores - lse).exp()  # P_ts over all causal keys, normalised by the keys actually seen
    D = (dO[0] * o_s[0]).sum(-1).T  # [H, T]
    dP = torch.einsum("thd,shd->hts", dO[0], v[0])
    blk = torch.arange(12) // 4
    for j in range(3):
        sel = (blk[None, :] == j) & (blk[:, None] > j)
        exp = (P * (dP - D[..., None]) * sel).sum()
        torch.testing.assert_close(grad[0, j, 0, 0], exp)


@pytest.mark.parametrize("router_grad", ["both", "selected"])
@pytest.mark.parametrize("decay_through", [True, False])
def test_linear_gate_gradient_formula(decay_through, router_grad):
    """Spec §1.7 (revised): dL/dm_L(j) = <dL/dS^{(j+1)}, W_j>, W_j = R_j(S^{(j)}) − Δ_j(S^{(j)}), at m=1 for linear
    blocks and m=0 for softmax blocks (gdn; S^{(j)} and the loss's gradient w.r.t. S^{(j+1)} from runs of the
    reference on the tokens before / after the block, R_j by the plain recurrence, Δ_j = exp(Σ_{t∈j} g_t) S^{(j)})."""
    T, C = 14, 4  # blocks: linear, softmax, linear, softmax (partial)
    args, kw = make_inputs(7, "gdn", 1, T, 1, 1, 2, C=C, init=True)
    kw["routing"] = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]]], dtype=torch.float64)
    routing = kw["routing"].clone().requires_grad_(True)
    q, k, v = args[3:]
    g, beta = kw["g"], kw["beta"]
    gn = gen(12)
    w_o = torch.randn(1, T, 2, 6, generator=gn, dtype=torch.float64)
    w_f = torch.randn(1, 2, 4, 6, generator=gn, dtype=torch.float64)

    def run(lo, hi, init, r=None):
        """The reference on tokens [lo, hi) (block-aligned at lo) from `init`: (o_l, final state)."""
        sub = dict(kw, g=g[:, lo:hi], beta=beta[:, lo:hi], initial_state=init,
                   routing=(kw["routing"] if r is None else r)[:, lo // C:-(-hi // C)])
        _, o_l, fin = call_ref([x[:, lo:hi] for x in args], sub, output_final_state=True,
                               decay_through_softmax=decay_through, router_grad=router_grad)
        return o_l, fin

    o_l, fin = run(0, T, kw["initial_state"], routing)
    (grad,) = torch.autograd.grad((o_l * w_o).sum() + (fin * w_f).sum(), routing)
    for j in range(4):
        lo, hi = j * C, min(j * C + C, T)
        S_j = kw["initial_state"] if j == 0 else run(0, lo, kw["initial_state"])[1]  # carried into block j
        R = plain_recurrence("gdn", q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi], S_j)[1]
        W = R - g[:, lo:hi].sum(1).exp()[..., None, None] * S_j
        S_next = run(0, hi, kw["initial_state"])[1].detach().requires_grad_(True)
        if hi < T:
            o_rest, fin_rest = run(hi, T, S_next)
            loss = (o_rest * w_o[:, hi:]).sum() + (fin_rest * w_f).sum()
        else:
            loss = (S_next * w_f).sum()
        (dS,) = torch.autograd.grad(loss, S_next)
        exp = (dS * W).sum()
        assert exp.abs() > 1e-3  # not trivially zero here
        if j % 2 == 1 and router_grad == "selected":  # a softmax block: only its softmax gate passes gradient
            exp = torch.zeros_like(exp)
        torch.testing.assert_close(grad[0, j, 0, 1], exp, rtol=1e-10, atol=1e-12, msg=f"block {j}")


def test_routing_rejects_the_removed_softmax_diagonal():
    w = torch.tensor([[[[1.0, 0.0]]]])
    with pytest.raises(ValueError, match=r"diagonal must be one of \('both', 'linear'\), got 'softmax'"):
        Routing(w, 4, "softmax")
    assert Routing(w, 4, "linear").diagonal == "linear"


def test_reference_rejects_bad_input():
    args, kw = make_inputs(0, "gdn", 1, 8, 2, 1, 1)

    def expect(err, match, a=args, **over):
        k = {**kw, **over}
        with pytest.raises(err, match=match):
            call_ref(a, k)

    expect(ValueError, "linear_backend", linear_backend="mamba3")
    expect(ValueError, "needs beta", beta=None)
    expect(ValueError, "needs g", g=None)
    expect(ValueError, "takes no g", linear_backend="deltanet")
    expect(ValueError, "takes no beta", linear_backend="mamba2")
    expect(ValueError, "g must have shape", g=kw["g"][..., None])
    expect(ValueError, "one-hot", routing=kw["routing"] * 0.5)
    expect(ValueError, "blocks", routing=kw["routing"][:, :1])
    expect(ValueError, "multiples of the router", routing=torch.ones(1, 2, 3, 2) * torch.tensor([1.0, 0.0]))
    expect(ValueError, "k_s", a=[args[0], args[1][:, :, :1], *args[2:]])
    expect(ValueError, "v_l", a=[*args[:5], args[5][:, :4]])
    expect(TypeError, "q_s", a=[args[0].long(), *args[1:]])
    expect(ValueError, "increasing", cu_seqlens=torch.tensor([0, 5, 3, 8]))
    expect(ValueError, "start at 0", cu_seqlens=torch.tensor([1, 8]))
    expect(TypeError, "cu_seqlens", cu_seqlens=torch.tensor([0.0, 8.0]))
    expect(ValueError, "router_grad", router_grad="all")
    expect(ValueError, "diagonal", diagonal="none")
    expect(ValueError, "diagonal", diagonal="softmax")
    expect(ValueError, "initial_state", initial_state=torch.zeros(2, 2, 4, 6))
