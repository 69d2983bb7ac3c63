"""torch.compile of the NAtS-L layer (CPU, `aot_eager`: dynamo + AOTAutograd without inductor's C++ codegen).

The layer has graph breaks by design (the host sync for the number of softmax blocks in the linear branch; fla's
ops are `torch.compiler.disable`d by fla itself, see benchmarks/RESULTS.md "Layer"), so this checks that the
compiled layer runs through them and gives the eager outputs and gradients, including the router's.
"""

import pytest
import torch

from natsl import NAtSLAttention


@pytest.mark.parametrize("backend", ["gdn", "mamba2"])
def test_compiled_layer_matches_eager(backend):
    torch.manual_seed(0)
    layer = NAtSLAttention(hidden_size=64, num_heads=2, head_dim=16, num_softmax_heads=2, num_router_heads=2,
                           block_size=16, linear_backend=backend)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)  # partial last block
    compiled = torch.compile(layer, backend="aot_eager", dynamic=False)
    o_eager, o_comp = layer(x)[0], compiled(x)[0]
    torch.testing.assert_close(o_comp, o_eager, rtol=1e-5, atol=1e-6)
    params = [x, layer.router.proj.weight, layer.q_proj.weight, layer.o_proj.weight]
    g_eager = torch.autograd.grad(o_eager.square().sum(), params)
    g_comp = torch.autograd.grad(o_comp.square().sum(), params)
    assert g_eager[1].abs().sum() > 0  # the router gets a gradient at all
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
