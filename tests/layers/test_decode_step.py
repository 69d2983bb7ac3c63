"""The one-token decode step (spec §1.4, §1.8): fla's fused recurrent kernels (`fla_ops.fla_step`, under the Triton
interpreter, float32) against natsl's PyTorch step `state.linear_step` for every backend, and a NAtS-L layer's cached
decoding on the fla path equal to its full forward."""

import pytest
import torch
import torch.nn.functional as F
from helpers import gen, linear_gate_inputs

from natsl.layers.baselines import step_op
from natsl.layers.state import linear_step

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fla_step_matches_torch_step(backend):
    pytest.importorskip("fla")
    from natsl.layers.linear.fla_ops import fla_step

    gn = gen(BACKENDS.index(backend))
    B, H, K, V = 2, 3, 16, 32
    q = torch.randn(B, 1, H, K, generator=gn)
    k = F.normalize(torch.randn(B, 1, H, K, generator=gn), dim=-1)
    v = torch.randn(B, 1, H, V, generator=gn)
    x = linear_gate_inputs(gn, backend, B, 1, H, K, torch.float32)
    S = torch.randn(B, H, K, V, generator=gn)
    o_ref, S_ref = linear_step(backend, q.double(), k.double(), v.double(),
                               *(None if x.get(n) is None else x[n].double() for n in ("g", "beta")), S.double(),
                               K ** -0.5)
    o, S_new = fla_step(backend, q, k, v, x.get("g"), x.get("beta"), S, K ** -0.5)
    assert o.dtype == q.dtype and S_new.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_new.double(), S_ref, rtol=1e-5, atol=1e-5)


def test_step_op_dispatch():
    """fla's step on CUDA (auto) or when asked for, natsl's PyTorch step otherwise."""
    from natsl.layers.linear.fla_ops import fla_step

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_op("gdn", "auto", cuda).func is fla_step and step_op("gdn", "fla", cpu).func is fla_step
    assert step_op("gdn", "auto", cpu).func is linear_step and step_op("gdn", "torch", cuda).func is linear_step
    with pytest.raises(ValueError, match="linear_impl"):
        step_op("gdn", "triton", cpu)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gdn", "mamba2"])
def test_layer_decoding_on_the_fla_path(backend):
    """Prefill of 70 tokens, then 60 one-token steps (a block commit in between) with `linear_impl="fla"`: the
    outputs of the full forward."""
    pytest.importorskip("fla")
    from natsl import NAtSLAttention

    torch.manual_seed(0)
    layer = NAtSLAttention(hidden_size=64, num_heads=2, head_dim=16, num_softmax_heads=2, num_router_heads=2,
                           block_size=64, linear_backend=backend, linear_impl="fla", softmax_backend="sdpa").eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen(p.numel())) * (2.0 if "router" in name else 0.05))
        x = torch.randn(1, 130, 64, generator=gen(9))
        full = layer(x)[0]
        o, _, st = layer(x[:, :70], use_cache=True)
        outs = [o] + [layer(x[:, t:t + 1], past_key_values=st, use_cache=True)[0] for t in range(70, 130)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
