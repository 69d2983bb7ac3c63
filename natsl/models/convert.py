"""Checkpoint conversion between fla's `GatedDeltaNetForCausalLM` and natsl models (issue 20).

natsl's `linear` family with `linear_backend="gdn"` is numerically fla's GDN model (the same fused kernels on CUDA;
`tests/gpu/test_fused_gpu.py` holds them equal with copied weights), and its parameters have fla's names except
that a layer's gate parameters sit in `attn.gates`:

    fla:   model.layers.{i}.attn.{a_proj, b_proj}.weight, ...attn.A_log, ...attn.dt_bias
    natsl: model.layers.{i}.attn.gates.{a_proj, b_proj}.weight, ...attn.gates.A_log, ...attn.gates.dt_bias

Every other key (embeddings, norms, q/k/v projections and convolutions, g_proj, o_norm, o_proj, the MLP, lm_head)
is the same. An fla GDN checkpoint also initialises a natsl *hybrid* of the same width: its GDN layers load as
they are, its NAtS-L layers take the GDN layer's projections, convolutions, gates, `g_proj` and `o_proj` (the same shapes)
and keep their own init for the rest (router, merge weights, softmax q/k norms, the two merge norms, which are
per softmax head where fla's `o_norm` is per linear head), and full-softmax layers keep their own init.

    from fla.models import GatedDeltaNetForCausalLM
    fla_model = GatedDeltaNetForCausalLM.from_pretrained(path)
    config = config_from_fla_gdn(fla_model.config)                   # or any natsl config of the same width
    model = NAtSLForCausalLM(config)
    missing = load_fla_gdn_state_dict(model, fla_model.state_dict())  # natsl-only keys left at their init
    fla_sd = to_fla_gdn_state_dict(model.state_dict(), config)      # back (all-GDN natsl models only)
"""

from __future__ import annotations

import re

import torch

from natsl.models.configuration_natsl import NAtSLConfig

_GATE_KEYS = ("a_proj.weight", "b_proj.weight", "A_log", "dt_bias")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.attn\.(.+)$")


def config_from_fla_gdn(fla_config, **overrides) -> NAtSLConfig:
    """The natsl `linear` (all-GDN) config equal to an fla `GatedDeltaNetConfig`.

    Raises:
        ValueError: for fla options natsl does not have (`num_v_heads != num_heads`, `use_gate=False`,
            `use_short_conv=False`, `allow_neg_eigval`, hybrid `attn` layers, attention residuals, a sigmoid
            output gate, a non-swish MLP, tied embeddings).
    """
    unsupported = {
        "num_v_heads": fla_config.num_v_heads not in (None, fla_config.num_heads),
        "use_gate": not fla_config.use_gate,
        "use_short_conv": not fla_config.use_short_conv,
        "allow_neg_eigval": fla_config.allow_neg_eigval,
        "attn": fla_config.attn is not None,
        "attnres_block_size": getattr(fla_config, "attnres_block_size", None) is not None,
        "output_gate_activation": getattr(fla_config, "output_gate_activation", "swish") not in ("swish", "silu"),
        "hidden_act": fla_config.hidden_act != "swish",
        "tie_word_embeddings": fla_config.tie_word_embeddings,
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(f"this fla GatedDeltaNetConfig uses options natsl has no equivalent for: {bad}")
    intermediate = fla_config.intermediate_size
    if intermediate is None:
        intermediate = int(fla_config.hidden_size * (fla_config.hidden_ratio or 4) * 2 / 3)
        intermediate = 256 * ((intermediate + 255) // 256)
    kw = dict(vocab_size=fla_config.vocab_size, hidden_size=fla_config.hidden_size,
              num_hidden_layers=fla_config.num_hidden_layers, layer_layout=["linear"] * fla_config.num_hidden_layers,
              intermediate_size=intermediate, num_heads=fla_config.num_heads, head_dim=fla_config.head_dim,
              expand_v=fla_config.expand_v, linear_backend="gdn", conv_size=fla_config.conv_size,
              norm_eps=fla_config.norm_eps, initializer_range=fla_config.initializer_range,
              pad_token_id=fla_config.pad_token_id, bos_token_id=fla_config.bos_token_id,
              eos_token_id=fla_config.eos_token_id)
    kw.update(overrides)
    return NAtSLConfig(**kw)


def _check_all_gdn(config: NAtSLConfig) -> None:
    if set(config.layer_layout) != {"linear"} or config.linear_backend != "gdn":
        raise ValueError("only natsl models of plain GDN layers (layer_layout all 'linear', linear_backend 'gdn') "
                         f"have an fla GatedDeltaNetForCausalLM equivalent; got layout {sorted(set(config.layer_layout))}"
                         f" and linear_backend {config.linear_backend!r}")


def fla_gdn_config_from(config: NAtSLConfig):
    """The fla `GatedDeltaNetConfig` equal to an all-GDN natsl config (needs fla installed)."""
    _check_all_gdn(config)
    from fla.models import GatedDeltaNetConfig

    return GatedDeltaNetConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                               num_heads=config.num_heads, head_dim=config.head_dim, expand_v=config.expand_v,
                               intermediate_size=config.intermediate_size, conv_size=config.conv_size,
                               norm_eps=config.norm_eps, vocab_size=config.vocab_size,
                               initializer_range=config.initializer_range, tie_word_embeddings=False,
                               pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
                               eos_token_id=config.eos_token_id)


def from_fla_gdn_state_dict(fla_sd: dict[str, torch.Tensor], layer_layout: list[str]) -> dict[str, torch.Tensor]:
    """Rename the keys of an fla GDN state dict for a natsl model with `layer_layout` (see the module docstring:
    GDN layers → `linear` and `natsl` layers; the attention keys of `softmax` layers are dropped)."""
    out = {}
    for key, value in fla_sd.items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i >= len(layer_layout):
            raise ValueError(f"the fla checkpoint has layer {i}, the natsl layout only {len(layer_layout)} layers")
        kind = layer_layout[i]
        if kind == "softmax":
            continue
        if rest in _GATE_KEYS:
            rest = "gates." + rest
        elif kind == "natsl" and rest == "o_norm.weight":  # per d_v; natsl's merge norms are per d_va
            continue
        out[f"model.layers.{i}.attn.{rest}"] = value
    return out


def load_fla_gdn_state_dict(model, fla_sd: dict[str, torch.Tensor]) -> list[str]:
    """Load an fla GDN state dict into a natsl model (any layout of the same width); returns the natsl keys the
    checkpoint did not provide (natsl-only parameters, full-softmax layers), which keep their current values.

    Raises:
        ValueError: a converted key the natsl model does not have, or a shape that differs.
    """
    converted = from_fla_gdn_state_dict(fla_sd, model.config.layer_layout)
    own = model.state_dict()
    unknown = sorted(set(converted) - set(own))
    if unknown:
        raise ValueError(f"fla checkpoint keys with no natsl counterpart: {unknown[:8]}")
    bad = [k for k, v in converted.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError("shape mismatch for " + ", ".join(f"{k}: fla {tuple(converted[k].shape)} vs natsl "
                                                            f"{tuple(own[k].shape)}" for k in bad[:8]))
    model.load_state_dict(converted, strict=False)
    return sorted(set(own) - set(converted))


def to_fla_gdn_state_dict(sd: dict[str, torch.Tensor], config: NAtSLConfig) -> dict[str, torch.Tensor]:
    """The fla `GatedDeltaNetForCausalLM` state dict of an all-GDN natsl model (`fla_gdn_config_from(config)`)."""
    _check_all_gdn(config)
    return {key.replace(".attn.gates.", ".attn."): value for key, value in sd.items()}
