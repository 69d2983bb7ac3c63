"""fla's fused modules and natsl's merge kernel on the H200 against their PyTorch twins (issue 20), and natsl's
all-GDN model against fla's `GatedDeltaNetForCausalLM` with copied weights.

Tolerance rule (style guide): against a float64 reference (the twin in float64), the fused path's error is within
2× the error of the PyTorch twin run in the same dtype (plus a small absolute floor for float32). Run with
`NATSL_TEST_DEVICE=cuda python -m pytest -q -m gpu tests/gpu/test_fused_gpu.py` (fla installed).
"""

import pytest
import torch

import natsl.kernels.gather_scatter as gs
import natsl.layers.fused as fused
from natsl import NAtSLConfig, NAtSLForCausalLM
from natsl.kernels.merge import norm_merge
from natsl.kernels.naive import naive_norm_merge
from natsl.models.convert import fla_gdn_config_from, from_fla_gdn_state_dict, to_fla_gdn_state_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gs.interpreted(), reason="set NATSL_TEST_DEVICE=cuda: the Triton interpreter is on"),
    pytest.mark.usefixtures("fla_harness"),  # tests/gpu/conftest.py: fla #640 bypass, first autotune config
]
DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float32]


def _err(ref, out):
    return (out.double() - ref.double()).abs().max().item()


def check(name, ref64, fused_out, twin_out, atol=1e-6):
    e_f, e_t = _err(ref64, fused_out), _err(ref64, twin_out)
    assert torch.isfinite(fused_out).all(), name
    assert e_f <= 2 * e_t + atol * max(ref64.abs().max().item(), 1.0), f"{name}: fused err {e_f:.3e} vs twin {e_t:.3e}"


def run_both(fn_fused, fn_twin, inputs, cot):
    """Outputs and input gradients of the fused fn, the twin in the same dtype, and the twin in float64."""
    outs = []
    for fn, cast in ((fn_fused, None), (fn_twin, None), (fn_twin, torch.float64)):
        xs = [(x.to(cast) if cast is not None and x.is_floating_point() else x).detach().requires_grad_(
            x.is_floating_point()) for x in inputs]
        y = fn(*xs)
        grads = torch.autograd.grad((y.double() * cot.double()).sum(), [x for x in xs if x.requires_grad])
        outs.append((y, grads))
    return outs


def compare(name, fn_fused, fn_twin, inputs, cot):
    (yf, gf), (yt, gt), (yr, gr) = run_both(fn_fused, fn_twin, inputs, cot)
    assert yf.dtype == yt.dtype, f"{name}: fused dtype {yf.dtype} vs twin {yt.dtype}"
    check(name, yr, yf, yt)
    for i, (a, b, r) in enumerate(zip(gf, gt, gr)):
        check(f"{name} grad {i}", r, a, b)


def rnd(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_match_twins(dtype):
    N, D = 4096, 1024
    x, w = rnd(N, D, dtype=dtype, scale=3), 1 + 0.1 * rnd(D, dtype=torch.float32, seed=1)
    norm = fused.RMSNorm(D, 1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(w)
    cot = rnd(N, D, dtype=torch.float32, seed=2)
    compare("rms_norm", lambda x_: norm(x_), lambda x_: fused.rms_norm_torch(x_, norm.weight, 1e-5), [x], cot)
    res = rnd(N, D, dtype=torch.float32, seed=3)
    compare("rms_norm prenorm", lambda x_, r_: norm(x_, r_, prenorm=True)[0],
            lambda x_, r_: fused.rms_norm_torch(x_, norm.weight, 1e-5, r_, True)[0], [x, res], cot)
    y, r = norm(x, res, prenorm=True)
    assert r.dtype == torch.float32 and torch.allclose(r, x.float() + res, atol=1e-6)
    g = rnd(N, D, dtype=dtype, seed=4)
    gnorm = fused.GatedRMSNorm(D, 1e-5).to(DEV)
    compare("gated_rms_norm", lambda x_, g_: gnorm(x_, g_),
            lambda x_, g_: fused.gated_rms_norm_torch(x_, g_, gnorm.weight, 1e-5), [x, g], cot)
    q = rnd(2, 512, 6, 128, dtype=dtype, scale=2, seed=5)
    compare("l2_norm", lambda q_: fused.l2_norm(q_), lambda q_: fused.l2_norm_torch(q_), [q],
            rnd(*q.shape, dtype=torch.float32, seed=6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_and_rotary_match_twins(dtype):
    mlp = fused.SwiGLU(256, 768).to(DEV)
    x = rnd(2, 300, 256, dtype=dtype, seed=7)

    def twin(x_):
        return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x_)) * mlp.up_proj(x_))

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        yf, yt = mlp(x), twin(x)
    assert yf.dtype == yt.dtype
    assert _err(yt, yf) <= 0.02 * yt.abs().max().item()  # both in the same dtype: only rounding of the product
    q = rnd(1, 300, 4, 64, dtype=dtype, seed=9)
    cu = torch.tensor([0, 100, 101, 300], device=DEV)
    for name, cu_ in (("rotary", None), ("rotary packed", cu)):
        compare(name, lambda q_, c=cu_: fused.rotary(q_, 10000.0, c),
                lambda q_, c=cu_: fused.rotary(q_.cpu(), 10000.0, None if c is None else c.cpu()).to(DEV),
                [q], rnd(*q.shape, dtype=torch.float32, seed=10))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_merge_kernel_matches_twin(dtype):
    B, T, H, D = 2, 1000, 12, 128
    o_s, o_l = rnd(B, T, H, D, dtype=dtype, scale=2, seed=11), rnd(B, T, H, D, dtype=dtype, scale=0.3, seed=12)
    w, g = rnd(B, T, H, 2, dtype=dtype, scale=2, seed=13), rnd(B, T, H, D, dtype=dtype, scale=2, seed=14)
    gs_, gl_ = 1 + 0.2 * rnd(D, dtype=torch.float32, seed=15), 1 + 0.2 * rnd(D, dtype=torch.float32, seed=16)
    compare("norm_merge", lambda *a: norm_merge(*a, 1e-5), lambda *a: naive_norm_merge(*a, 1e-5),
            [o_s, o_l, w, g, gs_, gl_], rnd(B, T, H, D, dtype=torch.float32, seed=17))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_cross_entropy_matches_twin(dtype):
    logits = rnd(600, 5000, dtype=dtype, scale=3, seed=18)
    target = torch.randint(0, 5000, (600,), device=DEV)
    target[:7] = -100
    compare("cross_entropy", lambda l_: fused.cross_entropy(l_, target),
            lambda l_: fused.cross_entropy_torch(l_, target), [logits], torch.ones((), device=DEV))


def test_linear_model_matches_fla_gdn_model():
    """natsl `linear` (gdn) and fla's GatedDeltaNetForCausalLM with the same weights: logits, loss and every
    parameter gradient, in fp32 (same kernels: near-identical) and under bf16 autocast (natsl's error against the
    fp32 fla model within 2× fla's own)."""
    from fla.models import GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    config = NAtSLConfig.preset("tiny", "linear", hidden_size=256, num_heads=2, head_dim=64, vocab_size=1000,
                                intermediate_size=768, norm_eps=1e-6)
    ours = NAtSLForCausalLM(config).to(DEV)
    ref = GatedDeltaNetForCausalLM(fla_gdn_config_from(config)).to(DEV)
    ref.load_state_dict(to_fla_gdn_state_dict(ours.state_dict(), config))
    ids = torch.randint(0, 1000, (2, 512), device=DEV)

    def run(model, autocast, natsl):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        if not natsl:
            grads = from_fla_gdn_state_dict(grads, config.layer_layout)
        return out.loss.detach().float(), logits, grads

    ref32, ours32 = run(ref, False, False), run(ours, False, True)
    # fp32: the same fla kernels, whose dots run in tf32 (~1e-3), on differently grouped matmuls (natsl's one q/k/v
    # matmul, the chunked linear cross-entropy)
    assert abs(ours32[0] - ref32[0]) <= 1e-4 * ref32[0]
    assert _err(ref32[1], ours32[1]) <= 1e-3 * ref32[1].abs().max().item()
    for n, g in ref32[2].items():
        assert _err(g, ours32[2][n]) <= 5e-3 * max(g.abs().max().item(), 1e-8), n
    ref16, ours16 = run(ref, True, False), run(ours, True, True)
    assert abs(ours16[0] - ref32[0]) <= 2 * abs(ref16[0] - ref32[0]) + 1e-3 * ref32[0]
    assert _err(ref32[1], ours16[1]) <= 2 * _err(ref32[1], ref16[1]) + 1e-3 * ref32[1].abs().max().item()
    for n, g in ref32[2].items():
        scale = max(g.abs().max().item(), 1e-8)
        assert _err(g, ours16[2][n]) <= 2 * _err(g, ref16[2][n]) + 1e-3 * scale, n
