"""natsl's gather / scatter kernels under the Triton interpreter against their naive twins (`natsl.kernels.naive`).

Pure copies are compared bit for bit (float16/bfloat16 included: plain loads and stores of them work in the
interpreter, unlike bfloat16 arithmetic); atomic scatter-add sums in float32/float64 and is compared with a tolerance.
"""

from unittest import mock

import pytest
import torch
from helpers import assert_close, gen, nan_empty
from hypothesis import example, given, settings
from hypothesis import strategies as st

import natsl.kernels.gather_scatter as gs
from natsl.kernels import gather_rows, gather_tokens, scatter_add_rows, scatter_rows, scatter_tokens
from natsl.kernels.index import block_layout, token_routes
from natsl.kernels.naive import (
    naive_gather_rows,
    naive_gather_tokens,
    naive_scatter_add_rows,
    naive_scatter_rows,
    naive_scatter_tokens,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
dtypes = st.sampled_from(DTYPES)
index_dtypes = st.sampled_from([torch.int32, torch.int64])
seeds = st.integers(0, 2 ** 31 - 1)
LAYOUTS = ["contiguous", "column_slice", "transposed", "column_stride", "four_lead_dims", "broadcast"]


def nan_poisoned():
    """Every buffer the kernels allocate starts as NaN: finite outputs prove every element was written."""
    return mock.patch.object(gs, "_empty", lambda shape, dtype, device: nan_empty(*shape, dtype=dtype, device=device))


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def make_rows(R, W, layout, seed, dtype):
    """A `[*R, W]` tensor with `R` rows in the given memory layout (the kernels read it in place)."""
    if layout == "contiguous":
        return randn(R, W, seed=seed, dtype=dtype)
    if layout == "column_slice":  # e.g. q out of a fused qkv projection: row stride > W
        return randn(R, W + 3, seed=seed, dtype=dtype)[:, 2:W + 2]
    if layout == "transposed":  # two non-mergeable leading dims
        return randn(-(-R // 2), 2, W, seed=seed, dtype=dtype).transpose(0, 1)
    if layout == "column_stride":  # non-unit column stride
        return randn(R, 2 * W, seed=seed, dtype=dtype)[:, ::2]
    if layout == "four_lead_dims":  # more than 3 non-mergeable leading dims: the one documented copy
        return randn(2, 2, 2, R, W, seed=seed, dtype=dtype).permute(3, 0, 2, 1, 4)
    if layout == "broadcast":  # stride-0 rows
        return randn(1, W, seed=seed, dtype=dtype).expand(R, W)
    raise AssertionError(layout)


def draw_index(S, R, negatives, repeats, seed, dtype):
    """`[S]` row indices into `[0, R)`, repeating or not, with some `-1` entries if `negatives`."""
    g = gen(seed)
    if repeats:
        idx = torch.randint(0, R, (S,), generator=g)
    else:
        idx = torch.cat([torch.randperm(R, generator=g)[:S], torch.full((max(S - R, 0),), -1)])
    if negatives and S:
        idx[torch.rand(S, generator=g) < 0.3] = -1
    return idx.to(dtype)


rows_cases = dict(R=st.integers(1, 96), W=st.sampled_from([1, 5, 16, 64, 130, 256]), S=st.integers(0, 120),
                  layout=st.sampled_from(LAYOUTS), dtype=dtypes, idx_dtype=index_dtypes, seed=seeds)


def _effective_rows(x):
    return x.reshape(-1, x.shape[-1]).shape[0]


@settings(deadline=None)
@given(**rows_cases, negatives=st.booleans())
@example(R=1, W=1, S=0, layout="contiguous", dtype=torch.float32, idx_dtype=torch.int64, seed=0, negatives=False)
@example(R=7, W=130, S=50, layout="four_lead_dims", dtype=torch.bfloat16, idx_dtype=torch.int32, seed=1,
         negatives=True)
def test_gather_rows_matches_naive_and_writes_everything(R, W, S, layout, dtype, idx_dtype, seed, negatives):
    x = make_rows(R, W, layout, seed, dtype)
    R = _effective_rows(x)
    idx = draw_index(S, R, negatives, True, seed + 1, idx_dtype)
    ref = naive_gather_rows(x, idx)
    with nan_poisoned():
        o = gather_rows(x, idx)
    assert torch.equal(o, ref)
    out = nan_empty(S, W + 2, dtype=dtype)[:, 1:W + 1]  # a strided destination
    assert gather_rows(x, idx, out=out) is out
    assert torch.equal(out, ref)


@settings(deadline=None)
@given(**rows_cases, negatives=st.booleans())
def test_scatter_rows_matches_naive_and_writes_exactly_the_indexed_rows(R, W, S, layout, dtype, idx_dtype, seed,
                                                                       negatives):
    y = make_rows(S, W, layout, seed, dtype) if S else randn(0, W, seed=seed, dtype=dtype)
    S = _effective_rows(y)
    idx = draw_index(S, R, negatives, False, seed + 1, idx_dtype)
    ref = naive_scatter_rows(y, idx, R)
    assert torch.equal(scatter_rows(y, idx, R), ref)
    out = nan_empty(2 * R, W, dtype=dtype)[::2]  # a strided destination
    assert scatter_rows(y, idx, R, out=out) is out
    written = torch.zeros(R, dtype=torch.bool)
    written[idx[idx >= 0].long()] = True
    assert torch.equal(out[written], ref[written])
    assert out[~written].isnan().all()


@settings(deadline=None)
@given(**rows_cases)
def test_scatter_add_rows_matches_naive(R, W, S, layout, dtype, idx_dtype, seed):
    y = make_rows(S, W, layout, seed, dtype) if S else randn(0, W, seed=seed, dtype=dtype)
    S = _effective_rows(y)
    idx = draw_index(S, R, True, True, seed + 1, idx_dtype)
    ref = naive_scatter_add_rows(y, idx, R)
    o = scatter_add_rows(y, idx, R)
    assert o.dtype == dtype
    # atomics sum in any order: float32 rounding (then the cast back for half types)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close("scatter_add", ref, o, tol, atol=tol)
    acc = torch.ones(R, W, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert scatter_add_rows(y, idx, R, out=acc) is acc
    assert_close("scatter_add out", naive_scatter_add_rows(y.to(acc.dtype), idx, R) + 1, acc, 1e-6, atol=1e-5)


@settings(deadline=None)
@given(R=st.integers(1, 80), W=st.sampled_from([1, 7, 64]), S=st.integers(1, 100), seed=seeds,
       idx_dtype=index_dtypes)
def test_adjointness_and_round_trip(R, W, S, seed, idx_dtype):
    # <gather(x), y> = <x, scatter_add(y)> for any index; = <x, scatter(y)> for a non-repeating one
    x, y = randn(R, W, seed=seed, dtype=torch.float64), randn(S, W, seed=seed + 1, dtype=torch.float64)
    idx = draw_index(S, R, True, True, seed + 2, idx_dtype)
    lhs = (gather_rows(x, idx) * y).sum()
    assert torch.allclose(lhs, (x * scatter_add_rows(y, idx, R)).sum(), rtol=1e-12, atol=1e-12)
    uniq = draw_index(S, R, True, False, seed + 3, idx_dtype)
    assert torch.allclose((gather_rows(x, uniq) * y).sum(), (x * scatter_rows(y, uniq, R)).sum(),
                          rtol=1e-12, atol=1e-12)
    # round trip: scatter(gather(x)) = x on the indexed rows, 0 elsewhere
    mask = torch.zeros(R, 1, dtype=torch.float64)
    mask[uniq[uniq >= 0].long()] = 1
    assert torch.equal(scatter_rows(gather_rows(x, uniq), uniq, R), x * mask)


@settings(deadline=None)
@given(R=st.integers(1, 60), W=st.sampled_from([3, 32]), S=st.integers(1, 80), seed=seeds,
       backward=st.sampled_from(["scatter_add", "unique", "inverse"]), layout=st.sampled_from(LAYOUTS[:4]))
def test_gather_rows_grad_matches_naive(R, W, S, seed, backward, layout):
    x = make_rows(R, W, layout, seed, torch.float64).requires_grad_()
    R = _effective_rows(x)
    idx = draw_index(S, R, True, backward == "scatter_add", seed + 1, torch.int64)
    inverse = None
    if backward == "inverse":
        inverse = torch.full((R,), -1, dtype=torch.int64)
        inverse[idx[idx >= 0]] = torch.nonzero(idx >= 0).view(-1)
    do = randn(idx.shape[0], W, seed=seed + 2, dtype=torch.float64)
    o = gather_rows(x, idx, inverse=inverse, unique_indices=backward == "unique")
    (dx,) = torch.autograd.grad(o, x, do)
    (ref,) = torch.autograd.grad(naive_gather_rows(x, idx), x, do)
    assert_close("dx", ref, dx, 1e-12, atol=1e-12)


@settings(deadline=None)
@given(R=st.integers(1, 60), W=st.sampled_from([3, 32]), S=st.integers(1, 80), seed=seeds, add=st.booleans())
def test_scatter_rows_grad_matches_naive(R, W, S, seed, add):
    y = randn(S, W, seed=seed, dtype=torch.float64).requires_grad_()
    idx = draw_index(S, R, True, add, seed + 1, torch.int32)
    fn, naive = (scatter_add_rows, naive_scatter_add_rows) if add else (scatter_rows, naive_scatter_rows)
    do = randn(R, W, seed=seed + 2, dtype=torch.float64)
    (dy,) = torch.autograd.grad(fn(y, idx, R), y, do)
    (ref,) = torch.autograd.grad(naive(y, idx, R), y, do)
    assert torch.equal(dy, ref)


def make_routes(B, T, Hr, C, p, seed, seq_lens=None):
    cu = None if seq_lens is None else torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()])
    lay = block_layout(T, C, cu)
    soft = torch.rand(B, lay.N, Hr, generator=gen(seed)) < p
    return token_routes(soft, lay)


route_cases = dict(
    B=st.integers(1, 2), T=st.sampled_from([1, 63, 64, 65, 130]), Hr=st.sampled_from([1, 2, 3]),
    G=st.sampled_from([1, 2, 4]), D=st.sampled_from([8, 16, 24, 64]), C=st.sampled_from([16, 64]),
    p=st.sampled_from([0.0, 0.25, 0.5, 1.0]), packed=st.one_of(st.none(), st.lists(st.integers(1, 90), min_size=1,
                                                                                    max_size=3)),
    dtype=dtypes, idx_dtype=index_dtypes, fused=st.booleans(), seed=seeds)


def route_inputs(B, T, Hr, G, D, C, p, packed, dtype, idx_dtype, fused, seed):
    if packed is not None:
        B, T = 1, sum(packed)
    routes = make_routes(B, T, Hr, C, p, seed, packed)
    H = Hr * G
    if fused:  # the q slice of a fused [B, T, 3H, D] projection: read in place
        x = randn(B, T, 3 * H, D, seed=seed + 1, dtype=dtype)[:, :, H:2 * H]
    else:
        x = randn(B, T, H, D, seed=seed + 1, dtype=dtype)
    return routes, x, routes.src.to(idx_dtype), routes.dest.to(idx_dtype)


@settings(deadline=None)
@given(**route_cases)
@example(B=1, T=65, Hr=2, G=2, D=16, C=64, p=1.0, packed=[64, 1], dtype=torch.bfloat16, idx_dtype=torch.int32,
         fused=True, seed=3)
def test_tokens_match_naive_and_round_trip(B, T, Hr, G, D, C, p, packed, dtype, idx_dtype, fused, seed):
    routes, x, src, dest = route_inputs(B, T, Hr, G, D, C, p, packed, dtype, idx_dtype, fused, seed)
    with nan_poisoned():
        y = gather_tokens(x, src, Hr, dest=dest)
        z = scatter_tokens(y, dest, src=src)
    assert y.shape == (routes.num_tokens, G, D)
    assert torch.equal(y, naive_gather_tokens(x, src, Hr))
    assert torch.equal(z, naive_scatter_tokens(y, dest))
    # scatter(gather(x)) = x on the routed tokens (per router head: its G heads), zero elsewhere
    head_mask = routes.token_mask.repeat_interleave(G, dim=-1)[..., None]
    assert torch.equal(z, torch.where(head_mask, x, torch.zeros((), dtype=dtype)))
    # gather(scatter(y)) = y
    assert torch.equal(gather_tokens(z, src, Hr), y)


@settings(deadline=None)
@given(**route_cases, with_inverse=st.booleans())
def test_tokens_grad_matches_naive(B, T, Hr, G, D, C, p, packed, dtype, idx_dtype, fused, seed, with_inverse):
    routes, x, src, dest = route_inputs(B, T, Hr, G, D, C, p, packed, torch.float64, idx_dtype, fused, seed)
    x.requires_grad_()
    y = gather_tokens(x, src, Hr, dest=dest if with_inverse else None)
    dy = randn(*y.shape, seed=seed + 2, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy)
    (ref,) = torch.autograd.grad(naive_gather_tokens(x, src, Hr), x, dy)
    assert torch.equal(dx, ref)
    yy = dy.clone().requires_grad_()
    z = scatter_tokens(yy, dest, src=src if with_inverse else None)
    dz = randn(*z.shape, seed=seed + 3, dtype=torch.float64)
    (dyy,) = torch.autograd.grad(z, yy, dz)
    (ref,) = torch.autograd.grad(naive_scatter_tokens(yy, dest), yy, dz)
    assert torch.equal(dyy, ref)
    # adjointness of the token pair
    assert torch.allclose((y * dy).sum(), (x * scatter_tokens(dy, dest)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multi_program_tiles(dtype):
    # small forced tiles: many programs along rows and along the row width (W > BW)
    x = randn(3, 40, 50, seed=0, dtype=dtype)
    idx = torch.randint(-1, 120, (70,), generator=gen(1))
    out = gs.gather_rows_fwd(x, idx, nan_empty(70, 50, dtype=dtype), block_rows=8, block_w=16)
    assert torch.equal(out, naive_gather_rows(x, idx))
    perm = torch.randperm(120, generator=gen(2))[:70]
    y = gs.scatter_rows_fwd(out, perm, 120, block_rows=8, block_w=16)
    assert torch.equal(y, naive_scatter_rows(out, perm, 120))
    acc = gs.scatter_rows_fwd(out, idx, 120, accumulate=True, block_rows=8, block_w=16)
    assert_close("acc", naive_scatter_add_rows(out.float(), idx, 120), acc, 1e-6, atol=1e-5)


def test_unvalidated_out_of_range_indices_are_zero_or_skipped():
    x = randn(10, 4, seed=0)
    idx = torch.tensor([3, 10, -5, 99, 0])
    o = gather_rows(x, idx, validate=False)
    assert torch.equal(o, naive_gather_rows(x, idx))
    assert (o[1:4] == 0).all()
    s = scatter_rows(o, torch.tensor([1, 10, 2, 50, 0]), 10, validate=False)
    assert torch.equal(s, naive_scatter_rows(o, torch.tensor([1, 10, 2, 50, 0]), 10))


def test_cpu_fallback_without_interpreter_uses_naive_twins():
    """On CPU without `TRITON_INTERPRET` the public functions must run (and differentiate) through naive.py."""
    routes = make_routes(2, 100, 3, 16, 0.5, 0)
    x = randn(2, 100, 6, 8, seed=1).requires_grad_()

    def no_kernel(*args, **kwargs):
        raise AssertionError("kernel launched")

    with mock.patch.object(gs, "interpreted", lambda: False), \
            mock.patch.object(gs, "gather_rows_fwd", no_kernel), mock.patch.object(gs, "scatter_rows_fwd", no_kernel):
        assert not gs.uses_triton(x)
        y = gather_tokens(x, routes.src, 3, dest=routes.dest)
        z = scatter_tokens(y, routes.dest)
        z.sum().backward()
        rows = x.detach().view(-1, 8)
        idx = torch.tensor([3, -1, 7])
        assert torch.equal(gather_rows(rows, idx), naive_gather_rows(rows, idx))
        out = torch.zeros(3, 8)
        assert torch.equal(gather_rows(rows, idx, out=out), naive_gather_rows(rows, idx))
        assert torch.equal(scatter_rows(rows[:3], idx, 9), naive_scatter_rows(rows[:3], idx, 9))
        acc = torch.ones(9, 8)
        scatter_add_rows(rows[:3], idx, 9, out=acc)
        assert torch.equal(acc, naive_scatter_add_rows(rows[:3], idx, 9) + 1)
    assert torch.equal(z, x.detach() * routes.token_mask.repeat_interleave(2, -1)[..., None])
    assert torch.equal(x.grad, routes.token_mask.repeat_interleave(2, -1)[..., None].expand_as(x).float())


x10 = torch.zeros(10, 4)
i3 = torch.tensor([0, 1, 2])
BAD_CALLS = [
    (lambda: gather_rows(x10.long(), i3), TypeError, "x must be float"),
    (lambda: gather_rows([1.0], i3), TypeError, "x must be a torch.Tensor"),
    (lambda: gather_rows(torch.zeros(10), i3), ValueError, "x must have at least 2 dims"),
    (lambda: gather_rows(x10, i3.float()), TypeError, "idx must be int32 or int64"),
    (lambda: gather_rows(x10, i3.view(3, 1)), ValueError, "idx must be 1-D"),
    (lambda: gather_rows(x10, torch.tensor([0, 10])), ValueError, "idx has entries >= 10"),
    (lambda: gather_rows(x10, i3.to("meta")), ValueError, "idx is on meta"),
    (lambda: gather_rows(x10, i3, out=torch.zeros(4, 4)), ValueError, "out must have shape"),
    (lambda: gather_rows(x10, i3, out=torch.zeros(3, 4, dtype=torch.float64)), TypeError, "out must have dtype"),
    (lambda: gather_rows(x10, i3, out=torch.zeros(3, 4, device="meta")), ValueError, "out is on meta"),
    (lambda: gather_rows(torch.zeros(10, 4, requires_grad=True), i3, out=torch.zeros(3, 4)), ValueError,
     "out= is not differentiable"),
    (lambda: gather_rows(x10, i3, inverse=torch.zeros(9, dtype=torch.long)), ValueError, "inverse must have shape"),
    (lambda: gather_rows(x10, i3, inverse=torch.full((10,), 3)), ValueError, "inverse has entries >= 3"),
    (lambda: scatter_rows(x10, i3, 5), ValueError, "idx must have one entry per row of y"),
    (lambda: scatter_rows(x10[:3], i3, -1), ValueError, "num_rows must be a non-negative int"),
    (lambda: scatter_rows(x10[:3], i3, 2.0), ValueError, "num_rows must be a non-negative int"),
    (lambda: scatter_rows(x10[:3], i3, 2), ValueError, "idx has entries >= 2"),
    (lambda: scatter_rows(x10[:3].half(), i3, 3, out=torch.zeros(3, 4)), TypeError, "out must have dtype"),
    (lambda: scatter_add_rows(x10[:3].bfloat16(), i3, 3, out=torch.zeros(3, 4).bfloat16()), TypeError,
     "out must have dtype"),
    (lambda: gather_tokens(torch.zeros(2, 5, 4), i3, 2), ValueError, "x must have shape"),
    (lambda: gather_tokens(torch.zeros(2, 5, 4, 8), i3, 3), ValueError, "num_router_heads must be a positive divisor"),
    (lambda: gather_tokens(torch.zeros(2, 5, 4, 8), torch.tensor([20]), 2), ValueError, "src has entries >= 20"),
    (lambda: gather_tokens(torch.zeros(2, 5, 4, 8), i3, 2, dest=torch.zeros(2, 5, 4, dtype=torch.long)),
     ValueError, "dest must have shape"),
    (lambda: scatter_tokens(torch.zeros(3, 8), torch.zeros(2, 5, 2, dtype=torch.long)), ValueError, "y must have shape"),
    (lambda: scatter_tokens(torch.zeros(3, 2, 8), torch.zeros(2, 5, dtype=torch.long)), ValueError,
     "dest must have shape"),
    (lambda: scatter_tokens(torch.zeros(3, 2, 8), torch.full((2, 5, 2), 3)), ValueError, "dest has entries >= 3"),
    (lambda: scatter_tokens(torch.zeros(3, 2, 8), torch.full((2, 5, 2), -1), src=i3[:2]), ValueError,
     "src must have shape"),
    (lambda: scatter_tokens(torch.zeros(3, 2, 8, dtype=torch.int8), torch.full((2, 5, 2), -1)), TypeError,
     "y must be float"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_the_interpreted_kernels_are_what_runs_here():
    assert gs.interpreted() and gs.uses_triton(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_copy_blocks_matches_its_twin_on_a_strided_source(dtype):
    """`copy_blocks` (the prefill's KV-cache write) from a strided `[B, n·C, H, W]` view (a slice of a fused
    projection) into a `[B, H, R, W]` cache, bit for bit against `naive_copy_blocks` on every written block, and
    nothing else written (the twin's extra write into the free block `first + count` aside)."""
    gn = gen(3)
    B, H, C, W, n, nb = 2, 3, 4, 5, 6, 9
    fused = torch.randn(B, n * C, H, 2 * W + 1, generator=gn).to(dtype)
    src = fused[..., 1:W + 1]  # strided: the rows are 2W+1 apart
    order = torch.stack([torch.randperm(n, generator=gn) for _ in range(B * H)]).view(B, H, n)
    count = torch.randint(0, n + 1, (B, H), generator=gn)
    first = torch.randint(0, nb - n, (B, H), generator=gn)
    base = torch.randn(B, H, nb * C, W, generator=gn).to(dtype)
    got, want = base.clone(), base.clone()
    gs.copy_blocks(src, got, order, first, count, C)
    with mock.patch.object(gs, "uses_triton", lambda t: False):
        gs.copy_blocks(src, want, order, first, count, C)
    for b in range(B):
        for h in range(H):
            f, c = int(first[b, h]), int(count[b, h])
            for t in range(c):
                j = int(order[b, h, t])
                assert torch.equal(got[b, h, (f + t) * C:(f + t + 1) * C], src[b, j * C:(j + 1) * C, h])
            written = slice(f * C, (f + c) * C)
            assert torch.equal(got[b, h, written], want[b, h, written])
            untouched = torch.ones(nb * C, dtype=torch.bool)
            untouched[written] = False
            assert torch.equal(got[b, h, untouched], base[b, h, untouched])
    with pytest.raises(ValueError, match="dst must be contiguous"):
        gs.copy_blocks(src, got.transpose(2, 3), order, first, count, C)
