"""natsl's gather / scatter kernels compiled for the GPU, against the naive twins (bf16 included).

Run on the H200 with `NATSL_TEST_DEVICE=cuda pytest -q -m gpu tests/gpu/test_gather_scatter_gpu.py` (without
`NATSL_TEST_DEVICE=cuda` the conftest turns on the Triton interpreter, and these tests skip).
"""

from unittest import mock

import pytest
import torch
from helpers import host_syncs

import natsl.kernels.gather_scatter as gs
from natsl.kernels import gather_rows, gather_tokens, scatter_add_rows, scatter_rows, scatter_tokens
from natsl.kernels.index import block_layout, token_destination, token_routes
from natsl.kernels.naive import (
    naive_gather_rows,
    naive_gather_tokens,
    naive_scatter_add_rows,
    naive_scatter_rows,
    naive_scatter_tokens,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gs.interpreted(), reason="set NATSL_TEST_DEVICE=cuda: the Triton interpreter is on"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
HEADS = [(6, 2, 128), (12, 1, 128), (2, 3, 96), (1, 1, 256), (4, 4, 64)]  # (Hr, G, D)


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), device=DEV).to(dtype)


def nan_poisoned():
    return mock.patch.object(gs, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))


def routes_for(T, Hr, packed, seed, B=2, frac=0.3, C=64):
    cu = torch.tensor([0, 1000, 1065, 3000, T], device=DEV) if packed else None
    lay = block_layout(T, C, cu, device=DEV)
    soft = torch.rand(1 if packed else B, lay.N, Hr, generator=gen(seed), device=DEV) < frac
    return token_routes(soft, lay)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("heads", HEADS, ids=[f"Hr{h}-G{g}-D{d}" for h, g, d in HEADS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tokens_match_naive(dtype, heads, packed):
    Hr, G, D = heads
    T, H = 4133, Hr * G
    routes = routes_for(T, Hr, packed, seed=D + Hr)
    B = routes.dest.shape[0]
    idx_dtype = torch.int32 if G % 2 else torch.int64
    src, dest = routes.src.to(idx_dtype), routes.dest.to(idx_dtype)
    x = randn(B, T, 3 * H, D, seed=1, dtype=dtype)[:, :, H:2 * H].requires_grad_()  # a fused-projection slice
    with nan_poisoned():
        y = gather_tokens(x, src, Hr, dest=dest)
        z = scatter_tokens(y, dest, src=src)
    assert torch.equal(y, naive_gather_tokens(x, src, Hr))
    assert torch.equal(z, naive_scatter_tokens(y, dest))
    assert torch.equal(z, x * routes.token_mask.repeat_interleave(G, -1)[..., None])
    dy = randn(*y.shape, seed=2, dtype=dtype)
    for with_inverse in (True, False):
        out = gather_tokens(x, src, Hr, dest=dest if with_inverse else None)
        (dx,) = torch.autograd.grad(out, x, dy)
        (ref,) = torch.autograd.grad(naive_gather_tokens(x, src, Hr), x, dy)
        assert torch.equal(dx, ref)
        yy = dy.clone().requires_grad_()
        dz = randn(*z.shape, seed=3, dtype=dtype)
        (dyy,) = torch.autograd.grad(scatter_tokens(yy, dest, src=src if with_inverse else None), yy, dz)
        (ref,) = torch.autograd.grad(naive_scatter_tokens(yy, dest), yy, dz)
        assert torch.equal(dyy, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("W", [1, 100, 4100])
def test_rows_match_naive(dtype, W):
    R, S = 3001, 2500
    x = randn(2 * R, W + 8, seed=0, dtype=dtype)[::2, 4:W + 4]  # strided rows and columns
    g = gen(1)
    idx = torch.randint(-1, R, (S,), generator=g, device=DEV)
    assert torch.equal(gather_rows(x, idx), naive_gather_rows(x, idx))
    out = torch.full((S, W), float("nan"), dtype=dtype, device=DEV)
    assert torch.equal(gather_rows(x, idx, out=out), naive_gather_rows(x, idx))
    perm = torch.randperm(R, generator=g, device=DEV)[:S]
    y = randn(S, W, seed=2, dtype=dtype)
    assert torch.equal(scatter_rows(y, perm, R), naive_scatter_rows(y, perm, R))
    acc = scatter_add_rows(y, idx, R)
    ref = naive_scatter_add_rows(y, idx, R)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((acc.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item() < tol
    xg = x.detach().clone().requires_grad_()
    do = randn(S, W, seed=3, dtype=dtype)
    (dx,) = torch.autograd.grad(gather_rows(xg, idx), xg, do)
    (ref,) = torch.autograd.grad(naive_gather_rows(xg, idx), xg, do)
    assert ((dx.double() - ref.double()).norm() / ref.double().norm()).item() < tol


def test_int64_addressing_beyond_2_pow_31_elements():
    R, W = (1 << 22) + 5, 520  # 2.18e9 elements: offsets overflow int32
    x = torch.empty(R, W, dtype=torch.bfloat16, device=DEV)
    idx = torch.tensor([R - 1, 0, R - 2, (1 << 22) - 1, -1], device=DEV)
    vals = randn(4, W, seed=0, dtype=torch.bfloat16)
    x[idx[:4]] = vals
    o = gather_rows(x, idx)
    assert torch.equal(o[:4], vals) and (o[4] == 0).all()
    del x
    out = torch.zeros(R, W, dtype=torch.bfloat16, device=DEV)
    scatter_rows(vals, idx[:4], R, out=out)
    assert torch.equal(out[idx[:4]], vals) and out[1].abs().sum() == 0


def _sync_case():
    T, Hr, G, D = 8192, 6, 2, 128
    lay = block_layout(T, 64, device=DEV)
    soft = torch.rand(2, lay.N, Hr, generator=gen(0), device=DEV) < 0.125
    x = randn(2, T, Hr * G, D, seed=1, dtype=torch.bfloat16).requires_grad_()
    return lay, soft, x, Hr


def test_token_routes_syncs_once():
    lay, soft, _, _ = _sync_case()
    token_routes(soft, lay)
    syncs = host_syncs(lambda: token_routes(soft, lay))
    assert len(syncs) == 1, syncs  # the block and token counts, fetched together


def test_hot_path_is_sync_free():
    lay, soft, x, Hr = _sync_case()
    routes = token_routes(soft, lay)
    # compile every kernel variant outside the checked region
    z = scatter_tokens(gather_tokens(x, routes.src, Hr, dest=routes.dest), routes.dest, src=routes.src)
    z.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dest = token_destination(routes.token_mask, routes.blocks.cu_tokens)
        y = gather_tokens(x, routes.src, Hr, dest=dest, validate=False)
        z = scatter_tokens(y, dest, src=routes.src, validate=False)
        z.float().sum().backward()
        scatter_tokens(y.detach(), dest, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
