"""NAtSLConfig / NAtSLModel / NAtSLForCausalLM (spec §4) on CPU."""

import inspect

import pytest
import torch
from helpers import gen
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from natsl import NAtSLAttention, NAtSLConfig, NAtSLForCausalLM, NAtSLModel
from natsl.layers.baselines import LinearAttention, SoftmaxAttention
from natsl.models.configuration_natsl import ATTENTION_KEYS

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]
CPU = dict(linear_impl="torch", softmax_backend="sdpa")


def tiny(family="hybrid", **over):
    torch.manual_seed(0)
    return NAtSLForCausalLM(NAtSLConfig.preset("tiny", family, **{**CPU, **over})).eval()


def ids_of(B, T, seed=0, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=gen(seed))


def test_config_round_trip_and_save(tmp_path):
    c = NAtSLConfig.preset("tiny", "hybrid", router_budget=0.2, linear_backend="gla", use_rope=True)
    assert NAtSLConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    c.save_pretrained(tmp_path)
    c2 = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(c2, NAtSLConfig)
    drop = ("_name_or_path", "transformers_version")
    assert {k: v for k, v in c2.to_dict().items() if k not in drop} == \
        {k: v for k, v in c.to_dict().items() if k not in drop}


def test_config_validation():
    with pytest.raises(ValueError, match="layer_layout"):
        NAtSLConfig(num_hidden_layers=2, layer_layout=["natsl", "transformer"])
    with pytest.raises(ValueError, match="num_hidden_layers"):
        NAtSLConfig(num_hidden_layers=3, layer_layout=["natsl"])
    with pytest.raises(ValueError, match="size"):
        NAtSLConfig.preset("1b")
    with pytest.raises(ValueError, match="family"):
        NAtSLConfig.preset("tiny", "moe")
    with pytest.raises(ValueError, match="num_router_heads"):
        NAtSLForCausalLM(NAtSLConfig.preset("tiny", "natsl", num_router_heads=3))


def test_attention_kwargs_cover_the_layer_signature():
    params = set(inspect.signature(NAtSLAttention.__init__).parameters) - {"self", "layer_idx"}
    assert set(ATTENTION_KEYS) == params
    assert set(NAtSLConfig().attention_kwargs()) == params


def test_every_config_key_reaches_the_layer():
    vals = dict(num_heads=4, head_dim=8, expand_v=1.5, num_softmax_heads=8, num_router_heads=2, block_size=8,
                linear_backend="mamba2", softmax_backend="sdpa", linear_impl="torch", decay_through_softmax=False,
                router_sample="gumbel", router_temperature=0.5, router_grad="both", router_budget=0.3,
                router_budget_weight=0.7, router_budget_scope="head", use_rope=True, rope_theta=500.0, conv_size=3,
                norm_eps=1e-4)
    c = NAtSLConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, **vals)
    layer = NAtSLForCausalLM(c).model.layers[0].attn
    seen = {"router_sample": layer.router.sample, "router_temperature": layer.router.temperature,
            "conv_size": layer.q_conv1d.kernel_size[0], "expand_v": layer.head_v_dim / layer.head_dim}
    for k, v in vals.items():
        got = seen[k] if k in seen else getattr(layer, k)
        assert got == v, k
    assert layer.layer_idx == 0


def test_auto_registration():
    kw = {k: v for k, v in NAtSLConfig.preset("tiny", **CPU).to_dict().items() if k != "model_type"}
    c = AutoConfig.for_model("natsl", **kw)
    assert isinstance(c, NAtSLConfig)
    assert isinstance(AutoModelForCausalLM.from_config(c), NAtSLForCausalLM)
    assert isinstance(AutoModel.from_config(c), NAtSLModel)


@pytest.mark.parametrize("size,family,lo,hi", [("340m", "natsl", 370e6, 395e6), ("340m", "hybrid", 370e6, 390e6),
                                               ("760m", "natsl", 780e6, 820e6), ("760m", "hybrid", 780e6, 810e6)])
def test_preset_parameter_counts(size, family, lo, hi):
    c = NAtSLConfig.preset(size, family)
    with torch.device("meta"):
        n = sum(p.numel() for p in NAtSLForCausalLM(c).parameters())
    assert lo <= n <= hi, f"{size}/{family}: {n / 1e6:.1f}M"
    kinds = c.layer_layout
    if family == "hybrid":
        assert [i for i, k in enumerate(kinds) if k == "natsl"] == [3, 7, 11, 15, 19, 20] and len(kinds) == 21
    else:
        assert set(kinds) == {"natsl"}


def test_layout_builds_the_right_mixers():
    m = tiny("layer_hybrid", num_hidden_layers=4)
    kinds = [type(b.attn) for b in m.model.layers]
    assert kinds == [LinearAttention, LinearAttention, LinearAttention, SoftmaxAttention]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_forward_backward_every_backend(backend):
    m = tiny("hybrid", linear_backend=backend).train()
    ids = ids_of(2, 40)
    out = m(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    fr = m.softmax_fractions(out)
    assert list(fr) == [1] and fr[1].shape == (2,)


@pytest.mark.parametrize("family", ["natsl", "hybrid", "layer_hybrid", "softmax"])
def test_packed_equals_per_sequence(family):
    m = tiny(family)
    ids = ids_of(1, 50, seed=3)
    cu = torch.tensor([0, 17, 50])
    packed = m(ids, cu_seqlens=cu).logits
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(packed[:, s:e], m(ids[:, s:e]).logits, rtol=1e-4, atol=1e-5)
    pos = torch.cat([torch.arange(17), torch.arange(33)])[None]
    torch.testing.assert_close(m(ids, position_ids=pos).logits, packed)


def test_packed_loss_does_not_cross_sequences():
    m = tiny("natsl")
    ids = ids_of(1, 40, seed=4)
    cu = torch.tensor([0, 15, 40])
    loss = m(ids, labels=ids, cu_seqlens=cu).loss
    parts = [m(ids[:, s:e], labels=ids[:, s:e]).loss * (e - s - 1) for s, e in ((0, 15), (15, 40))]
    torch.testing.assert_close(loss, sum(parts) / 38)


def test_save_load_identical_logits(tmp_path):
    m = tiny("hybrid", linear_backend="gla")
    ids = ids_of(2, 33)
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(m2, NAtSLForCausalLM)
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_generate_greedy_equals_repeated_full_forward():
    m = tiny("hybrid")
    ids = ids_of(2, 13)
    out = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    cur = ids
    for _ in range(6):
        nxt = m(cur).logits[:, -1].argmax(-1, keepdim=True)
        cur = torch.cat([cur, nxt], 1)
    assert torch.equal(out, cur)


def test_padding_and_cache_are_rejected_clearly():
    m = tiny("natsl")
    ids = ids_of(2, 10)
    with pytest.raises(ValueError, match="padded"):
        m(ids, attention_mask=torch.tensor([[1] * 10, [0] * 2 + [1] * 8]))
    with pytest.raises(ValueError, match="cache"):  # packed prompts cannot start an inference cache
        m(ids[:1], use_cache=True, cu_seqlens=torch.tensor([0, 4, 10]))
    torch.testing.assert_close(m(ids, attention_mask=torch.ones(2, 10)).logits, m(ids).logits)


def test_router_budget_adds_to_the_loss():
    m = tiny("natsl", router_budget=0.1, router_budget_weight=3.0)
    ids = ids_of(2, 40)
    out = m(ids, labels=ids)
    assert out.router_aux_loss is not None and out.router_aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_aux_loss)


@pytest.mark.parametrize("family", ["hybrid", "softmax"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Activation checkpointing per block: the same loss and every parameter gradient (the router-budget term's
    too), and the checkpointed blocks are recomputed in the backward."""
    torch.manual_seed(0)
    config = NAtSLConfig.preset("tiny", family, router_budget=0.3, linear_impl="torch")
    model = NAtSLForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, ref = grads()
    calls = []
    hook = model.model.layers[0].attn.register_forward_hook(lambda *a: calls.append(1))
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_ckpt, got = grads()
    hook.remove()
    assert len(calls) == 2, "the first block's mixer should run again in the backward"
    torch.testing.assert_close(loss_ckpt, loss)
    assert set(got) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)
