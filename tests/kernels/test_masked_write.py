"""natsl's masked-write kernels under the Triton interpreter against their PyTorch twins: `masked_write_bwd` (the
routed share of the state-write gradient, spec §1.7 / §3.2, and the scalar gate gradient's reverse cumsum) against
`natsl.kernels.naive.naive_masked_write_bwd` for dense and packed layouts (fla's chunk indices), scalar / per-key /
no gate, every `dv` / `dg` / `dg2` / `z` combination the kernel takes; `masked_write_fwd` (`k·m` and the
chunk-local gate cumsum) against its twin and fla's `chunk_local_cumsum`."""

from unittest import mock

import pytest
import torch
from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices
from helpers import assert_close, gen

import natsl.kernels.masked_write as mw
from natsl.kernels.masked_write import masked_write_bwd, masked_write_fwd
from natsl.kernels.naive import naive_masked_write_bwd, naive_masked_write_fwd

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


def make_case(seed, layout, gate, *, K=16, V=32, H=2, dv=None, dg=False, dg2=False, z=False):
    """Random kernel arguments (float32). `gate`: None, "g" (per head) or "gk" (per key); `dv`: None, "remove"
    (dv holds the real-k write term) or "add" (`dv_add=True`). `g`/`gk` is a chunk-local cumulative log2 decay;
    `dg` the raw per-token gate gradient (scalar gates) or the reverse-summed one (gk); `dg2` a second raw term."""
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
    if dg2:
        kw["dg2"] = r(B, T, H)
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
                for dg, dg2, z in ((False, False, False), (True, False, False), (True, True, False),
                                   (True, False, True), (True, True, True)):
                    if (dg or z) and gate is None:  # dg and z need a gate (z: the carried decay it switches off)
                        continue
                    if dg2 and gate != "g":  # the delta rule's second gate term: scalar gates only
                        continue
                    name = (f"{layout}-{gate or 'nogate'}-dv_{dv or 'none'}-{'dg' if dg else 'nodg'}"
                            f"{'-dg2' if dg2 else ''}{'-z' if z else ''}")
                    seed += 1
                    yield pytest.param(seed, layout, gate, dv, dg, dg2, z, id=name)


@pytest.mark.parametrize("seed,layout,gate,dv,dg,dg2,z", list(_cases()))
def test_matches_naive(seed, layout, gate, dv, dg, dg2, z):
    """dm and the corrected dk / dv / dg equal the PyTorch twin, for every combination of optional inputs."""
    args, kw = make_case(seed, layout, gate, dv=dv, dg=dg, dg2=dg2, z=z)
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
    args_n, kw_n = make_case(1, "dense", None)
    with pytest.raises(ValueError, match="dg needs the gate"):
        masked_write_bwd(**args_n, **dict(kw_n, dg=torch.zeros(2, 130, 2)))
    args_k, kw_k = make_case(1, "dense", "gk", dg=True)
    with pytest.raises(ValueError, match="dg2 needs dg and a scalar gate g"):
        masked_write_bwd(**args_k, **dict(kw_k, dg2=torch.zeros(2, 130, 2)))
    with pytest.raises(ValueError, match="dg2 needs dg"):
        masked_write_bwd(**args, **dict(kw, dg=None, dg2=torch.zeros(2, 130, 2)))
    big = dict(args, k=torch.zeros(2, 130, 2, 257))
    with pytest.raises(ValueError, match="key dims up to 256"):
        masked_write_bwd(**big, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scalar_dg_is_fla_reverse_cumsum_where_nothing_is_masked(layout):
    """With every chunk linear (`m = 1`, nothing to correct) the scalar-gate `dg` the kernel writes is fla's own
    `chunk_local_cumsum(dg + dg2, reverse=True)`: the cumsum the pass no longer launches."""
    args, kw = make_case(13, layout, "g", dg=True, dg2=True)
    args["m"] = torch.ones_like(args["m"])
    want = chunk_local_cumsum(kw["dg"] + kw["dg2"], BT, reverse=True, cu_seqlens=kw["cu_seqlens"],
                              chunk_indices=kw["chunk_indices"])
    out, ref = run_both(args, kw)
    assert_close("dg", want, out["dg"], 1e-5, atol=1e-5)
    assert_close("dg (twin)", want, ref["dg"], 1e-5, atol=1e-5)


FWD_CASES = {  # chunk, B, T, cu_seqlens
    "dense": (64, 2, 128, None), "partial": (64, 2, 130, None), "block16": (16, 2, 72, None),
    "block128": (128, 1, 200, None), "packed": (64, 1, 200, [0, 70, 71, 200]),
}


@pytest.mark.parametrize("gate", [None, "g", "gk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_masked_write_fwd_matches_naive_and_fla(case, dtype, gate):
    """`masked_write_fwd` (`k·m` and the chunk-local gate cumsum) against its twin and fla's `chunk_local_cumsum`:
    whole and partial blocks, blocks of 16 and 128, packed input through fla's chunk indices, `m` as a strided view
    of routing weights `[B, N, H, 2]` (what the layer passes: 0/1 in bf16), scalar and per-key gates."""
    gn = gen(7)
    C, B, T, cu_list = FWD_CASES[case]
    cu = None if cu_list is None else torch.tensor(cu_list)
    ci = None if cu is None else prepare_chunk_indices(cu, C)
    N = -(-T // C) if cu is None else len(ci)
    K = 24
    k = torch.randn(B, T, 3, K, generator=gn).to(dtype)
    weights = (torch.rand(B, N, 3, 2, generator=gn) < 0.5).to(dtype)
    if dtype == torch.float32:  # not only 0/1: the product itself is checked (bf16 rounding on store differs
        weights[..., 1] = torch.rand(B, N, 3, generator=gn)  # between the interpreter and the GPU; 0/1 is exact)
    m = weights[..., 1]
    g = None if gate is None else \
        (-torch.rand(B, T, 3, *((K,) if gate == "gk" else ()), generator=gn)).to(dtype)
    k_m, gc = masked_write_fwd(k, m, g, chunk_size=C, scale=1.5, cu_seqlens=cu, chunk_indices=ci)
    ref_km, ref_gc = naive_masked_write_fwd(k, m, g, chunk_size=C, scale=1.5, cu_seqlens=cu)
    assert k_m.dtype == dtype and k_m.shape == k.shape
    assert torch.equal(k_m, ref_km)
    blk = 3 // C if cu is None else 0  # token 3: in block 0 of row 0 in every case
    assert torch.equal(k_m[:, 3], (k[:, 3].float() * m[:, blk][..., None].float()).to(dtype))
    if gate is None:
        assert gc is None and ref_gc is None
        return
    want = chunk_local_cumsum(g, C, scale=1.5, cu_seqlens=cu, chunk_indices=ci, output_dtype=torch.float32)
    assert gc.dtype == torch.float32 and gc.shape == g.shape
    assert_close("gc", want, gc, 1e-6, atol=1e-5)
    assert_close("gc (twin)", want, ref_gc, 1e-6, atol=1e-5)


def test_masked_write_fwd_rejects_bad_arguments():
    k = torch.zeros(2, 64, 3, 8)
    with pytest.raises(ValueError, match=r"m must have shape \[B=2, N=1, H=3\]"):
        masked_write_fwd(k, torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match=r"m must have shape \[B=2, N=1, H=3\]"):
        masked_write_fwd(k, torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        masked_write_fwd(k.transpose(1, 2), torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="g must have shape"):
        masked_write_fwd(k, torch.zeros(2, 1, 3), torch.zeros(2, 64, 3, 4))
    with pytest.raises(ValueError, match="key dims up to 256"):
        masked_write_fwd(torch.zeros(1, 4, 1, 300), torch.zeros(1, 1, 1))
    k_m, gc = masked_write_fwd(torch.zeros(2, 0, 3, 8), torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))
    assert k_m.shape == (2, 0, 3, 8) and gc.shape == (2, 0, 3)
