"""Ceiling probe (issue 5): one FlexAttention call over [compacted softmax keys | all keys], frozen router.

    PYTHONPATH=$PWD python3 benchmarks/probe_flex_compact.py [--T 65536] [--frac 0.125]

A candidate design for the softmax branch, measured before building it. Per head, the keys and values of the
softmax blocks of its router head are gathered in block order ("compact", `ns·C` rows), and all keys follow them:
`kv = [K_compact | K]`. A query of block `n` sees compact rows of rank `< p(n)` (the softmax blocks before `n`) and,
in the second segment, its own block causally: exactly the NAtS-L softmax branch (spec §1.3, §1.5, one sequence,
`diagonal="both"`), in ONE flex call with no log-sum-exp merge and no host sync (the BlockMask comes from `p` on the
device). The router's softmax gate gradient is not included (frozen router): it would need a gate column on q (head
dim 65, which FlexAttention rounds up) or a separate pass.

Checks the output and the q/k/v gradients against natsl's dense reference at T=2048 (bf16, max abs error next to
plain torch bf16), then times fwd and fwd+bwd at `--T` side by side with dense causal SDPA-cuDNN (same heads) and
natsl's `flash` backend (torch's FA2 varlen kernels) with the same routing, router frozen. Paper heads: H_A=12,
H_R=6, d=64, d_v=128, C=64, B=1, bf16.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from triton.testing import do_bench

from natsl.layers.routing import Routing
from natsl.layers.softmax.flash import FlashSoftmax
from natsl.reference import softmax_branch_reference

DEV, DT = "cuda", torch.bfloat16
B, H, HR, D, DV, C, M = 1, 12, 6, 64, 128, 64, 128
G = H // HR
OPTS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4,  # natsl's flex options (234 KB default)
        "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
flex = torch.compile(flex_attention, dynamic=False)


def routing(T, frac, seed=0):
    """`soft [HR, N]` with exactly round(frac·N) softmax blocks per router head (random positions)."""
    N = T // C
    g = torch.Generator(device=DEV).manual_seed(seed)
    soft = torch.zeros(HR, N, dtype=torch.bool, device=DEV)
    for r in range(HR):
        soft[r, torch.randperm(N, generator=g, device=DEV)[:round(frac * N)]] = True
    return soft


def plan(soft, T):
    """Compact-row sources `tok [H, ns·C]` and the BlockMask of the one flex call (no host sync but `ns`)."""
    ns = int(soft[0].sum())
    assert (soft.sum(1) == ns).all() and ns % 2 == 0 and T % M == 0
    sb = torch.stack([soft[r].nonzero().squeeze(-1) for r in range(HR)])  # [HR, ns] softmax blocks in order
    tok = (sb[..., None] * C + torch.arange(C, device=DEV)).reshape(HR, ns * C).repeat_interleave(G, 0)
    p = (torch.cumsum(soft.long(), 1) - soft.long()).repeat_interleave(G, 0)  # [H, N] softmax blocks before n
    NC = ns * C

    def mask_mod(b, h, q_idx, kv_idx):
        qb = q_idx // C
        past = (kv_idx < NC) & (kv_idx // C < p[h, qb])
        j = kv_idx - NC
        own = (kv_idx >= NC) & (j // C == qb) & (j <= q_idx)
        return past | own

    nq, nkc = T // M, NC // M  # q tiles; kv tiles of the compact segment (2 ranks each)
    p_lo, p_hi = p[:, 0::2], p[:, 1::2]  # [H, nq]: p of the first / second block of a q tile (non-decreasing)
    n_full = p_lo // 2  # compact tiles m with ranks 2m, 2m+1 < p_lo: visible to every query of the tile
    n_any = (p_hi + 1) // 2  # tiles with rank 2m < p_hi
    ar = torch.arange(nkc + nq, device=DEV)
    # partial tiles: compact tiles [n_full, n_any), then the tile's own diagonal tile nkc + i
    i = torch.arange(nq, device=DEV)
    n_part = n_any - n_full + 1
    part_idx = torch.where(ar < (n_any - n_full)[..., None], n_full[..., None] + ar, (nkc + i)[None, :, None])
    part_idx = torch.where(ar < n_part[..., None], part_idx, 0)
    full_idx = ar.expand(H, nq, -1)
    bm = BlockMask.from_kv_blocks(n_part[None].int(), part_idx[None].int(), n_full[None].int(),
                                  full_idx[None].int().contiguous(), BLOCK_SIZE=M, mask_mod=mask_mod,
                                  seq_lengths=(T, NC + T))
    return tok, bm


def natsl_flex(q, k, v, tok, bm, scale):
    """`q, k [B, H, T, d]`, `v [B, H, T, dv]` → o `[B, H, T, dv]`."""
    idx = tok[None, :, :, None]
    kc = torch.cat([torch.gather(k, 2, idx.expand(B, -1, -1, D)), k], 2)
    vc = torch.cat([torch.gather(v, 2, idx.expand(B, -1, -1, DV)), v], 2)
    return flex(q, kc, vc, block_mask=bm, scale=scale, kernel_options=OPTS)


def inputs(T, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g, device=DEV).to(DT) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=g, device=DEV).to(DT)
    do = torch.randn(B, H, T, DV, generator=g, device=DEV).to(DT)
    return q, k, v, do


def grads(o, leaves, do):
    return torch.autograd.grad((o.float() * do.float()).sum(), leaves)


def check(T=2048, frac=0.25):
    soft = routing(T, frac)
    tok, bm = plan(soft, T)
    q, k, v, do = inputs(T)
    w = torch.stack([soft.T, ~soft.T], -1)[None].float()  # [B, N, HR, 2]
    scale = D ** -0.5
    res = []
    for dt in (None, torch.float64, DT):
        leaves = [x.detach().to(dt or x.dtype).requires_grad_() for x in (q, k, v)]
        if dt is None:
            o = natsl_flex(*leaves, tok, bm, scale)
        else:  # natsl's dense reference: [B, T, H, *] layout
            route = Routing(w, C)
            gate = route.gates("selected")[0].to(dt)
            o = softmax_branch_reference(*(x.transpose(1, 2) for x in leaves), route, gate, scale).transpose(1, 2)
        res.append([o, *grads(o, leaves, do)])
    ref = res[1]
    for name, a, b, r in zip(("o", "dq", "dk", "dv"), res[0], res[2], ref):
        e, eb = ((x.double() - r.double()).abs().max().item() for x in (a, b))
        bound = 2 * eb + 1e-3 * r.abs().max().item()
        print(f"check T={T} f={frac}: {name} err {e:.2e} (plain torch bf16 {eb:.2e}) {'ok' if e <= bound else 'FAIL'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[65536])
    ap.add_argument("--frac", type=float, default=0.125)
    args = ap.parse_args()
    check()
    for T in args.T:
        soft = routing(T, args.frac)
        tok, bm = plan(soft, T)
        q, k, v, do = inputs(T)
        scale = D ** -0.5
        w = torch.stack([soft.T, ~soft.T], -1)[None].float()
        route = Routing(w, C)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        cases = {
            "dense causal sdpa-cudnn": lambda: F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale),
            "natsl-flash (FA2 varlen), frozen router": lambda: FlashSoftmax("varlen").forward(
                qt, kt, vt, route, scale=scale),
            "flex over [compact | all] keys, frozen router": lambda: natsl_flex(*leaves, tok, bm, scale),
        }
        dense = None
        for name, fn in cases.items():
            g_out = dot if name.startswith("natsl-flash") else do
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                fn().backward(g_out)  # warm / compile
                t_fb = do_bench(lambda: fn().backward(g_out))  # noqa: B023
                dense = dense or t_fb
                print(f"T={T} f={args.frac} {name}: fwd+bwd {t_fb:.2f} ms ({dense / t_fb:.2f}x dense)", flush=True)

                def fwd():
                    with torch.no_grad():
                        fn()
                print(f"T={T} f={args.frac} {name}: no-grad fwd {do_bench(fwd):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
