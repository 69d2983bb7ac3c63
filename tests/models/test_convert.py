"""`natsl.models.convert`: fla's `GatedDeltaNetForCausalLM` and natsl's all-GDN `linear` model are one model —
with fla's weights converted, natsl's logits and loss equal fla's (fp32; fla under the Triton interpreter with its
fused norm / SwiGLU / conv kernels, natsl on its PyTorch twins), both directions of the key map round-trip, and an
fla checkpoint initialises a NAtS-L hybrid's shared weights."""

import pytest
import torch
from helpers import gen

from natsl import NAtSLConfig, NAtSLForCausalLM
from natsl.models.convert import (
    config_from_fla_gdn,
    fla_gdn_config_from,
    from_fla_gdn_state_dict,
    load_fla_gdn_state_dict,
    to_fla_gdn_state_dict,
)

FLA_DIMS = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=2, vocab_size=64,
                hidden_ratio=4, norm_eps=1e-6)


def _fla_model(seed=0):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(seed)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**FLA_DIMS, fuse_cross_entropy=False))
    with torch.no_grad():  # move every weight away from its init so that a mis-mapped one shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen(p.numel())) * 0.05)
    return model


def test_natsl_linear_model_is_fla_gdn_model():
    fla_model = _fla_model()
    config = config_from_fla_gdn(fla_model.config, linear_impl="torch")
    model = NAtSLForCausalLM(config)
    assert load_fla_gdn_state_dict(model, fla_model.state_dict()) == []
    ids = torch.randint(0, 64, (2, 40), generator=gen(1))
    ref = fla_model(input_ids=ids, labels=ids)
    out = model(input_ids=ids, labels=ids)
    scale = ref.logits.abs().max()
    assert (out.logits - ref.logits).abs().max() <= 1e-4 * scale
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * ref.loss.item()


def test_key_maps_round_trip():
    fla_model = _fla_model(1)
    config = config_from_fla_gdn(fla_model.config)
    natsl_sd = from_fla_gdn_state_dict(fla_model.state_dict(), config.layer_layout)
    assert set(natsl_sd) == set(NAtSLForCausalLM(config).state_dict())
    back = to_fla_gdn_state_dict(natsl_sd, config)
    assert set(back) == set(fla_model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in fla_model.state_dict().items())
    fla_config = fla_gdn_config_from(config)
    assert (fla_config.intermediate_size, fla_config.norm_eps, fla_config.head_dim) == \
        (config.intermediate_size, 1e-6, 8)


def test_fla_checkpoint_initialises_a_hybrid():
    fla_model = _fla_model(2)
    base = config_from_fla_gdn(fla_model.config)
    config = NAtSLConfig(**{**base.to_diff_dict(), "layer_layout": ["linear", "natsl"], "num_softmax_heads": 4,
                            "num_router_heads": 2, "block_size": 16})
    model = NAtSLForCausalLM(config)
    missing = load_fla_gdn_state_dict(model, fla_model.state_dict())
    sd, fsd = model.state_dict(), fla_model.state_dict()
    assert torch.equal(sd["model.layers.1.attn.gates.A_log"], fsd["model.layers.1.attn.A_log"])
    assert torch.equal(sd["model.layers.1.attn.o_proj.weight"], fsd["model.layers.1.attn.o_proj.weight"])
    assert torch.equal(sd["model.layers.1.attn.q_proj.weight"], fsd["model.layers.1.attn.q_proj.weight"])
    assert {"model.layers.1.attn.router.proj.weight", "model.layers.1.attn.w_proj.weight",
            "model.layers.1.attn.o_norm_linear.weight"} <= set(missing)
    assert not any(k.startswith("model.layers.0.") for k in missing)


def test_conversion_errors():
    from fla.models import GatedDeltaNetConfig

    with pytest.raises(ValueError, match="allow_neg_eigval"):
        config_from_fla_gdn(GatedDeltaNetConfig(**FLA_DIMS, allow_neg_eigval=True))
    hybrid = NAtSLConfig.preset("tiny", "hybrid")
    with pytest.raises(ValueError, match="plain GDN layers"):
        to_fla_gdn_state_dict({}, hybrid)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_fla_gdn_state_dict(NAtSLForCausalLM(NAtSLConfig.preset("tiny", "linear")), _fla_model().state_dict())
