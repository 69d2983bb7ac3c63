"""Softmax-branch backends against dense causal attention with the same heads (spec §7, issue 5).

Run on a GPU (one process; every provider is checked against the float64 reference before it is timed):
    NATSL_TEST_DEVICE=cuda PYTHONPATH=$PWD python3 benchmarks/bench_softmax_backends.py [--T 4096 16384 65536]
        [--fractions 0.125 0.25 0.5] [--providers ...]

Paper head config (340M): H_A=12 softmax heads of d=64 (q/k) and d_v=128, H_R=6 router heads, block 64, bf16,
B=1 (`--batch`). Routing: exactly a fraction f of the blocks of every router head is softmax (random positions).
`fwd` is timed under `torch.no_grad()` (prefill); `fwd+bwd` with q, k, v and the routing requiring grad
(router_grad="selected", the training setting; `natsl-flex-frozen-router`: the routing without grad). TFLOP/s
count only visible (query, key) pairs: fwd = 2·pairs·(d + d_v), fwd+bwd = 3.5 × fwd. "x dense" = the fastest dense
provider's time / this time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import env_line, markdown_table  # noqa: E402

from natsl.layers.routing import Routing  # noqa: E402
from natsl.layers.softmax import SOFTMAX_BACKENDS  # noqa: E402
from natsl.layers.softmax.flash import FlashSoftmax  # noqa: E402
from natsl.layers.softmax.flex import FlexSoftmax  # noqa: E402
from natsl.reference import softmax_branch_reference  # noqa: E402

SHAPE = dict(B=1, H=12, Hr=6, d=64, dv=128, block_size=64)
DTYPE = torch.bfloat16
DEVICE = "cuda"
T_LIST = (4096, 16384, 65536)
FRACTIONS = (0.125, 0.25, 0.5)
# measured in this order (the issue's target first, flash-attn-4's compile-heavy kernels last); also selectable:
# "natsl-flex64" (64-token BlockMask blocks: fails to lower on torch 2.11)
PROVIDERS = ["dense-sdpa-cudnn", "natsl-flash", "natsl-flex", "dense-fa4", "natsl-flash-fa4"]
NATSL = {"natsl-flash": lambda: FlashSoftmax("varlen"), "natsl-flex": lambda: SOFTMAX_BACKENDS["flex"],
         "natsl-flex-frozen-router": lambda: SOFTMAX_BACKENDS["flex"],
         "natsl-flex64": lambda: FlexSoftmax(mask_block=64), "natsl-flash-fa4": lambda: FlashSoftmax("fa4"),
         "natsl-triton": lambda: SOFTMAX_BACKENDS["triton"], "natsl-triton-frozen-router": lambda: SOFTMAX_BACKENDS["triton"]}


# natsl providers timed with the routing not requiring grad (no softmax-gate gradient: a frozen router)
FROZEN_ROUTER = {"natsl-flex-frozen-router", "natsl-triton-frozen-router"}


def make_inputs(T: int, frac: float, seed: int = 0) -> dict:
    B, H, Hr, d, dv, C = (SHAPE[k] for k in ("B", "H", "Hr", "d", "dv", "block_size"))
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    N = -(-T // C)
    soft = torch.zeros(B, N, Hr, dtype=torch.bool, device=DEVICE)
    n_soft = round(N * frac)
    for b in range(B):
        for r in range(Hr):
            soft[b, torch.randperm(N, generator=g, device=DEVICE)[:n_soft], r] = True
    q, k = (torch.randn(B, T, H, d, generator=g, device=DEVICE).to(DTYPE) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, device=DEVICE).to(DTYPE)
    w = torch.stack([soft, ~soft], -1).float()
    do = torch.randn(B, T, H, dv, generator=g, device=DEVICE).to(DTYPE)
    return dict(q=q, k=k, v=v, w=w, do=do, T=T, frac=frac, soft=soft)


def visible_pairs(inp: dict) -> int:
    """Σ over heads and queries of the keys each query sees (own block causally + past softmax blocks)."""
    C, G = SHAPE["block_size"], SHAPE["H"] // SHAPE["Hr"]
    T, soft = inp["T"], inp["soft"].long()
    blen = (T - torch.arange(soft.shape[1], device=DEVICE) * C).clamp(max=C)  # [N]
    before = (torch.cumsum(soft * blen[None, :, None], 1) - soft * blen[None, :, None])  # softmax keys before i
    own = blen * (blen + 1) // 2
    return int(G * (own[None, :, None] + blen[None, :, None] * before).sum())


def dense_pairs(T: int) -> int:
    return SHAPE["B"] * SHAPE["H"] * T * (T + 1) // 2


def fa4_available() -> bool:
    return FlashSoftmax("fa4").select_kernel(torch.device(DEVICE), DTYPE)[0] is not None


def forward(provider: str, q, k, v, w):
    """One forward of `provider` on `q, k: [B, T, H, d]`, `v: [B, T, H, d_v]` (`w`: the routing, natsl only)."""
    scale = SHAPE["d"] ** -0.5
    if provider in NATSL:
        impl, route = NATSL[provider](), Routing(w, SHAPE["block_size"])
        reasons = impl.not_supported_reasons(q, k, v, route, "selected")
        if reasons:
            raise RuntimeError("; ".join(reasons))
        return impl.forward(q, k, v, route, scale=scale, router_grad="selected")
    if provider == "dense-sdpa-cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, scale=scale).transpose(1, 2)
    if provider == "dense-fa4":
        from flash_attn.cute import flash_attn_func
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[0]
    raise ValueError(provider)


def setup(inp: dict, provider: str, train: bool) -> tuple[Callable, list[torch.Tensor]]:
    """`(fn, leaves)`: one forward (`train=False`, no grad) or forward+backward (`train=True`) of `provider`."""
    leaves = [inp[x].detach().requires_grad_(train) for x in ("q", "k", "v", "w")]
    if provider not in NATSL or provider in FROZEN_ROUTER:
        leaves = leaves[:3] + [leaves[3].detach()]
    if not train:
        def fwd():
            with torch.no_grad():
                return forward(provider, *leaves)
        return fwd, []

    def fwd_bwd():
        forward(provider, *leaves).backward(inp["do"])
    return fwd_bwd, [x for x in leaves if x.requires_grad]


def reference(provider: str, q, k, v, w, dtype):
    """The float64 (or plain-torch `dtype`) output: the NAtS-L reference, or dense causal attention."""
    scale = SHAPE["d"] ** -0.5
    if provider in NATSL:
        route = Routing(w, SHAPE["block_size"])
        return softmax_branch_reference(q, k, v, route, route.gates("selected")[0].to(dtype), scale)
    T = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v)


def verify(provider: str, T: int = 4096, frac: float = 0.125) -> str | None:
    """`None` if the output and gradients (q, k, v and, for natsl, the routing) pass
    `err <= 2·err(plain torch bf16) + atol` against float64, else what failed."""
    inp = make_inputs(T, frac, seed=1)
    natsl = provider in NATSL
    do = inp["do"].double()
    results = {}
    for dtype in (None, torch.float64, DTYPE):
        leaves = [inp[x].detach().to(dtype or DTYPE).requires_grad_() for x in ("q", "k", "v")]
        leaves.append(inp["w"].detach().to(torch.float32 if dtype is None else torch.float64).requires_grad_(natsl))
        out = forward(provider, *leaves) if dtype is None else reference(provider, *leaves, dtype)
        used = leaves if natsl else leaves[:3]
        results[dtype] = (out, torch.autograd.grad((out.double() * do).sum(), used))
    (out, g_out), (ref, g_ref), (base, g_base) = results[None], results[torch.float64], results[DTYPE]
    for name, a, r, b in zip(("o", "dq", "dk", "dv", "d_routing"), (out, *g_out), (ref, *g_ref), (base, *g_base)):
        e_out = (a.double() - r.double()).abs().max().item()
        e_base = (b.double() - r.double()).abs().max().item()
        atol = 1e-3 * max(r.abs().max().item(), 1e-3)
        if not e_out <= 2 * e_base + atol:
            return f"{name}: err {e_out:.3e} > 2 * {e_base:.3e} + {atol:.1e}"
    return None


def measure(inp: dict, provider: str) -> dict:
    row = {}
    for mode, train in (("fwd", False), ("fwd+bwd", True)):
        fn, leaves = setup(inp, provider, train)
        fn()  # compile / warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        row[f"{mode} peak MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row[f"{mode} ms"] = triton_bench(fn, leaves)
    return row


def triton_bench(fn, leaves):
    import triton
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves or None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, nargs="+", default=list(T_LIST))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--providers", nargs="+", default=PROVIDERS)
    parser.add_argument("--batch", type=int, default=SHAPE["B"], help="batch size B (default 1)")
    parser.add_argument("--name", default="bench_softmax_backends", help="report file stem under $OUT")
    parser.add_argument("--profile", nargs="*", default=None, metavar="PROVIDER",
                        help="also print the CUDA-kernel time breakdown of these natsl providers' fwd+bwd at the "
                             "first T and fraction (no names: natsl-flash)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    out_dir = os.environ.get("OUT", ".")
    log_path = os.path.join(out_dir, args.name + ".log")

    def say(msg):
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()
        with open(log_path, "a") as log:
            log.write(msg + "\n")

    say(f"# softmax backends, {DTYPE}, {SHAPE}, {env_line()}")
    providers = [p for p in args.providers if not p.endswith("fa4") or fa4_available()]
    skipped = sorted(set(args.providers) - set(providers))
    if skipped:
        say(f"skipped (flash-attn-4 not importable): {skipped}")
    status = {}
    for p in providers:
        t0 = time.time()
        try:
            status[p] = verify(p)
        except Exception as e:  # a provider that cannot run is reported, not fatal
            status[p] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        say(f"verify {p}: {'ok' if status[p] is None else 'FAILED ' + status[p]} ({time.time() - t0:.1f} s)")
    ok = [p for p in providers if status[p] is None]
    SHAPE["B"] = args.batch  # verified at B=1 (the float64 reference is dense), timed at B
    rows = []
    for T in args.T:
        dense = {}
        for p in [p for p in ok if p.startswith("dense")]:
            try:
                r = measure(make_inputs(T, 1.0), p)
            except Exception as e:
                say(f"T={T} {p}: {type(e).__name__}: {e}"[:300])
                continue
            dense[p] = r
            flops = 2 * dense_pairs(T) * (SHAPE["d"] + SHAPE["dv"])
            rows.append(dict(T=T, f="dense", provider=p, **{k: v for k, v in r.items() if "MiB" in k},
                             **_times(r, flops)))
            say(str(rows[-1]))
        for frac in args.fractions:
            inp = make_inputs(T, frac)
            flops = 2 * visible_pairs(inp) * (SHAPE["d"] + SHAPE["dv"])
            for p in [p for p in ok if p in NATSL]:
                t0 = time.time()
                try:
                    r = measure(inp, p)
                except Exception as e:
                    say(f"T={T} f={frac} {p}: {type(e).__name__}: {e}"[:300])
                    continue
                row = dict(T=T, f=frac, provider=p, **{k: v for k, v in r.items() if "MiB" in k}, **_times(r, flops))
                for mode in ("fwd", "fwd+bwd"):
                    best = min((d[f"{mode} ms"][0] for d in dense.values()), default=None)
                    if best is not None:
                        row[f"{mode} x dense"] = best / r[f"{mode} ms"][0]
                rows.append(row)
                say(f"{row} ({time.time() - t0:.1f} s)")
    for p in (args.profile or ["natsl-flash"]) if args.profile is not None else []:
        if p in ok and p in NATSL:
            say(profile(p, make_inputs(args.T[0], args.fractions[0])))
    cols = ["T", "f", "provider", "fwd ms", "fwd TF/s", "fwd x dense", "fwd+bwd ms", "fwd+bwd TF/s", "fwd+bwd x dense",
            "fwd+bwd peak MiB"]
    text = "\n".join([f"Softmax branch, {DTYPE}, B={SHAPE['B']} H_A=12 H_R=6 d=64 d_v=128 block=64, {env_line()}",
                      "verification: " + ", ".join(f"{p}: {'ok' if s is None else 'FAILED'}" for p, s in status.items()),
                      "", markdown_table(rows, cols)])
    say(text)
    with open(os.path.join(out_dir, args.name + ".md"), "w") as f:
        f.write(text + "\n")


def profile(provider: str, inp: dict, train: bool = True) -> str:
    """Top CUDA kernels of one forward+backward (or forward, `train=False`) (torch.profiler): where the time goes."""
    fn, _ = setup(inp, provider, train)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=60)
    return f"profile {provider} T={inp['T']} f={inp['frac']} {'fwd+bwd' if train else 'fwd'}:\n{table}"


def _times(r: dict, flops: float) -> dict:
    out = {}
    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
        ms = r[f"{mode} ms"][0]
        out[f"{mode} ms"] = ms
        out[f"{mode} TF/s"] = flops * mult / ms / 1e9
    return out


if __name__ == "__main__":
    main()
