"""NAtSLAttention (spec §1.1, §1.2, §1.6) on the CPU torch paths, against a straightforward re-composition of the
dense reference op."""


import pytest
import torch
import torch.nn.functional as F
from helpers import gen
from hypothesis import given
from hypothesis import strategies as st

from natsl import NAtSLAttention
from natsl.layers.fused import L2_NORM_EPS
from natsl.layers.router import BlockRouter, straight_through
from natsl.reference import natsl_attention_reference

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]
SMALL = dict(hidden_size=32, num_heads=2, head_dim=8, expand_v=2, num_softmax_heads=4, num_router_heads=2,
             block_size=8, softmax_backend="sdpa", linear_impl="torch")


def make_layer(backend="gdn", seed=0, **over):
    torch.manual_seed(seed)
    layer = NAtSLAttention(**{**SMALL, "linear_backend": backend, **over}).double()
    with torch.no_grad():  # larger random weights than the defaults, so every path matters numerically
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen(seed + p.numel()), dtype=p.dtype) * 0.1)
    return layer


def x_of(B, T, seed=1, D=32):
    return torch.randn(B, T, D, generator=gen(seed), dtype=torch.float64)


def recompose(layer, x, cu_seqlens=None):
    """The layer written out by hand from spec §1.1/§1.2/§1.6, with the dense reference as the op."""
    B, T, D = x.shape
    HL, HA, dk, dv = layer.num_heads, layer.num_softmax_heads, layer.head_dim, layer.head_v_dim
    C = layer.block_size
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()

    def conv(conv_mod, h):  # causal depthwise conv per sequence, then SiLU
        w = conv_mod.weight  # [Dc, 1, W]
        W = w.shape[-1]
        outs = [F.conv1d(F.pad(h[:, s:e].transpose(1, 2), (W - 1, 0)), w, groups=w.shape[0]).transpose(1, 2)
                for s, e in zip(bounds[:-1], bounds[1:])]
        return F.silu(torch.cat(outs, 1))

    q, k, v = (conv(c, p(x)) for c, p in ((layer.q_conv1d, layer.q_proj), (layer.k_conv1d, layer.k_proj),
                                          (layer.v_conv1d, layer.v_proj)))
    # router: mean over each block (restarting per sequence), linear, straight-through one-hot
    means = [x[:, b:min(b + C, e)].mean(1) for s, e in zip(bounds[:-1], bounds[1:]) for b in range(s, e, C)]
    logits = (torch.stack(means, 1) @ layer.router.proj.weight.T).view(B, len(means), layer.num_router_heads, 2)
    p = logits.softmax(-1)
    routing = F.one_hot(p.argmax(-1), 2).to(p.dtype) - p.detach() + p

    def rms(h, w, eps=layer.norm_eps):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w

    def l2(h):  # fla's l2norm convention (natsl.layers.fused.L2_NORM_EPS)
        return h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)

    q_l, k_l = l2(q.view(B, T, HL, dk)), l2(k.view(B, T, HL, dk))
    q_s = rms(q.view(B, T, HA, -1), layer.q_norm.weight)
    k_s = rms(k.view(B, T, HA, -1), layer.k_norm.weight)
    v_l = v.view(B, T, HL, dv)
    g = beta = None
    be = layer.linear_backend
    if be in ("gdn", "deltanet"):
        beta = torch.sigmoid(layer.gates.b_proj(x))
    if be in ("gdn", "mamba2"):
        dt = F.softplus(layer.gates.a_proj(x) + layer.gates.dt_bias)
        g = -torch.exp(layer.gates.A_log) * dt
    if be == "gla":
        g = F.logsigmoid(layer.gates.gk_proj(x)).view(B, T, HL, dk) / 16
    v_in = v_l * dt[..., None] if be == "mamba2" else v_l
    o_s, o_l, _ = natsl_attention_reference(q_s, k_s, v.view(B, T, HA, -1), q_l, k_l, v_in, routing,
                                            linear_backend=be, g=g, beta=beta, block_size=C,
                                            decay_through_softmax=layer.decay_through_softmax,
                                            router_grad=layer.router_grad, cu_seqlens=cu_seqlens)
    if be == "mamba2":
        o_l = o_l + layer.gates.D[:, None] * v_l
    w = (q @ layer.w_proj.weight.T).view(B, T, HA, 2).softmax(-1)
    y = w[..., :1] * rms(o_s, layer.o_norm_softmax.weight) + w[..., 1:] * rms(o_l.reshape(B, T, HA, -1),
                                                                               layer.o_norm_linear.weight)
    y = y * F.silu(layer.g_proj(x)).view(B, T, HA, -1)
    return layer.o_proj(y.reshape(B, T, -1))


def param_grads(layer, out, seed=5):
    w = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype)
    names, params = zip(*[(n, p) for n, p in layer.named_parameters()])
    return dict(zip(names, torch.autograd.grad((out * w).sum(), params, allow_unused=True)))


@pytest.mark.parametrize("decay_through", [True, False], ids=["decay", "nodecay"])
@pytest.mark.parametrize("router_grad", ["selected", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_recomposition(backend, router_grad, decay_through):
    layer = make_layer(backend, router_grad=router_grad, decay_through_softmax=decay_through)
    x = x_of(2, 21)
    out, stats, _ = layer(x)
    exp = recompose(layer, x)
    torch.testing.assert_close(out, exp, rtol=1e-9, atol=1e-9)
    got, want = param_grads(layer, out), param_grads(layer, exp)
    for name in got:
        a, b = got[name], want[name]
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)
    assert got["router.proj.weight"].abs().sum() > 0, "the router must receive gradient"
    assert stats.softmax_fraction.shape == (2,)
    _, p = layer.router(x)  # the entropy statistic is the mean over (batch, block) of the router's entropy
    want = -(p * p.log()).sum(-1).mean(dim=(0, 1))
    torch.testing.assert_close(stats.router_entropy, want.float().to(stats.router_entropy.dtype))
    assert bool((stats.router_entropy >= 0).all() and (stats.router_entropy <= torch.log(torch.tensor(2.0))).all())


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_layer_with_flex_softmax_equals_sdpa(packed):
    """The layer with `softmax_backend="flex"` (its compacted layout and gate-gradient taps, as dense attention on
    CPU) gives the `sdpa` layer's output and parameter gradients, the router's included."""
    x = x_of(1 if packed else 2, 37)
    cu = torch.tensor([0, 12, 37]) if packed else None
    outs, grads = [], []
    for sb in ("sdpa", "flex"):
        layer = make_layer("gdn", softmax_backend=sb)
        out = layer(x, cu_seqlens=cu)[0] if packed else layer(x)[0]
        outs.append(out)
        grads.append(param_grads(layer, out))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-8, atol=1e-9, msg=name)
    assert grads[1]["router.proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_per_sequence(backend):
    layer = make_layer(backend)
    cu = torch.tensor([0, 5, 22, 30])
    x = x_of(1, 30, seed=2)
    out, _, _ = layer(x, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[:, s:e], layer(x[:, s:e])[0], rtol=1e-9, atol=1e-10)


@given(seed=st.integers(0, 1000), t=st.integers(0, 22), backend=st.sampled_from(BACKENDS))
def test_causality(seed, t, backend):
    """Perturbing x after t (later tokens of t's own block too) leaves out[:t+1] unchanged, although the router
    pools whole blocks."""
    layer = make_layer(backend, seed=seed % 7)
    x = x_of(1, 23, seed=seed)
    x2 = x.clone()
    x2[:, t + 1:] += torch.randn(x2[:, t + 1:].shape, generator=gen(seed + 1), dtype=x.dtype) * 3
    o1, o2 = layer(x)[0], layer(x2)[0]
    torch.testing.assert_close(o1[:, : t + 1], o2[:, : t + 1], rtol=1e-12, atol=1e-12)


def test_rope_option():
    layer = make_layer("gdn", use_rope=True)
    x = x_of(1, 17)
    out = layer(x)[0]
    assert torch.isfinite(out).all()
    # RoPE makes the softmax branch position-dependent; without it a shift of q/k positions changes nothing
    layer_norope = make_layer("gdn", use_rope=False)
    assert not torch.allclose(out, layer_norope(x)[0])
    # packed RoPE restarts positions per sequence
    cu = torch.tensor([0, 9, 17])
    packed = layer(x, cu_seqlens=cu)[0]
    torch.testing.assert_close(packed[:, 9:], layer(x[:, 9:])[0], rtol=1e-9, atol=1e-10)


def test_router_straight_through():
    logits = torch.randn(3, 5, 2, 2, generator=gen(0), dtype=torch.float64, requires_grad=True)
    w, p = straight_through(logits, 0.7, "argmax", True)
    assert torch.equal(w.detach(), F.one_hot(logits.argmax(-1), 2).double())
    up = torch.randn(w.shape, generator=gen(1), dtype=w.dtype)
    (gw,) = torch.autograd.grad((w * up).sum(), logits)
    (gp,) = torch.autograd.grad((torch.softmax(logits / 0.7, -1) * up).sum(), logits)
    torch.testing.assert_close(gw, gp)


@pytest.mark.parametrize("T,offset", [(64, 0), (61, 0), (50, 5), (3, 13), (1, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_block_sums_and_means(T, offset, dtype):
    """`block_sums` (a padded view summed per block) equals a per-token `index_add_` in float32/float64, with a first
    block that already holds `offset` tokens and a partial last block; `block_mean` of dense and packed layouts
    equals the mean of each block's tokens; gradients flow to `x`."""
    from natsl.kernels.index import block_layout
    from natsl.layers.router import block_mean, block_sums

    C = 16
    x = torch.randn(2, T, 8, generator=gen(T + offset)).to(dtype).requires_grad_()
    acc = torch.promote_types(dtype, torch.float32)
    n = -(-(offset + T) // C)
    ref = torch.zeros(2, n, 8, dtype=acc).index_add_(1, (offset + torch.arange(T)) // C, x.detach().to(acc))
    s = block_sums(x, C, offset)
    assert s.dtype == acc
    torch.testing.assert_close(s, ref, rtol=1e-6 if dtype == torch.bfloat16 else 1e-12, atol=1e-6)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    cu = torch.tensor([0, T // 3, T]) if T > 2 else None
    for lay in (block_layout(T, C), block_layout(T, C, cu)):
        want = torch.stack([torch.stack([x.detach()[b].to(acc)[lay.token_block == i].mean(0) for i in range(lay.N)])
                            for b in range(2)])
        torch.testing.assert_close(block_mean(x, lay), want, rtol=1e-6, atol=1e-6)


def test_router_gumbel_samples_in_training_only():
    r = BlockRouter(8, 2, 4, sample="gumbel").double()
    x = torch.randn(1, 64, 8, generator=gen(0), dtype=torch.float64)
    torch.manual_seed(0)
    draws = {tuple(r(x)[0][..., 0].flatten().tolist()) for _ in range(8)}
    assert len(draws) > 1, "gumbel sampling must vary while training"
    r.eval()
    w_eval = r(x)[0]
    plain = BlockRouter(8, 2, 4, sample="argmax").double()
    plain.load_state_dict(r.state_dict())
    assert torch.equal(w_eval, plain(x)[0])
    assert ((w_eval == 0) | (w_eval == 1)).all()


def test_training_forward_and_cache_share_the_router_decision():
    """`BlockRouter.decide` is the one decision of the full forward and of the cached path (prefill, decode): a
    replaced decision (what benchmarks force) routes both, and the cached rows still equal the full forward's."""
    layer = make_layer("gdn").eval()
    C, Hr = layer.block_size, layer.num_router_heads
    x = x_of(2, 5 * C + 3)
    real = layer.router.decide

    def decide(xm):  # every block of router head 0 softmax, every other linear, with the router's own gradient path
        w, p = real(xm)
        fixed = torch.zeros_like(w)
        fixed[:, :, 0, 0] = 1
        fixed[:, :, 1:, 1] = 1
        return fixed + (w - w.detach()), p

    layer.router.decide = decide
    with torch.no_grad():
        full, stats, _ = layer(x)
        pre, pre_stats, st = layer(x[:, :2 * C + 1], use_cache=True)
        rest, _, _ = layer(x[:, 2 * C + 1:], past_key_values=st, use_cache=True)
    assert float(stats.softmax_fraction.mean()) == pytest.approx(1 / Hr)
    assert float(pre_stats.softmax_fraction.mean()) == pytest.approx(1 / Hr)
    assert st.lengths.tolist() == [[5 * C] + [0] * (Hr - 1)] * 2
    torch.testing.assert_close(torch.cat([pre, rest], 1), full, rtol=1e-9, atol=1e-10)


def test_router_budget_pulls_fraction_toward_target():
    layer = make_layer("gdn", router_budget=0.1, router_budget_weight=2.0)
    x = x_of(2, 32)
    _, stats, _ = layer(x)
    expected = layer.router(x)[1][..., 0].mean()
    torch.testing.assert_close(stats.router_aux_loss, 2.0 * (expected - 0.1) ** 2)
    (g,) = torch.autograd.grad(stats.router_aux_loss, layer.router.proj.weight)
    assert g.abs().sum() > 0
    assert make_layer("gdn")(x)[1].router_aux_loss is None


def test_router_budget_per_head_is_the_mean_of_each_heads_term():
    """scope "head": the mean over router heads of each head's squared deviation, which a layer whose heads split
    into all-softmax and all-linear pays even where its layer mean meets the target."""
    layer = make_layer("gdn", router_budget=0.25, router_budget_weight=2.0, router_budget_scope="head")
    x = x_of(2, 48)
    _, stats, _ = layer(x)
    p = layer.router(x)[1][..., 0]  # [B, N, H_R]
    per_head = p.mean((0, 1))
    torch.testing.assert_close(stats.router_aux_loss, 2.0 * ((per_head - 0.25) ** 2).mean())
    (g,) = torch.autograd.grad(stats.router_aux_loss, layer.router.proj.weight)
    assert g.abs().sum() > 0
    layer.router_budget_scope = "layer"
    assert layer(x)[1].router_aux_loss < stats.router_aux_loss or per_head.std() == 0


def test_340m_parameter_count():
    layer = NAtSLAttention()
    D, HL, dk, dv, HA, HR = 1024, 6, 128, 256, 12, 6
    kd, vd = HL * dk, HL * dv
    expected = (2 * D * kd + D * vd  # q, k, v projections
                + (2 * kd + vd) * 4  # short convolutions (no bias)
                + 2 * (kd // HA)  # softmax q/k RMSNorm
                + D * HR * 2  # router
                + kd * 2 * HA  # W_omega
                + 2 * (vd // HA)  # gamma_L, gamma_A
                + D * vd + vd * D  # W_g, W_o
                + 2 * D * HL + 2 * HL)  # GDN: a_proj, b_proj, A_log, dt_bias
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert (layer.linear_backend, layer.block_size, layer.router.sample, layer.router_grad) == \
        ("gdn", 64, "argmax", "selected")
    assert layer.decay_through_softmax and not layer.use_rope and layer.router_budget is None


@pytest.mark.parametrize("over,match", [
    (dict(num_heads=3, num_router_heads=2), "multiples of num_router_heads"),
    (dict(num_softmax_heads=3), "divisible by num_softmax_heads|multiples"),
    (dict(linear_backend="mamba3"), "linear_backend"),
    (dict(softmax_backend="xformers"), "softmax_backend"),
    (dict(linear_impl="cuda"), "linear_impl"),
    (dict(expand_v=0.3), "expand_v"),
    (dict(router_sample="topk"), "router_sample"),
    (dict(router_temperature=0.0), "router_temperature"),
    (dict(router_budget=1.5), "router_budget"),
    (dict(router_grad="none"), "router_grad"),
    (dict(router_budget_scope="token"), "router_budget_scope"),
    (dict(block_size=0), "block_size"),
    (dict(num_softmax_heads=16, num_router_heads=2, use_rope=True, head_dim=8, num_heads=2), "even"),
])
def test_bad_config_raises(over, match):
    with pytest.raises(ValueError, match=match):
        NAtSLAttention(**{**SMALL, **over})


def test_bad_forward_input_raises():
    layer = make_layer("gdn")
    x = x_of(2, 10)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(x[..., :5])
    with pytest.raises(ValueError, match="padded"):
        layer(x, attention_mask=torch.tensor([[1] * 10, [1] * 8 + [0] * 2]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        layer(x, position_ids=torch.arange(10))
    with pytest.raises(ValueError, match="cache"):  # packed input cannot continue an inference cache
        layer(x[:1], use_cache=True, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(TypeError, match="NAtSLCache"):
        layer(x, past_key_values=object())
    assert torch.equal(layer(x, attention_mask=torch.ones(2, 10))[0], layer(x)[0])



@pytest.mark.parametrize("budget", [None, 0.25])
def test_empty_input_gives_empty_outputs_and_finite_statistics(budget):
    """T = 0: an empty output, zero softmax fractions (not NaN) and, with the budget, a finite regulariser that the
    backward passes through."""
    layer = make_layer("gdn")
    layer.router_budget = budget
    x = x_of(2, 0).requires_grad_()
    o, stats, _ = layer(x)
    assert o.shape == x.shape
    assert torch.equal(stats.softmax_fraction, torch.zeros_like(stats.softmax_fraction))
    assert torch.equal(stats.router_entropy, torch.zeros_like(stats.router_entropy))
    if budget is None:
        assert stats.router_aux_loss is None
    else:
        assert stats.router_aux_loss == 0
        (o.sum() + stats.router_aux_loss).backward()
        assert torch.isfinite(layer.router.proj.weight.grad).all()
