"""Block layout and packed-index metadata (`natsl.kernels.index`) against plain Python loops."""

import pytest
import torch
from helpers import gen
from hypothesis import given, settings
from hypothesis import strategies as st

from natsl.kernels.index import (
    block_layout,
    nonzero_static,
    num_blocks,
    softmax_blocks,
    token_destination,
    token_routes,
    token_source_rows,
)


def loop_layout(T, C, seq_lens):
    """Per block `(start, len, seq, first)` and per token its block, by walking the sequences."""
    blocks, token_block = [], []
    start = 0
    for s, n in enumerate(seq_lens):
        for j, b0 in enumerate(range(start, start + n, C)):
            blen = min(C, start + n - b0)
            token_block += [len(blocks)] * blen
            blocks.append((b0, blen, s, j == 0))
        start += n
    assert start == T
    return blocks, token_block


def draw_case(data, packed):
    C = data.draw(st.sampled_from([1, 4, 16, 64]), label="C")
    if packed:
        seq_lens = data.draw(st.lists(st.integers(1, 150), min_size=1, max_size=4), label="seq_lens")
        T, B = sum(seq_lens), 1
        cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=data.draw(
            st.sampled_from([torch.int32, torch.int64]), label="cu_dtype"))
    else:
        T = data.draw(st.integers(1, 300), label="T")
        B, seq_lens, cu = data.draw(st.integers(1, 3), label="B"), [T], None
    return B, T, C, seq_lens, cu


@settings(deadline=None)
@given(data=st.data(), packed=st.booleans())
def test_block_layout_matches_loop(data, packed):
    _, T, C, seq_lens, cu = draw_case(data, packed)
    blocks, token_block = loop_layout(T, C, seq_lens)
    lay = block_layout(T, C, cu)
    assert lay.N == len(blocks) == num_blocks(T, C, cu)
    assert lay.token_block.tolist() == token_block
    assert lay.block_start.tolist() == [b[0] for b in blocks]
    assert lay.block_len.tolist() == [b[1] for b in blocks]
    assert lay.block_seq.tolist() == [b[2] for b in blocks]
    assert lay.block_first.tolist() == [b[3] for b in blocks]
    assert lay.token_seq.tolist() == [s for s, n in enumerate(seq_lens) for _ in range(n)]
    assert block_layout(T, C, cu, N=lay.N).block_start.tolist() == lay.block_start.tolist()


@settings(deadline=None)
@given(data=st.data(), packed=st.booleans(), Hr=st.integers(1, 3), p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_softmax_blocks_and_token_indices_match_loop(data, packed, Hr, p, seed):
    B, T, C, seq_lens, cu = draw_case(data, packed)
    lay = block_layout(T, C, cu)
    soft = torch.rand(B, lay.N, Hr, generator=gen(seed)) < p
    blocks_loop, token_block = loop_layout(T, C, seq_lens)

    # the packed softmax layout: pairs (b, r) in row-major order, their softmax blocks in increasing order
    sel = [(b, r, n) for b in range(B) for r in range(Hr) for n in range(lay.N) if soft[b, n, r]]
    blocks = softmax_blocks(soft, lay)
    assert list(zip(blocks.batch.tolist(), blocks.head.tolist(), blocks.block.tolist())) == sel
    counts = [[sum(1 for s in sel if s[:2] == (b, r)) for r in range(Hr)] for b in range(B)]
    assert blocks.counts.tolist() == counts
    tok = [sum(blocks_loop[n][1] for (bb, rr, n) in sel if (bb, rr) == (b, r)) for b in range(B) for r in range(Hr)]
    assert blocks.cu_tokens.tolist() == [sum(tok[:i]) for i in range(len(tok) + 1)]
    assert blocks.cu_blocks.tolist() == [sum(sum(counts, [])[:i]) for i in range(B * Hr + 1)]
    lens = [blocks_loop[n][1] for (_, _, n) in sel]
    assert blocks.cu_block_tokens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]

    # tokens packed in (b, r, t) order; dest and src are inverse to each other
    order = [(b, r, t) for b in range(B) for r in range(Hr) for t in range(T) if soft[b, token_block[t], r]]
    mask = soft[:, lay.token_block]
    dest = token_destination(mask, blocks.cu_tokens)
    src = token_source_rows(mask)
    expect_dest = torch.full((B, T, Hr), -1, dtype=torch.long)
    for s, (b, r, t) in enumerate(order):
        expect_dest[b, t, r] = s
    assert torch.equal(dest, expect_dest)
    assert src.tolist() == [(b * T + t) * Hr + r for (b, r, t) in order]
    assert torch.equal(dest.view(-1)[src], torch.arange(len(order)))
    # every selected block is one contiguous run of the packed layout
    for k, (b, r, n) in enumerate(sel):
        b0, blen = blocks_loop[n][:2]
        run = dest[b, b0:b0 + blen, r].tolist()
        assert run == list(range(blocks.cu_block_tokens[k].item(), blocks.cu_block_tokens[k + 1].item()))

    routes = token_routes(soft, lay)
    assert routes.num_tokens == len(order)
    assert torch.equal(routes.token_mask, mask)
    assert torch.equal(routes.dest, dest) and torch.equal(routes.src, src)
    for name in ("batch", "head", "block", "counts", "cu_blocks", "cu_tokens", "cu_block_tokens"):
        assert torch.equal(getattr(routes.blocks, name), getattr(blocks, name)), name


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000], ids=lambda t: f"T{t}")
def test_token_routes_edge_lengths(T):
    lay = block_layout(T, 64)
    for soft in (torch.zeros(2, lay.N, 3, dtype=torch.bool), torch.ones(2, lay.N, 3, dtype=torch.bool)):
        routes = token_routes(soft, lay)
        S = routes.num_tokens
        assert int(soft.any()) * 2 * 3 * T == S
        assert routes.src.shape == (S,) and routes.blocks.cu_tokens[-1].item() == S
        assert torch.equal(routes.dest.view(-1)[routes.src], torch.arange(S))
        assert ((routes.dest >= 0) == soft.any()).all()


def test_token_routes_packed_partial_blocks():
    cu = torch.tensor([0, 5, 70, 71])  # blocks of 64: [0,5) | [5,69) [69,70) | [70,71)
    lay = block_layout(71, 64, cu)
    assert lay.block_len.tolist() == [5, 64, 1, 1]
    soft = torch.tensor([True, False, True, True]).view(1, 4, 1)
    routes = token_routes(soft, lay)
    assert routes.num_tokens == 7
    assert routes.src.tolist() == [0, 1, 2, 3, 4, 69, 70]
    assert routes.blocks.cu_block_tokens.tolist() == [0, 5, 6, 7]


@pytest.mark.parametrize("native", [True, False], ids=["nonzero_static", "fallback"])
def test_nonzero_static_equals_nonzero_and_pads_with_the_fill_value(native, monkeypatch):
    if not native:  # a torch / device without torch.nonzero_static
        monkeypatch.setattr(torch, "nonzero_static", lambda *a, **k: (_ for _ in ()).throw(NotImplementedError()))
    x = torch.rand(3, 5, 4, generator=gen(3)) < 0.4
    n = int(x.sum())
    assert torch.equal(nonzero_static(x, n), x.nonzero())
    padded = nonzero_static(x, n + 2, fill_value=7)
    assert padded.shape == (n + 2, 3) and torch.equal(padded[:n], x.nonzero()) and (padded[n:] == 7).all()
    assert (nonzero_static(x, n + 1)[n:] == -1).all()
