"""natsl's plain linear layers are fla's layers: `LinearAttention(linear_backend="gdn")` (the GDN-only baseline and
the linear layers of the GDN / NAtS-L hybrids) is fla's `GatedDeltaNet`, and `"deltanet"` is fla's `DeltaNet` with
its output gate. With fla's weights copied in, the outputs and input gradients agree (fp32, fla's layer run under
the Triton interpreter on CPU, natsl's on its PyTorch path), dense and packed. The gates (`LinearGates`) are the
same module inside `NAtSLAttention`, so this also pins the NAtS-L layer's gate parameterisation to fla's.
"""

import pytest
import torch
from helpers import gen

from natsl.layers.baselines import LinearAttention

D, H, K = 32, 2, 8


def _pair(backend, seed=0):
    from fla.layers import DeltaNet, GatedDeltaNet

    torch.manual_seed(seed)
    if backend == "gdn":
        ref = GatedDeltaNet(hidden_size=D, expand_v=2, head_dim=K, num_heads=H, conv_size=4, mode="chunk")
    else:  # DeltaNet sizes heads by expand_k / expand_v of the width: K = 32 * 0.5 / 2 = 8, V = 32 * 1 / 2 = 16
        ref = DeltaNet(hidden_size=D, expand_k=K * H / D, expand_v=2 * K * H / D, num_heads=H, use_gate=True,
                       conv_size=4, mode="chunk")
    with torch.no_grad():  # move every weight away from its init, so a mis-copied one shows
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen(seed + p.numel())) * 0.05)
    ours = LinearAttention(hidden_size=D, num_heads=H, head_dim=K, expand_v=2, linear_backend=backend,
                           linear_impl="torch", conv_size=4)
    copies = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "g_proj": "g_proj", "o_proj": "o_proj",
              "q_conv1d": "q_conv1d", "k_conv1d": "k_conv1d", "v_conv1d": "v_conv1d", "gates.b_proj": "b_proj",
              "o_norm": "o_norm"}
    if backend == "gdn":
        copies["gates.a_proj"] = "a_proj"
    with torch.no_grad():
        for mine, theirs in copies.items():
            dst, src = ours.get_submodule(mine), ref.get_submodule(theirs)
            dst.weight.copy_(src.weight.view_as(dst.weight))
        if backend == "gdn":
            ours.gates.A_log.copy_(ref.A_log)
            ours.gates.dt_bias.copy_(ref.dt_bias)
    return ref, ours


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", ["gdn", "deltanet"])
def test_linear_layer_matches_fla_layer(backend, packed):
    ref, ours = _pair(backend)
    T = 37
    x = torch.randn(1 if packed else 2, T, D, generator=gen(3), requires_grad=True)
    kw = {"cu_seqlens": torch.tensor([0, 11, 30, 37])} if packed else {}
    o_ref, o_ours = ref(x, **kw)[0], ours(x, **kw)[0]
    scale = o_ref.abs().max()
    assert (o_ours - o_ref).abs().max() <= 1e-4 * scale, "outputs differ"
    w = torch.randn(o_ref.shape, generator=gen(4))
    (g_ref,) = torch.autograd.grad((o_ref * w).sum(), x)
    (g_ours,) = torch.autograd.grad((o_ours * w).sum(), x)
    assert (g_ours - g_ref).abs().max() <= 1e-4 * g_ref.abs().max(), "input gradients differ"
