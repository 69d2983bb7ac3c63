"""Under autocast with fp32 weights (how `natsl train` trains on CUDA) the residual stream is fp32 but the
projections are bf16: the mixers must hand their attention ops one dtype (fla's kernels and flash reject a mix)."""

import pytest
import torch

import natsl.layers.baselines as baselines
import natsl.ops
from natsl import NAtSLAttention
from natsl.layers.baselines import LinearAttention


def _recording(fn, seen):
    def wrapper(*args, **kwargs):
        seen.append({i: a.dtype for i, a in enumerate(args) if isinstance(a, torch.Tensor)})
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("backend", ["gdn", "mamba2"])
def test_natsl_layer_one_dtype_under_autocast(monkeypatch, backend):
    seen = []
    monkeypatch.setattr(natsl.ops, "natsl_attention", _recording(natsl.ops.natsl_attention, seen))  # imported per call
    layer = NAtSLAttention(hidden_size=64, num_heads=2, head_dim=16, num_softmax_heads=2, num_router_heads=2,
                           block_size=16, linear_backend=backend)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = layer(x)[0]
    o.float().sum().backward()
    assert len(seen) == 1
    # q_s, k_s, v_s, q_l, k_l, v_l, routing weights
    assert [seen[0][i] for i in range(7)] == [torch.bfloat16] * 7
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("backend", ["gdn", "mamba2"])
def test_linear_layer_one_dtype_under_autocast(monkeypatch, backend):
    seen = []
    orig = baselines.linear_op
    monkeypatch.setattr(baselines, "linear_op", lambda *a, **k: _recording(orig(*a, **k), seen))
    layer = LinearAttention(hidden_size=64, num_heads=2, head_dim=16, linear_backend=backend)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = layer(x)[0]
    assert len(seen) == 1 and [seen[0][i] for i in range(3)] == [torch.bfloat16] * 3
    assert torch.isfinite(o).all()
