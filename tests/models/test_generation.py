"""Inference cache (spec §1.8) on CPU: prefill + decoding reproduce the full forward, several prefills equal one,
`generate()` with the cache equals repeated full forwards, the cache holds exactly the softmax-routed K/V.

Torch paths (linear_impl="torch", softmax_backend="sdpa"), float64 models with enlarged random weights so that the
router mixes both block types, differently per batch row and router head.
"""

import functools

import pytest
import torch
from helpers import gen
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import DynamicCache

from natsl import NAtSLAttention, NAtSLConfig, NAtSLForCausalLM
from natsl.layers.state import NAtSLLayerState, layer_state
from natsl.models.cache import NAtSLCache

BACKENDS = ["gdn", "deltanet", "gla", "mamba2", "linear_attn"]
CPU = dict(linear_impl="torch", softmax_backend="sdpa")
LAYER = dict(hidden_size=32, num_heads=2, head_dim=8, expand_v=2, num_softmax_heads=4, num_router_heads=2,
             block_size=8, **CPU)
C_LAYER = LAYER["block_size"]
C_TINY = 16  # block size of the tiny preset


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1, router_scale: float = 3.0):
    with torch.no_grad():
        for name, p in module.named_parameters():
            s = router_scale if "router" in name else scale
            p.add_(torch.randn(p.shape, generator=gen(seed + p.numel()), dtype=p.dtype) * s)
    return module


@functools.cache
def tiny(family: str = "natsl", backend: str = "gdn", **over) -> NAtSLForCausalLM:
    torch.manual_seed(0)
    layers = {"layer_hybrid": 4}.get(family, 2)
    cfg = NAtSLConfig.preset("tiny", family, linear_backend=backend, num_hidden_layers=layers, **{**CPU, **over})
    return _perturb(NAtSLForCausalLM(cfg).double(), seed=1).eval()


@functools.cache
def natsl_layer(backend: str, decay_through_softmax: bool = True, use_rope: bool = False) -> NAtSLAttention:
    torch.manual_seed(0)
    layer = NAtSLAttention(**LAYER, linear_backend=backend, decay_through_softmax=decay_through_softmax,
                           use_rope=use_rope).double()
    return _perturb(layer, seed=2, scale=0.3).eval()


def ids_of(B, T, seed):
    return torch.randint(1, 256, (B, T), generator=gen(seed))  # no pad token (0): generate() would mask it


def chunks_of(T: int, cuts, decode: int):
    """Chunk bounds: prefills split at `cuts` over `[0, T - decode)`, then `decode` single tokens."""
    head = T - decode
    bounds = sorted({0, head, *[c for c in cuts if 0 < c < head]})
    return list(zip(bounds[:-1], bounds[1:])) + [(t, t + 1) for t in range(head, T)]


def run_layer_chunks(layer, x, chunks):
    state, outs = None, []
    for a, b in chunks:
        o, _, state = layer(x[:, a:b], past_key_values=state, use_cache=True)
        outs.append(o)
    return torch.cat(outs, 1), state


def run_model_chunks(model, ids, chunks):
    cache, outs = None, []
    for a, b in chunks:
        out = model(ids[:, a:b], cache=cache, use_cache=True)
        cache = out.cache
        outs.append(out.logits)
    return torch.cat(outs, 1), cache


split_points = st.lists(st.integers(1, 63), max_size=3)


LAYER_CASES = [(b, {}) for b in BACKENDS] + [(b, dict(decay_through_softmax=False)) for b in ("gdn", "gla", "mamba2")] \
    + [("gdn", dict(use_rope=True))]


@pytest.mark.parametrize("backend,options", LAYER_CASES,
                         ids=[b + "".join(f"-{k}={v}" for k, v in o.items()) for b, o in LAYER_CASES])
@given(B=st.integers(2, 3), T=st.integers(1, 30), cuts=split_points, decode=st.integers(0, 8),
       seed=st.integers(0, 2**16))
@example(B=2, T=30, cuts=[3], decode=0, seed=0)  # the first prefill ends inside a block, the second spans blocks
@example(B=2, T=30, cuts=[8, 16, 25], decode=4, seed=1)  # prefills at block boundaries, then one ending inside
@example(B=3, T=18, cuts=[], decode=18, seed=2)  # decoding only, across block completions
def test_layer_prefill_and_decode_equal_full_forward(backend, options, B, T, cuts, decode, seed):
    layer = natsl_layer(backend, **options)
    x = torch.randn(B, T, LAYER["hidden_size"], generator=gen(seed), dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)[0]
        out, state = run_layer_chunks(layer, x, chunks_of(T, cuts, min(decode, T)))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert state.seen_tokens == T
    assert int(state.lengths.max()) <= state.capacity - C_LAYER


@pytest.mark.parametrize("family,backend", [("hybrid", b) for b in BACKENDS]
                         + [("natsl", "gdn"), ("layer_hybrid", "gdn"), ("softmax", "gdn")])
@given(T=st.integers(1, 40), cuts=split_points, decode=st.integers(0, 6), seed=st.integers(0, 2**16))
@example(T=40, cuts=[20], decode=3, seed=0)  # prefill ends inside block 1, second prefill spans blocks 1-2
@example(T=36, cuts=[16, 32], decode=2, seed=1)
def test_model_prefill_and_decode_equal_full_forward(family, backend, T, cuts, decode, seed):
    model = tiny(family, backend)
    ids = ids_of(2, T, seed)
    with torch.no_grad():
        ref = model(ids).logits
        out, cache = run_model_chunks(model, ids, chunks_of(T, cuts, min(decode, T)))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert cache.get_seq_length() == T


@pytest.mark.parametrize("backend", ["gdn", "gla"])
def test_several_prefills_then_decode_equal_one_prefill(backend):
    model = tiny("hybrid", backend)
    ids = ids_of(3, 60, seed=5)
    with torch.no_grad():
        one, c1 = run_model_chunks(model, ids, [(0, 45)] + [(t, t + 1) for t in range(45, 60)])
        many, c2 = run_model_chunks(model, ids, [(0, 7), (7, 16), (16, 17), (17, 38), (38, 45)]
                                    + [(t, t + 1) for t in range(45, 60)])
    torch.testing.assert_close(many, one, rtol=1e-9, atol=1e-10)
    for s1, s2 in zip(c1.layers, c2.layers):
        if isinstance(s1, NAtSLLayerState):
            assert torch.equal(s1.lengths, s2.lengths)
            torch.testing.assert_close(s2.linear_start, s1.linear_start)
            torch.testing.assert_close(s2.linear_run, s1.linear_run)


@pytest.mark.parametrize("chunk", [16, 7])
def test_chunked_prefill_equals_one_call(chunk):
    """`config.prefill_chunk_size`: a long prompt runs through the cache in pieces (inside `forward`) and gives the
    one-call prefill's logits, hidden states, cache and the routed fraction (weighted over the pieces)."""
    model = tiny("hybrid", "gdn")
    ids = ids_of(2, 48, seed=9)  # 3 whole blocks of the tiny preset
    with torch.no_grad():
        one = model(ids, use_cache=True, output_hidden_states=True)
        model.config.prefill_chunk_size = chunk
        try:
            many = model(ids, use_cache=True, output_hidden_states=True)
            step_one = model(ids[:, :1], cache=one.cache).logits
            step_many = model(ids[:, :1], cache=many.cache).logits
        finally:
            model.config.prefill_chunk_size = None
    torch.testing.assert_close(many.logits, one.logits, rtol=1e-9, atol=1e-10)
    for a, b in zip(many.hidden_states, one.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(step_many, step_one, rtol=1e-9, atol=1e-10)
    assert many.cache.get_seq_length() == 49 and [s is None for s in many.routing_stats] == \
        [s is None for s in one.routing_stats]
    for s1, s2 in zip(one.cache.layers, many.cache.layers):
        if isinstance(s1, NAtSLLayerState):
            assert torch.equal(s1.lengths, s2.lengths)
    if chunk == 16:  # pieces = blocks: the fraction weighted over the pieces is the one-call fraction
        for a, b in zip(many.routing_stats, one.routing_stats):
            if b is not None:
                torch.testing.assert_close(a.softmax_fraction, b.softmax_fraction)


def test_prefill_chunk_size_is_checked():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        NAtSLConfig.preset("tiny", "natsl", prefill_chunk_size=0)


def test_routing_is_mixed_per_batch_row_and_router_head():
    """The fixtures exercise what the cache must handle: per-(batch, router head) lengths that differ."""
    model = tiny("natsl", "gdn")
    with torch.no_grad():
        _, cache = run_model_chunks(model, ids_of(3, 8 * C_TINY, seed=7), [(0, 8 * C_TINY)])
    lengths = torch.stack([s.lengths for s in cache.layers])  # [layers, B, Hr]
    assert 0 < lengths.sum() < lengths.numel() * 8 * C_TINY
    assert len(set(lengths.flatten().tolist())) > 2


@pytest.mark.parametrize("family", ["natsl", "hybrid", "layer_hybrid"])
def test_generate_greedy_with_cache_equals_repeated_full_forward(family):
    model = tiny(family, "gdn")
    ids = ids_of(2, 13, seed=3)
    new = 2 * C_TINY + 5  # crosses two block completions while decoding
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        cur = ids
        for _ in range(new):
            cur = torch.cat([cur, model(cur).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, cur)
    res = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(res.cache, NAtSLCache) and res.cache.get_seq_length() == 13 + 3 - 1


def test_cache_memory_equals_the_routing():
    """Softmax K/V bytes = committed softmax blocks × block_size × heads × (d_ka + d_va) × bytes; linear states
    do not grow with T; a plain softmax layer holds all T rows."""
    model = tiny("natsl", "gdn")
    cfg = model.config
    B, N, extra = 2, 6, 5
    T = N * C_TINY
    ids = ids_of(B, T + extra, seed=11)
    with torch.no_grad():
        stats = model(ids[:, :T]).routing_stats
        _, cache = run_model_chunks(model, ids, [(0, 20), (20, T)] + [(t, t + 1) for t in range(T, T + extra)])
    report = cache.memory_report()
    d_ka = cfg.num_heads * cfg.head_dim // cfg.num_softmax_heads
    d_va = cfg.num_heads * int(cfg.head_dim * cfg.expand_v) // cfg.num_softmax_heads
    G = cfg.num_softmax_heads // cfg.num_router_heads
    expected = []
    for s in stats:
        blocks = (s.softmax_fraction.double() * B * N).round().sum().item()
        expected.append(int(blocks) * C_TINY * G * (d_ka + d_va) * 8)
    assert [r["softmax_kv_bytes"] for r in report["layers"]] == expected
    assert report["softmax_kv_bytes"] == sum(expected)
    assert 0 < sum(expected) < len(stats) * B * T * cfg.num_softmax_heads * (d_ka + d_va) * 8
    S_bytes = B * cfg.num_heads * cfg.head_dim * int(cfg.head_dim * cfg.expand_v) * 8
    assert all(r["linear_state_bytes"] == 2 * S_bytes + B * cfg.num_heads * 8 for r in report["layers"])
    assert report["softmax_kv_allocated_bytes"] >= report["softmax_kv_bytes"]

    lh = tiny("layer_hybrid", "gdn")
    with torch.no_grad():
        _, c = run_model_chunks(lh, ids, [(0, 37), (37, 38)])
    soft = [r for r in c.memory_report()["layers"] if r["kind"] == "SoftmaxLayerState"]
    assert [r["full_kv_bytes"] for r in soft] == [B * 38 * lh.config.hidden_size * 2 * 8]


def test_reorder_cache_selects_batch_rows():
    model = tiny("hybrid", "gdn")
    ids = ids_of(3, 30, seed=4)
    idx = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, cache = run_model_chunks(model, ids[:, :29], [(0, 29)])
        cache.reorder_cache(idx)
        step = model(ids[idx, 29:30], cache=cache).logits
        ref = model(ids[idx]).logits[:, -1:]
    torch.testing.assert_close(step, ref, rtol=1e-9, atol=1e-10)


def test_padding_and_packed_prompts_are_rejected():
    model = tiny("hybrid", "gdn")
    ids = ids_of(2, 10, seed=0)
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 7, [1] * 10]), max_new_tokens=2,
                       pad_token_id=0)
    with pytest.raises(ValueError, match="packed"):
        model.generate(ids[:1], cu_seqlens=torch.tensor([0, 4, 10]), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="packed"):
        model(ids[:1], use_cache=True, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
    with pytest.raises(TypeError, match="NAtSLCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="batch"), torch.no_grad():
        cache = model(ids, use_cache=True).cache
        model(ids[:1, :1], cache=cache)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(1)


def test_layer_state_lookup():
    layer = natsl_layer("gdn")
    st_ = NAtSLLayerState(block_size=C_LAYER, num_router_heads=2)
    assert layer_state(st_, 0, NAtSLLayerState) is st_
    cache = NAtSLCache()
    a = layer_state(cache, 3, NAtSLLayerState, block_size=C_LAYER, num_router_heads=2)
    assert layer_state(cache, 3, NAtSLLayerState) is a and len(cache.layers) == 4
    with pytest.raises(TypeError, match="natsl cache"):
        layer_state(DynamicCache(), 0, NAtSLLayerState)
    x = torch.randn(2, 5, LAYER["hidden_size"], dtype=torch.float64, generator=gen(0))
    with torch.no_grad():
        _, _, new = layer(x, use_cache=True)
    assert isinstance(new, NAtSLLayerState) and new.seen_tokens == 5 and new.block_pos == 5


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("seed", range(4))
def test_whole_blocks_write_only_their_softmax_blocks(monkeypatch, seed, impl):
    """`NAtSLLayerState._write_blocks` (a prefill chunk's whole blocks), by the block-copy kernel (under the
    interpreter) and by its PyTorch twin: each pair's softmax blocks land in order after its committed rows, and
    every row outside them and the one free block after them keeps its content (the kernel's: that block too), in a
    tight storage (the capacity `_reserve` leaves after a sync: the largest new length + one block)."""
    import natsl.kernels.gather_scatter as gs

    if impl == "twin":
        monkeypatch.setattr(gs, "uses_triton", lambda t: False)
    gn = gen(seed)
    B, Hr, G, C, d, dv, n = 2, 3, 2, 4, 5, 3, 6
    H_A = Hr * G
    st = NAtSLLayerState(block_size=C, num_router_heads=Hr)
    old = C * torch.randint(0, 5, (B, Hr), generator=gn)
    soft = torch.rand(B, Hr, n, generator=gn) < 0.5
    soft[0, 0] = True  # a pair that takes every block
    added = soft.sum(-1)
    new = old + C * added
    cap = int(new.max()) + C
    st.k_rows = torch.randn(B, H_A, cap, d, generator=gn, dtype=torch.float64)
    st.v_rows = torch.randn(B, H_A, cap, dv, generator=gn, dtype=torch.float64)
    st.lengths = old
    k = torch.randn(B, n * C, H_A, d, generator=gn, dtype=torch.float64)
    v = torch.randn(B, n * C, H_A, dv, generator=gn, dtype=torch.float64)
    k_before, v_before = st.k_rows.clone(), st.v_rows.clone()
    st._write_blocks(k, v, soft, added)
    for b in range(B):
        for a in range(H_A):
            r = a // G
            blocks = [j for j in range(n) if soft[b, r, j]]
            for rows, before, x in ((st.k_rows, k_before, k), (st.v_rows, v_before, v)):
                want = before[b, a].clone()
                if blocks:
                    want[old[b, r]:new[b, r]] = torch.cat([x[b, j * C:(j + 1) * C, a] for j in blocks])
                if impl == "twin":  # the free block after the new rows: unspecified
                    free = slice(new[b, r], new[b, r] + C)
                    want[free] = rows[b, a, free]
                assert torch.equal(rows[b, a], want), (b, a)


def test_storage_is_sized_from_the_early_read(monkeypatch):
    """A prefill chunk that completes blocks reads the lengths it will need once, before it queues its branches
    (`lengths_hint`, a copy that does not wait for the branches on a GPU): the value covers both the rest of the
    current block and the whole blocks, and the commits size the storage from it without reading `lengths`."""
    import natsl.layers.state as state_mod

    reads = []

    class Recorded(state_mod.EarlyRead):
        def __init__(self, x):
            super().__init__(x)
            reads.append(self)

    monkeypatch.setattr(state_mod, "EarlyRead", Recorded)
    slow = []  # (hint given) for every `_reserve` that had to read a bound on the host
    reserve = NAtSLLayerState._reserve

    def recorded_reserve(self, lengths_after, bound_after, bound_hint=None):
        if not self._fits(bound_after):
            slow.append(bound_hint is not None)
        return reserve(self, lengths_after, bound_after, bound_hint)

    monkeypatch.setattr(NAtSLLayerState, "_reserve", recorded_reserve)
    layer = natsl_layer("gdn")
    st = NAtSLLayerState(block_size=C_LAYER, num_router_heads=LAYER["num_router_heads"])
    x = torch.randn(2, 5 * C_LAYER + 3, LAYER["hidden_size"], dtype=torch.float64, generator=gen(4))
    with torch.no_grad():
        layer(x[:, :3], past_key_values=st, use_cache=True)  # inside the first block: nothing completes
        assert not reads
        layer(x[:, 3:], past_key_values=st, use_cache=True)  # completes block 0, then 4 whole blocks
    assert slow and all(slow), "the storage was sized by reading lengths on the host, not from the early read"
    assert len(reads) == 1 and reads[0].value() == int(st.lengths.max())
    assert st.length_bound == int(st.lengths.max()) and st.capacity >= st.length_bound + C_LAYER


def test_commit_takes_the_bound_hint():
    """`commit` with a hint above the real lengths sizes the storage from the hint (the host never reads `lengths`)."""
    from natsl.layers.state import EarlyRead

    C, Hr = 4, 2
    st = NAtSLLayerState(block_size=C, num_router_heads=Hr)
    st.initialize(torch.zeros(1, 1, Hr, 3), torch.zeros(1, 1, Hr, 2), torch.zeros(1, Hr, 3, 2), torch.zeros(1, 5),
                  None)
    st.seen_tokens = C  # one completed block
    st.commit(torch.tensor([[True, False]]), bound_hint=EarlyRead(torch.tensor(5 * C)))
    assert st.length_bound == 5 * C and st.capacity >= 6 * C
    assert st.lengths.tolist() == [[C, 0]]
    # storage that already fits the blocks (the host bound says so) needs no early read
    st.reserve(4 * C)  # room for 4 more blocks, whatever their routing
    assert st.lengths_hint(torch.ones(1, 4, Hr, dtype=torch.bool)) is None
    assert st.lengths_hint(torch.ones(1, 5, Hr, dtype=torch.bool)) is not None


@pytest.mark.parametrize("family", ["hybrid", "layer_hybrid"])
def test_cache_after_a_prefill_holds_no_views_of_activations(family):
    """Every tensor a layer state keeps after a prefill owns its storage: none is a slice of a chunk-sized
    activation (which would keep all of it alive: the convolution states once did, ~0.8 GB per layer at 128k)."""
    model = tiny(family)
    T = 3 * model.config.block_size + 5
    cache = NAtSLCache()
    with torch.no_grad():
        model(input_ids=ids_of(2, T, 3), past_key_values=cache, use_cache=True)
    held = []
    for i, s in enumerate(cache.layers):
        for name, val in vars(s).items():
            items = val.items() if isinstance(val, dict) else [("", val)]
            held += [(i, f"{name}{'.' + k if k else ''}", x) for k, x in items if isinstance(x, torch.Tensor)]
    assert held
    for i, name, x in held:
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size(), (i, name, tuple(x.shape))
