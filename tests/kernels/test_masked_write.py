"""natsl's `masked_write_bwd` kernel (the routed share of the state-write gradient, spec §1.7 / §3.2) under the
Triton interpreter against its PyTorch twin `natsl.kernels.naive.naive_masked_write_bwd`: dense and packed
layouts (fla's chunk indices), scalar / per-key / no gate, every `dv` / `dg` / `z` combination the kernel takes."""

from unittest import mock

import pytest
import torch
from fla.ops.utils import prepare_chunk_indices
from helpers import assert_close, gen

import natsl.kernels.masked_write as mw
from natsl.kernels.masked_write import masked_write_bwd
from natsl.kernels.naive import naive_masked_write_bwd

BT = 64
# dense: B = 2, two full chunks and a partial one each; packed: sequences of 70 (a full and a partial chunk), 1 and
# 129 tokens (two full chunks and a one-token chunk): 6 chunks
LAYOUTS = {"dense": (2, 130, None), "packed": (1, 200, [0, 70, 71, 200])}


def chunk_bounds(B, T, cu):
    """`(b, start, end, global chunk)` of every chunk, in fla's global chunk order."""
    spans = [(b, 0, T) for b in range(B)] if cu is None else [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    out = []
    for b, s0, e0 in spans:
        for s in range(s0, e0, BT):
            out.append((b, s, min(s + BT, e0), len(out)))
    return out


def make_case(seed, layout, gate, *, K=16, V=32, H=2, dv=None, dg=False, z=False):
    """Random kernel arguments (float32). `gate`: None, "g" (per head) or "gk" (per key); `dv`: None, "remove"
    (dv holds the real-k write term) or "add" (`dv_add=True`). `g`/`gk` is a chunk-local cumulative log2 decay."""
    gn = gen(seed)
    B, T, cu_list = LAYOUTS[layout]
    cu = None if cu_list is None else torch.tensor(cu_list)
    ci = None if cu is None else prepare_chunk_indices(cu, BT)
    bounds = chunk_bounds(B, T, cu_list)
    NT = len(bounds) // B

    def r(*s):
        return torch.randn(*s, generator=gn)

    m = (torch.rand(B * NT, H, generator=gn) < 0.5).float()
    m[0, 0], m[1, 0] = 0.0, 1.0  # both kinds of chunk, whatever the seed
    args = dict(x=r(B, T, H, V), k=r(B, T, H, K), m=m, dh=r(B, NT, H, K, V), dk=r(B, T, H, K))
    kw = dict(cu_seqlens=cu, chunk_indices=ci, chunk_size=BT)
    if gate is not None:
        steps = -0.3 * torch.rand(B, T, H, *((K,) if gate == "gk" else ()), generator=gn)
        cum = torch.empty_like(steps)
        for b, s, e, _ in bounds:
            cum[b, s:e] = steps[b, s:e].cumsum(0)
        kw[gate] = cum
    if dv is not None:
        kw["dv"], kw["dv_add"] = r(B, T, H, V), dv == "add"
    if dg:
        kw["dg"] = r(B, T, H, *((K,) if gate == "gk" else ()))
    if z:
        zz = (torch.rand(B * NT, H, generator=gn) < 0.5).float()
        zz[0, 1], zz[1, 1] = 0.0, 1.0
        kw["z"], kw["h"] = zz, r(B, NT, H, K, V)
    return args, kw


def nan_poisoned_empty():
    """`torch.empty` returning NaN-filled float tensors while the kernel's host function runs: a finite `dm`
    proves that the kernel wrote every element of it."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    return mock.patch.object(mw.torch, "empty", empty)


def run_both(args, kw):
    """(kernel, naive): each a dict of dm and the in-place corrected dk / dv / dg (on copies of the inputs)."""
    outs = []
    for fn in (masked_write_bwd, naive_masked_write_bwd):
        a = {n: t.clone() for n, t in args.items()}
        k = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        if fn is naive_masked_write_bwd:
            k.pop("chunk_indices")
            dm = fn(**a, **k)
        else:
            with nan_poisoned_empty():
                dm = fn(**a, **k)
        res = {"dm": dm, "dk": a["dk"]}
        res.update({n: k[n] for n in ("dv", "dg") if k.get(n) is not None})
        for n in ("x", "k", "m", "dh"):  # read-only inputs stay untouched
            assert torch.equal(a[n], args[n]), f"{n} was modified"
        outs.append(res)
    return outs


def check(out, ref):
    assert set(out) == set(ref)
    assert out["dm"].dtype == torch.float32 and out["dm"].shape == ref["dm"].shape
    for n in ref:
        assert_close(n, ref[n], out[n], 1e-5, atol=1e-6)


def _cases():
    seed = 0
    for layout in LAYOUTS:
        for gate in (None, "g", "gk"):
            for dv in (None, "remove", "add"):
                for dg, z in ((False, False), (True, False), (True, True)):
                    if z and gate is None:  # z needs a gate (the carried decay it switches off)
                        continue
                    name = f"{layout}-{gate or 'nogate'}-dv_{dv or 'none'}-{'dg' if dg else 'nodg'}{'-z' if z else ''}"
                    seed += 1
                    yield pytest.param(seed, layout, gate, dv, dg, z, id=name)


@pytest.mark.parametrize("seed,layout,gate,dv,dg,z", list(_cases()))
def test_matches_naive(seed, layout, gate, dv, dg, z):
    """dm and the corrected dk / dv / dg equal the PyTorch twin, for every combination of optional inputs."""
    args, kw = make_case(seed, layout, gate, dv=dv, dg=dg, z=z)
    out, ref = run_both(args, kw)
    check(out, ref)
    assert not torch.equal(out["dk"], args["dk"])  # the masked chunks' write term was removed


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_select_on_a_strided_mask(layout):
    """`select=True` returns `dm · m` (the router gradient of the chunks with `m = 1`), with `m` read through its
    strides: a view of `[B * NT, H, 2]` routing-like weights, as the layer passes it."""
    args, kw = make_case(11, layout, "g", dv="add", dg=True)
    weights = torch.stack([1 - args["m"], args["m"]], -1)  # [B * NT, H, 2], index 1 = linear
    strided = dict(args, m=weights[..., 1])
    assert not strided["m"].is_contiguous()
    out, ref = run_both(strided, dict(kw, select=True))
    check(out, ref)
    _, plain = run_both(args, kw)
    assert torch.equal(ref["dm"], plain["dm"] * args["m"])
    assert (plain["dm"][args["m"] == 0] != 0).all()  # the selection removed something
    for n in ("dk", "dv", "dg"):  # select changes dm only
        assert torch.equal(ref[n], plain[n])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dm_written_through_the_strides_of_dm_out(layout):
    """`dm_out`, a strided view of a `[B * NT, H, 2]` routing-weight gradient (as the layer's backward passes it),
    receives `dm` (both impls) and the other column is left as it was."""
    args, kw = make_case(12, layout, "g", dv="add", dg=True)
    _, ref = run_both(args, dict(kw, select=True))
    for fn in (masked_write_bwd, naive_masked_write_bwd):
        a = {n: t.clone() for n, t in args.items()}
        k = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        if fn is naive_masked_write_bwd:
            k.pop("chunk_indices")
        dw = torch.full((*args["m"].shape, 2), 7.0)
        out = fn(**a, **k, select=True, dm_out=dw[..., 1])
        assert out.data_ptr() == dw[..., 1].data_ptr()
        assert_close("dm", ref["dm"], dw[..., 1], 1e-5, atol=1e-6)
        assert torch.equal(dw[..., 0], torch.full_like(dw[..., 0], 7.0))
    with pytest.raises(ValueError, match=r"dm_out must be float32 \[B \* NT, H\]"):
        masked_write_bwd(**args, **kw, dm_out=torch.zeros(args["m"].shape, dtype=torch.float64))


@pytest.mark.parametrize("layout,gate", [("dense", "gk"), ("packed", "g")])
def test_odd_dims(layout, gate):
    """A key dim below its power-of-two block (12 → 16) and a value dim over two 64-wide value tiles (72)."""
    args, kw = make_case(5, layout, gate, K=12, V=72, H=3, dv="remove" if gate == "gk" else "add", dg=True, z=True)
    check(*run_both(args, kw))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_dm_written_and_zero_keys_give_zero(layout):
    """dm (allocated inside, NaN-poisoned) is finite everywhere and exactly 0 for the (chunk, head) pairs whose
    keys are all zero; their dv is left as it was (no write term without keys)."""
    args, kw = make_case(9, layout, "g", dv="remove", dg=True)
    B, T, cu = LAYOUTS[layout]
    bounds = chunk_bounds(B, T, cu)
    zero = [(b, s, e, c, c % 2) for b, s, e, c in bounds]  # head c % 2 of every chunk c has no keys
    for b, s, e, _, h in zero:
        args["k"][b, s:e, h] = 0.0
    out, ref = run_both(args, kw)
    check(out, ref)
    assert torch.isfinite(out["dm"]).all()
    for b, s, e, c, h in zero:
        assert out["dm"][c, h].item() == 0.0, f"chunk {c} head {h}"
        assert torch.equal(out["dv"][b, s:e, h], kw["dv"][b, s:e, h])
    assert (out["dm"] != 0).sum() == len(zero)  # the other heads' router gradients are not zero


def test_without_a_triton_backend_falls_back_to_the_twin(monkeypatch):
    """On a CPU tensor without the interpreter there is no Triton backend: the PyTorch twin runs instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, kw = make_case(3, "dense", "gk", dv="remove", dg=True, z=True)
    with mock.patch.object(mw, "masked_write_bwd_kernel", None):  # would fail if launched
        out = masked_write_bwd(**{n: t.clone() for n, t in args.items()}, **kw)
    ref = naive_masked_write_bwd(**{n: t.clone() for n, t in args.items()},
                                 **{n: t for n, t in kw.items() if n != "chunk_indices"})
    assert torch.equal(out, ref)


def test_rejects_bad_arguments():
    args, kw = make_case(1, "dense", "g", dg=True)
    bad_m = dict(args, m=args["m"][:-1])
    with pytest.raises(ValueError, match=r"m must have shape \[B \* NT, H\] = \[6, 2\]"):
        masked_write_bwd(**bad_m, **kw)
    with pytest.raises(ValueError, match=r"m must have shape"):
        masked_write_bwd(**dict(args, m=args["m"].reshape(2, 3, 2)), **kw)
    args_p, kw_p = make_case(1, "packed", None)
    with pytest.raises(ValueError, match=r"m must have shape \[B \* NT, H\] = \[6, 2\]"):
        masked_write_bwd(**dict(args_p, m=torch.zeros(4, 2)), **kw_p)  # the dense chunk count of T = 200
    with pytest.raises(ValueError, match="z .* needs h and dg"):
        masked_write_bwd(**args, **dict(kw, z=torch.ones(6, 2)))
    big = dict(args, k=torch.zeros(2, 130, 2, 257))
    with pytest.raises(ValueError, match="key dims up to 256"):
        masked_write_bwd(**big, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["dense", "partial", "packed", "block16"])
def test_mask_keys_matches_naive(case, dtype):
    """`mask_keys` (the masked keys of the state write) against its twin: dense input of whole and partial blocks,
    blocks smaller than the program's token tile, packed input through `token_block`, and `m` as a strided view of
    routing weights `[B, N, H, 2]` (what the layer passes: 0/1 in bf16)."""
    from natsl.kernels.masked_write import mask_keys
    from natsl.kernels.naive import naive_mask_keys

    gn = gen(7)
    C, B, T, tb = {"dense": (64, 2, 128, None), "partial": (64, 2, 130, None), "block16": (16, 2, 72, None),
                   "packed": (64, 1, 200, torch.tensor([0] * 64 + [1] * 6 + [2] + [3] * 64 + [4] * 64 + [5]))}[case]
    N = -(-T // C) if tb is None else 6
    k = torch.randn(B, T, 3, 24, generator=gn).to(dtype)
    weights = (torch.rand(B, N, 3, 2, generator=gn) < 0.5).to(dtype)
    if dtype == torch.float32:  # not only 0/1: the product itself is checked (bf16 rounding on store differs
        weights[..., 1] = torch.rand(B, N, 3, generator=gn)  # between the interpreter and the GPU; 0/1 is exact)
    m = weights[..., 1]
    out = mask_keys(k, m, C, tb)
    assert out.dtype == dtype and out.shape == k.shape
    assert torch.equal(out, naive_mask_keys(k, m, C, tb))
    blk = torch.arange(T) // C if tb is None else tb
    assert torch.equal(out[:, 3], (k[:, 3].float() * m[:, blk[3]][..., None].float()).to(dtype))


def test_mask_keys_rejects_bad_arguments():
    from natsl.kernels.masked_write import mask_keys

    k = torch.zeros(2, 64, 3, 8)
    with pytest.raises(ValueError, match=r"m must have shape \[B=2, N, H=3\]"):
        mask_keys(k, torch.zeros(2, 1, 2), 64)
    with pytest.raises(ValueError, match="contiguous"):
        mask_keys(k.transpose(1, 2), torch.zeros(2, 1, 3), 64)
    with pytest.raises(ValueError, match="key dims up to 256"):
        mask_keys(torch.zeros(1, 4, 1, 300), torch.zeros(1, 1, 1), 64)
    assert mask_keys(torch.zeros(2, 0, 3, 8), torch.zeros(2, 0, 3), 64).shape == (2, 0, 3, 8)
