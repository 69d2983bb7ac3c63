"""natsl's fused two-norm merge (`natsl.kernels.merge`, spec §1.6) under the Triton interpreter against its PyTorch
twin `naive_norm_merge`, forward and every gradient (o_s, o_l, the merge logits, the gate, both norm weights), in
float32; widths that are and are not powers of two, row counts that do not fill the last tile; input errors."""

import pytest
import torch
from helpers import assert_close, gen

from natsl.kernels.merge import NormMergeFunction, norm_merge
from natsl.kernels.naive import naive_norm_merge


def _inputs(seed, N, D):
    gn = gen(seed)
    x = [torch.randn(N, D, generator=gn) * s for s in (2.0, 0.5)]  # two branch outputs of different scales
    w = torch.randn(N, 2, generator=gn) * 2
    g = torch.randn(N, D, generator=gn) * 2
    gammas = [1 + 0.3 * torch.randn(D, generator=gn) for _ in range(2)]
    return [t.requires_grad_() for t in (*x, w, g, *gammas)]


@pytest.mark.parametrize("N,D", [(37, 16), (70, 24), (5, 128)])
def test_kernel_matches_twin(N, D):
    args = _inputs(N + D, N, D)
    y = NormMergeFunction.apply(*args, 1e-5)
    ref = naive_norm_merge(*[a.double() for a in args], 1e-5)
    assert_close("y", ref, y, 1e-6)
    dy = torch.randn(N, D, generator=gen(7))
    grads = torch.autograd.grad((y * dy).sum(), args)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), args)
    for name, r, o in zip(("do_s", "do_l", "dw", "dg", "dgamma_s", "dgamma_l"), ref_grads, grads):
        assert o.dtype == r.dtype == torch.float32, name
        assert_close(name, r, o, 1e-5)


def test_twin_matches_the_spec_formula():
    """The twin is spec §1.6 written out (ω = softmax of the two logits, index 0 = softmax branch)."""
    o_s, o_l, w, g, gs, gl = (a.detach().double() for a in _inputs(3, 9, 8))

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    om = torch.softmax(w, -1)
    want = (om[:, :1] * gs * rms(o_s) + om[:, 1:] * gl * rms(o_l)) * g * torch.sigmoid(g)
    torch.testing.assert_close(naive_norm_merge(o_s, o_l, w, g, gs, gl, 1e-5), want, rtol=1e-12, atol=1e-12)


def test_zero_rows_stay_finite():
    """An all-zero branch output (e.g. a head whose softmax part is empty) gives finite values and gradients."""
    args = _inputs(5, 6, 16)
    with torch.no_grad():
        args[0][2:4] = 0
    y = NormMergeFunction.apply(*args, 1e-5)
    grads = torch.autograd.grad(y.sum(), args)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)


def test_shape_errors():
    o = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="o_l and g"):
        norm_merge(o, o[..., :4], torch.randn(2, 3, 2), o, torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="o_l and g"):
        norm_merge(o, o, torch.randn(2, 3, 3), o, torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="gamma_s"):
        norm_merge(o, o, torch.randn(2, 3, 2), o, torch.ones(4), torch.ones(8))
