"""`GraphDecoder` (natsl.models.graphs) on CPU: replaying one recorded decode step inside blocks gives the logits of
eager decoding, through block commits, K/V growth of natsl and softmax layers, every linear backend and RoPE.

Capture is emulated by `helpers.TracedCapture` (make_fx: host values are baked in, state tensors are used by
reference), which fails the comparison wherever a replayed step depended on a host value that changed since capture.
The real CUDA-graph path runs in tests/gpu/test_generation_gpu.py.
"""

import pytest
import torch
from helpers import TracedCapture, gen

from natsl import NAtSLConfig, NAtSLForCausalLM
from natsl.models.cache import NAtSLCache
from natsl.models.graphs import GraphDecoder

CPU = dict(linear_impl="torch", softmax_backend="sdpa")
LAYOUT = ["natsl", "linear", "softmax"]


def model_of(backend: str, **over) -> NAtSLForCausalLM:
    torch.manual_seed(0)
    cfg = NAtSLConfig.preset("tiny", "natsl", linear_backend=backend, num_hidden_layers=3, layer_layout=LAYOUT,
                             **{**CPU, **over})
    model = NAtSLForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # routers mix both block types, per batch row and head
            p.add_(torch.randn(p.shape, generator=gen(p.numel()), dtype=p.dtype) * (3.0 if "router" in name else 0.1))
    return model


def decode_both(model, B: int, prompt: int, steps: int, seed: int = 0, reserve: bool = False):
    """Logits of `steps` decode steps after a `prompt`-token prefill: eagerly, and through `GraphDecoder` (with the
    graph cache's storage reserved for the steps if `reserve`)."""
    ids = torch.randint(1, 256, (B, prompt + steps), generator=gen(seed))
    eager_cache, graph_cache = NAtSLCache(), NAtSLCache()
    decoder = GraphDecoder(model, capture=TracedCapture())
    with torch.no_grad():
        model(ids[:, :prompt], cache=eager_cache)
        model(ids[:, :prompt], cache=graph_cache)
        if reserve:
            graph_cache.reserve(steps)
        ref = [model(ids[:, t:t + 1], cache=eager_cache).logits for t in range(prompt, prompt + steps)]
        out = [decoder.step(ids[:, t:t + 1], graph_cache) for t in range(prompt, prompt + steps)]
    return torch.cat(ref, 1), torch.cat(out, 1), decoder, eager_cache, graph_cache


@pytest.mark.parametrize("backend", ["gdn", "deltanet", "gla", "mamba2", "linear_attn"])
def test_replayed_steps_equal_eager_decoding(backend):
    C = NAtSLConfig.preset("tiny").block_size
    prompt, steps = C + 5, 3 * C + 7  # starts inside a block, crosses three commits and K/V growth
    ref, out, decoder, eager_cache, graph_cache = decode_both(model_of(backend), 2, prompt, steps)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the first step (warm-up) and the steps that grow a K/V buffer ran eagerly; most steps replayed, block
    # completions included
    assert decoder.eager_steps + decoder.captures + decoder.replays == steps
    assert decoder.eager_steps >= 2 and decoder.replays > steps // 2 and decoder.captures >= 2
    natsl_eager, natsl_graph = eager_cache.layers[0], graph_cache.layers[0]
    assert natsl_graph.seen_tokens == natsl_eager.seen_tokens == prompt + steps
    assert int(natsl_graph.position) == prompt + steps
    assert torch.equal(natsl_graph.lengths, natsl_eager.lengths)
    assert 0 < int(natsl_eager.lengths.sum()) < natsl_eager.lengths.numel() * (prompt + steps)  # routing is mixed


@pytest.mark.parametrize("backend", ["gdn", "mamba2"])
def test_block_completing_step_is_replayed(backend):
    """With the storage reserved, every step after the warm-ups replays one of two captured steps, the one inside a
    block or the one that completes it (router decision, commit or drop of the block's K/V, state update): equal to
    eager decoding, and the storage never grows."""
    C = NAtSLConfig.preset("tiny").block_size
    prompt, steps = C + 5, 4 * C + 3
    ref, out, decoder, eager_cache, graph_cache = decode_both(model_of(backend), 2, prompt, steps, reserve=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # one eager warm-up per kind of step, one capture per kind, every other step replayed
    assert (decoder.eager_steps, decoder.captures, decoder.replays) == (2, 2, steps - 4)
    natsl_eager, natsl_graph = eager_cache.layers[0], graph_cache.layers[0]
    assert torch.equal(natsl_graph.lengths, natsl_eager.lengths)
    assert natsl_graph.length_bound >= int(natsl_graph.lengths.max())
    assert 0 < int(natsl_eager.lengths.sum()) < natsl_eager.lengths.numel() * (prompt + steps)  # routing is mixed


def test_reserve_keeps_the_storage():
    """`NAtSLCache.reserve(n)`: decoding n more tokens grows no K/V buffer, whatever the routing."""
    model = model_of("gla")
    C = NAtSLConfig.preset("tiny").block_size
    cache = NAtSLCache()
    ids = torch.randint(1, 256, (2, 3 * C + 7), generator=gen(6))
    with torch.no_grad():
        model(ids[:, :7], cache=cache)
        cache.reserve(3 * C)
        buffers = [(st.k_rows, st.v_rows) for st in cache.layers if hasattr(st, "k_rows")]
        for t in range(7, 3 * C + 7):
            model(ids[:, t:t + 1], cache=cache)
    assert all(st.k_rows is k and st.v_rows is v for st, (k, v) in
               zip([st for st in cache.layers if hasattr(st, "k_rows")], buffers))
    with pytest.raises(ValueError, match="tokens"):
        cache.reserve(-1)


def test_rope_and_no_decay_through_softmax():
    C = NAtSLConfig.preset("tiny").block_size
    model = model_of("gdn", use_rope=True, decay_through_softmax=False)
    ref, out, decoder, _, _ = decode_both(model, 1, 3, 2 * C, seed=1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert decoder.eager_steps + decoder.captures + decoder.replays == 2 * C and decoder.replays >= C // 2


def test_generate_is_greedy_decoding():
    model = model_of("gdn")
    ids = torch.randint(1, 256, (2, 9), generator=gen(3))
    out = GraphDecoder(model, capture=TracedCapture()).generate(ids, 40)
    with torch.no_grad():
        cache, ref = NAtSLCache(), [ids]
        logits = model(ids, cache=cache).logits
        for _ in range(40):
            ref.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = model(ref[-1], cache=cache).logits
    assert torch.equal(out, torch.cat(ref, 1))


def test_generate_samples_like_eager_decoding():
    """Sampling (temperature, top-k, top-p) with a seeded generator draws the tokens of the same sampling on eager
    decoding; an end-of-sequence token repeats once a row has produced it."""
    from natsl.models.graphs import next_token

    model = model_of("mamba2")
    ids = torch.randint(1, 256, (2, 9), generator=gen(3))
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    out = GraphDecoder(model, capture=TracedCapture()).generate(ids, 40, generator=gen(11), **kw)
    g = gen(11)
    with torch.no_grad():
        cache, ref = NAtSLCache(), [ids]
        logits = model(ids, cache=cache).logits
        for _ in range(40):
            ref.append(next_token(logits[:, -1], generator=g, **kw))
            logits = model(ref[-1], cache=cache).logits
    ref = torch.cat(ref, 1)
    assert torch.equal(out, ref)
    assert not torch.equal(ref[:, 9:], GraphDecoder(model, capture=TracedCapture()).generate(ids, 40)[:, 9:])
    eos = int(out[0, 12])
    out_eos = GraphDecoder(model, capture=TracedCapture()).generate(ids, 40, generator=gen(11), eos_token_id=eos, **kw)
    first = int((out_eos[0, 9:] == eos).nonzero()[0])
    assert (out_eos[0, 9 + first:] == eos).all()


def test_next_token_filters():
    from natsl.models.graphs import next_token

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert int(next_token(logits)) == 3
    for _ in range(20):  # top-k 2 keeps tokens 2 and 3; top-p 0.5 keeps token 3 only (p = 0.64)
        assert int(next_token(logits, True, top_k=2, generator=gen(_))) in (2, 3)
        assert int(next_token(logits, True, top_p=0.5, generator=gen(_))) == 3


def test_bad_input_is_rejected():
    model = model_of("gdn")
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model)
    decoder = GraphDecoder(model, capture=TracedCapture())
    with pytest.raises(ValueError, match="empty"):
        decoder.step(torch.ones(1, 1, dtype=torch.long), NAtSLCache())
    with pytest.raises(ValueError, match="input_ids"):
        decoder.step(torch.ones(1, 2, dtype=torch.long), NAtSLCache())
    with pytest.raises(TypeError, match="NAtSLCache"):
        decoder.step(torch.ones(1, 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(torch.ones(1, 1, dtype=torch.long), -1)
    for kw, name in ((dict(temperature=0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=name):
            decoder.generate(torch.ones(1, 1, dtype=torch.long), 2, do_sample=True, **kw)
    model.train()
    cache = NAtSLCache()
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="eval"):
        decoder.step(torch.ones(1, 1, dtype=torch.long), cache)
    model.eval()


def test_cache_changed_between_steps():
    """A beam-style reorder and an eager call on the cache between decoder steps are seen by the next replay."""
    model = model_of("gla")
    C = NAtSLConfig.preset("tiny").block_size
    ids = torch.randint(1, 256, (2, 4 * C), generator=gen(4))
    perm = torch.tensor([1, 0])
    eager_cache, graph_cache = NAtSLCache(), NAtSLCache()
    decoder = GraphDecoder(model, capture=TracedCapture())
    ref, out = [], []
    with torch.no_grad():
        for cache, run, logits in ((eager_cache, lambda i, c: model(i, cache=c).logits, ref),
                                   (graph_cache, decoder.step, out)):
            model(ids[:, :C + 2], cache=cache)
            for t in range(C + 2, 2 * C + 20):
                if t == C + 10:
                    cache.reorder_cache(perm)
                if t == C + 30:  # an eager call from outside the decoder
                    logits.append(model(ids[:, t:t + 1], cache=cache).logits)
                    continue
                logits.append(run(ids[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(out, 1), torch.cat(ref, 1), rtol=1e-10, atol=1e-10)
    assert decoder.replays > C // 2


def _graph_path(monkeypatch):
    """Let `NAtSLForCausalLM.generate` take its CUDA-graph path on the CPU (emulated capture); count its replays."""
    import natsl.models.graphs as graphs
    import natsl.models.modeling_natsl as modeling

    calls = []
    real = graphs.GraphDecoder.generate

    def counted(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(self.replays)
        return out

    monkeypatch.setattr(modeling, "_graph_decoder", lambda model: GraphDecoder(model, capture=TracedCapture()))
    monkeypatch.setattr(graphs.GraphDecoder, "generate", counted)
    return calls


def test_transformers_generate_replays_graphs_for_greedy_search(monkeypatch):
    """`model.generate()` (greedy, `max_new_tokens`) replays GraphDecoder's steps and returns transformers' own greedy
    output, end-of-sequence handling included (pad after a row's end, stop when every row has ended)."""
    from transformers import GenerationMixin

    model = model_of("gdn")
    ids = torch.randint(1, 256, (2, 9), generator=gen(3))
    ref = GenerationMixin.generate(model, ids, max_new_tokens=40, do_sample=False)
    calls = _graph_path(monkeypatch)
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert len(calls) == 1 and calls[0] > 20
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=40), ref)
    # an end-of-sequence token that one row produces early and the other later (or never)
    eos = int(ref[0, 9 + 5])
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref_eos = GenerationMixin.generate(model, ids, **kw)
    out_eos = model.generate(ids, **kw)
    assert torch.equal(out_eos, ref_eos)
    assert (out_eos[0, 9 + 6:] == 0).all()
    # both rows end: transformers stops early, and so does the graph path's output
    both = [int(ref[0, 9 + 3]), int(ref[1, 9 + 7])]
    ref_both = GenerationMixin.generate(model, ids, max_new_tokens=40, eos_token_id=both, pad_token_id=0)
    assert ref_both.shape[1] < ids.shape[1] + 40
    assert torch.equal(model.generate(ids, max_new_tokens=40, eos_token_id=both, pad_token_id=0), ref_both)


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_k=5), dict(num_beams=2), dict(repetition_penalty=1.3),
                                dict(return_dict_in_generate=True), dict(eos_token_id=3)], ids=str)
def test_transformers_generate_keeps_its_own_loop_for_other_options(monkeypatch, kw):
    """Sampling, beams, logits processors, dict outputs, and an end-of-sequence token without a pad token run
    transformers' loop (and keep working)."""
    model = model_of("gdn")
    ids = torch.randint(1, 256, (2, 9), generator=gen(3))
    calls = _graph_path(monkeypatch)
    out = model.generate(ids, max_new_tokens=6, **kw)
    assert not calls
    seqs = out.sequences if hasattr(out, "sequences") else out
    assert seqs.shape[0] == 2 and seqs.shape[1] <= 9 + 6 and torch.equal(seqs[:, :9], ids)
