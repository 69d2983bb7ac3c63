"""Decode latency per token and cache memory (spec §1.8, §7): NAtS-L with a forced softmax fraction vs dense K/V.

Run on a GPU (one process; prefill + decode is checked against the full forward before anything is timed):
    PYTHONPATH=$PWD python3 benchmarks/bench_generation.py [--contexts 8192 32768 131072] [--batch 1 8] [--models]
        [--decode-attention sdpa triton] [--linear-impl torch|auto]

The caches are built synthetically at context `T` (random K/V rows and linear states, bf16): every (batch, router
head) pair of a natsl layer holds exactly `round(f·T/C)` softmax blocks, a plain softmax layer all `T` rows. One
decode step = one layer (or model) call on one new token with the cache; it appends to the cache, so the context
grows by a few hundred tokens over a measurement (< 1% at 32k). Timings: `eager` = `triton.testing.do_bench` of the
eager call (includes the host's launch overhead whenever the GPU is faster than the host), `graph` = the same step
replayed as a CUDA graph at a fixed position (GPU time only, L2 flushed before each replay), `replay loop ms` (models)
= wall time per replay of that graph over 256 back-to-back replays (no flush, no host work between them),
`GraphDecoder ms/token` (models) = wall time per token of `natsl.models.GraphDecoder` over 256 tokens (two captured
steps: inside a block, block completion; both captured during a warm-up of two blocks).
`core` = the attention read alone (natsl: `attend_rows` over the pair's committed rows + current block, limits
computed once at setup; dense: `attend_last` over all rows).
Providers (layer level, the paper's 340M layer: H_L=6, d_k=128, d_v=256, H_A=12 × (64, 128), H_R=6, C=64):
- `natsl f=12.5%`: NAtSLAttention with 12.5% of the blocks of every pair routed to softmax;
- `natsl f=100%`: the same layer with every block softmax (dense K/V of the same heads);
- `softmax 16x64`: the Transformer's SoftmaxAttention layer (16 heads × 64, dense K/V).
With `--models`: the 340M NAtS-L Hybrid (f=12.5%), GDN Hybrid (all GDN) and Transformer, one token through 21 layers.
Every provider runs with each softmax read given to `--decode-attention` (column `read`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import bench_graph_ms, bench_ms, capture_cuda_graph, env_line, host_us_per_call, markdown_table  # noqa: E402

from natsl import NAtSLAttention, NAtSLConfig, NAtSLForCausalLM  # noqa: E402
from natsl.layers.baselines import LinearAttention, SoftmaxAttention  # noqa: E402
from natsl.layers.state import LinearLayerState, NAtSLLayerState, SoftmaxLayerState, attend_rows  # noqa: E402
from natsl.models.cache import NAtSLCache  # noqa: E402
from natsl.models.graphs import GraphDecoder  # noqa: E402

SHAPES = {
    "340m layer": dict(hidden_size=1024, num_heads=6, head_dim=128, expand_v=2, num_softmax_heads=12,
                       num_router_heads=6, block_size=64),
}
PROVIDERS = ["natsl f=12.5%", "natsl f=100%", "softmax 16x64"]
MODEL_PROVIDERS = ["natsl-hybrid-340m f=12.5%", "gdn-hybrid-340m", "transformer-340m"]
DTYPE = torch.bfloat16
DEVICE = os.environ.get("NATSL_BENCH_DEVICE", "cuda")
# the softmax backend and chunked linear path of the gate's full forward; `--linear-impl` also picks the decode
# step of the linear recurrences (torch ops, or fla's fused recurrent kernel), `--decode-attention` the softmax read
CPU_PATHS = dict(softmax_backend="sdpa", linear_impl="torch")
DECODE = dict(decode_attention="sdpa")
HEADROOM_BLOCKS = 16
OFFSET = 5  # the measured steps sit inside a block (no commit, hence no possible sync, inside a CUDA graph)


def _randn(*shape, dtype=None, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype or DTYPE)


def _dtype():
    return DTYPE


def natsl_state(layer: NAtSLAttention, B: int, T: int, frac: float) -> NAtSLLayerState:
    """A cache at context `T + OFFSET` whose every pair holds exactly `round(frac · T / C)` softmax blocks."""
    C, Hr = layer.block_size, layer.num_router_heads
    L = round(frac * (T // C)) * C
    cap = L + HEADROOM_BLOCKS * C
    st = NAtSLLayerState(block_size=C, num_router_heads=Hr, decay_through_softmax=layer.decay_through_softmax)
    W = layer.q_conv1d.kernel_size[0]
    st.conv = {n: torch.zeros(B, W - 1, dim, device=DEVICE, dtype=_dtype())
               for n, dim in (("q", layer.key_dim), ("k", layer.key_dim), ("v", layer.value_dim))}
    st.router_sum = torch.zeros(B, layer.hidden_size, device=DEVICE)
    st.linear_start = _randn(B, layer.num_heads, layer.head_dim, layer.head_v_dim, dtype=torch.float32, scale=0.01)
    st.linear_run = st.linear_start.clone()
    st.log_decay = torch.zeros(B, layer.num_heads, device=DEVICE) if layer.linear_backend in ("gdn", "mamba2") else None
    st.k_rows = _randn(B, layer.num_softmax_heads, cap, layer.softmax_head_dim)
    st.v_rows = _randn(B, layer.num_softmax_heads, cap, layer.softmax_value_dim)
    st.lengths = torch.full((B, Hr), L, dtype=torch.long, device=DEVICE)
    st.length_bound = L
    st.seen_tokens = T + OFFSET
    return st


def linear_state(layer: LinearAttention, B: int, T: int) -> LinearLayerState:
    W = layer.q_conv1d.kernel_size[0]
    K, V = layer.num_heads * layer.head_dim, layer.num_heads * layer.head_v_dim
    conv = {n: torch.zeros(B, W - 1, dim, device=DEVICE, dtype=_dtype()) for n, dim in (("q", K), ("k", K), ("v", V))}
    S = _randn(B, layer.num_heads, layer.head_dim, layer.head_v_dim, dtype=torch.float32, scale=0.01)
    return LinearLayerState(seen_tokens=T + OFFSET, conv=conv, state=S)


def softmax_state(layer: SoftmaxAttention, B: int, T: int) -> SoftmaxLayerState:
    cap = T + OFFSET + HEADROOM_BLOCKS * 64
    st = SoftmaxLayerState(seen_tokens=T + OFFSET)
    st.k_rows = _randn(B, layer.num_heads, cap, layer.head_dim)
    st.v_rows = _randn(B, layer.num_heads, cap, layer.head_dim)
    return st


def state_for(module, B, T, frac):
    if isinstance(module, NAtSLAttention):
        return natsl_state(module, B, T, frac)
    if isinstance(module, LinearAttention):
        return linear_state(module, B, T)
    return softmax_state(module, B, T)


def kv_report(states) -> dict:
    soft = used = lin = 0
    for s in states:
        if isinstance(s, NAtSLLayerState):
            used += s.softmax_kv_bytes()
            soft += s.softmax_kv_allocated_bytes()
            lin += s.linear_state_bytes()
        elif isinstance(s, SoftmaxLayerState):
            used += s.kv_bytes()
            soft += s.kv_allocated_bytes()
        else:
            lin += s.linear_state_bytes()
    return {"KV MiB": used / 2**20, "KV alloc MiB": soft / 2**20, "linear MiB": lin / 2**20}


def setup(shape: dict, provider: str, T: int, B: int):
    """`(step, core, states)`: one decode step of the layer with its cache, the attention read alone, the states."""
    torch.manual_seed(0)
    if provider.startswith("natsl"):
        module = NAtSLAttention(**shape, **CPU_PATHS, **DECODE).to(DEVICE, DTYPE).eval()
        frac = 0.125 if "12.5" in provider else 1.0
    else:
        module = SoftmaxAttention(hidden_size=shape["hidden_size"], num_heads=16, **DECODE).to(DEVICE, DTYPE).eval()
        frac = 1.0
    st = state_for(module, B, T, frac)
    x = _randn(B, 1, shape["hidden_size"])

    @torch.no_grad()
    def step():
        return module(x, past_key_values=st, use_cache=True)[0]

    if isinstance(module, NAtSLAttention):
        q = _randn(B, 1, module.num_softmax_heads, module.softmax_head_dim)
        scale = module.softmax_head_dim ** -0.5

        C = module.block_size  # the rows a decode step's query reads: committed ones and its block so far
        limit = st.head_lengths()[..., None] + (st.device_position(x.device) - 1) % C + 1

        def core():
            return attend_rows(q, st.k_rows, st.v_rows, limit, scale, DECODE["decode_attention"])
    else:
        q = _randn(B, 1, module.num_heads, module.head_dim)

        def core():
            return st.attend_last(q, module.head_dim ** -0.5, DECODE["decode_attention"])
    return step, core, [st]


def setup_model(provider: str, T: int, B: int):
    family = {"natsl-hybrid-340m f=12.5%": "hybrid", "gdn-hybrid-340m": "linear", "transformer-340m": "softmax"}[provider]
    cfg = NAtSLConfig.preset("340m", family, num_hidden_layers=21, **CPU_PATHS, **DECODE)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = NAtSLForCausalLM(cfg)
    model = model.to(DTYPE).eval()
    cache = NAtSLCache()
    cache.layers = [state_for(b.attn, B, T, 0.125) for b in model.model.layers]
    ids = torch.randint(1, cfg.vocab_size, (B, 1), device=DEVICE)

    @torch.no_grad()
    def step():
        return model(ids, cache=cache).logits

    return step, cache.layers, (model, cache, ids)


def decoder_ms_per_token(model, cache, ids, tokens: int = 256) -> float:
    """Wall time per token of `GraphDecoder.step` over `tokens` steps (replays of its two captured steps, four block
    completions), after a warm-up of two blocks and two steps, in which each kind of step runs once eagerly and is
    captured once (one-time costs of a generation, not of a token: the first block completion is the eager warm-up
    of its kind, the second its capture)."""
    decoder = GraphDecoder(model)
    for _ in range(2 * model.config.block_size + 2):
        decoder.step(ids, cache)
    if decoder.captures != decoder.eager_steps:  # each kind of step that occurred: one eager warm-up, one capture
        raise RuntimeError(f"warm-up left a step kind uncaptured ({decoder.eager_steps} eager, {decoder.captures} "
                           "captured)")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(tokens):
        decoder.step(ids, cache)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / tokens * 1e3


def profile_step(step, label: str, top: int = 8) -> None:
    """Print the `top` CUDA kernels of three eager decode steps by GPU time (what a step spends its time on)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"profile {label} (3 eager steps):")  # noqa: T201
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))  # noqa: T201


def gate() -> float:
    """Max error of prefill + decode against the full forward, on the GPU (fp32, torch/SDPA paths)."""
    torch.manual_seed(0)
    shape = dict(SHAPES["340m layer"], hidden_size=256, num_heads=2, head_dim=64, num_softmax_heads=4,
                 num_router_heads=2)
    layer = NAtSLAttention(**shape, **CPU_PATHS).to(DEVICE).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if "router" in name else 0.02))
        x = torch.randn(2, 300, shape["hidden_size"], device=DEVICE)
        ref = layer(x)[0]
        st, outs = None, []
        for a, b in [(0, 100), (100, 230)] + [(t, t + 1) for t in range(230, 300)]:
            o, _, st = layer(x[:, a:b], past_key_values=st, use_cache=True)
            outs.append(o)
    return ((torch.cat(outs, 1) - ref).abs().max() / ref.abs().max()).item()


def layer_rows(args, read: str) -> list[dict]:
    rows = []
    for B in args.batch:
        for T in args.contexts:
            base = {}
            for prov in PROVIDERS:
                graph = float("nan")
                if not args.no_graph:  # on a fresh cache: the captured steps sit inside a block
                    graph = bench_graph_ms(setup(SHAPES["340m layer"], prov, T, B)[0])[0]
                    torch.cuda.empty_cache()
                step, core, states = setup(SHAPES["340m layer"], prov, T, B)
                eager = bench_ms(step)[0]
                core_ms = bench_ms(core)[0]
                row = {"level": "layer", "B": B, "T": T, "provider": prov, "read": read, "eager ms": eager,
                       "graph ms": graph, "core ms": core_ms, **kv_report(states)}
                base[prov] = row
                rows.append(row)
                print(row, flush=True)  # noqa: T201
                if args.profile and (max(args.batch), max(args.contexts)) == (B, T) and prov.startswith("natsl"):
                    profile_step(step, f"{prov} B={B} T={T}")
                del step, core, states
                torch.cuda.empty_cache()
            ref = base["softmax 16x64"]
            for prov in PROVIDERS:
                for key in ("eager ms", "graph ms", "core ms"):
                    base[prov][f"x vs softmax ({key[:-3]})"] = ref[key] / base[prov][key]
    return rows


def model_rows(args, T: int, read: str) -> list[dict]:
    """The three 340M models at context `T` (B=1) with the softmax read `read`; `x vs transformer` compares with
    the Transformer under the same read."""
    rows = []
    for prov in MODEL_PROVIDERS:
        graph = loop = float("nan")
        if not args.no_graph:
            g, _ = capture_cuda_graph(setup_model(prov, T, 1)[0])
            graph = bench_ms(g.replay)[0]
            loop = host_us_per_call(g.replay, n=256) / 1e3
            del g
            torch.cuda.empty_cache()
        step, states, _ = setup_model(prov, T, 1)
        eager = bench_ms(step)[0]
        del step, states
        torch.cuda.empty_cache()
        _, states, (model, cache, ids) = setup_model(prov, T, 1)
        decoder = decoder_ms_per_token(model, cache, ids)
        row = {"level": "model", "B": 1, "T": T, "provider": prov, "read": read, "eager ms": eager,
               "graph ms": graph, "replay loop ms": loop, "GraphDecoder ms/token": decoder, **kv_report(states)}
        rows.append(row)
        print(row, flush=True)  # noqa: T201
        del model, cache, states
        torch.cuda.empty_cache()
    ref = rows[-1]
    for row in rows:
        row["x vs transformer (GraphDecoder)"] = ref["GraphDecoder ms/token"] / row["GraphDecoder ms/token"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-layers", action="store_true", help="with --models: the models only")
    ap.add_argument("--profile", action="store_true", help="profile the eager natsl steps at the largest B and T")
    ap.add_argument("--decode-attention", nargs="+", default=["sdpa"], choices=("sdpa", "triton"),
                    help="the softmax read(s) of decode steps (natsl.layers.state.attend_rows); with several, every "
                         "provider is measured with each, in this process")
    ap.add_argument("--linear-impl", default="torch", choices=("torch", "auto"),
                    help="linear path: torch ops, or fla (chunked prefill and the fused recurrent decode step)")
    args = ap.parse_args()
    CPU_PATHS["linear_impl"] = args.linear_impl
    err = gate()
    print(f"gate: prefill + decode vs full forward (fp32), max rel. error {err:.2e}", flush=True)  # noqa: T201
    if not err < (1e-4 if args.linear_impl == "torch" else 2e-3):  # fla kernels: fp32 inputs, tf32-class matmuls
        raise SystemExit("correctness gate failed: not timing anything")
    print(f"{env_line()}; decode_attention={args.decode_attention}, linear_impl={args.linear_impl}", flush=True)  # noqa: T201
    rows = []
    for read in ([] if args.no_layers else args.decode_attention):
        DECODE["decode_attention"] = read
        rows += layer_rows(args, read)
    if args.models:
        for T in args.contexts:
            for read in args.decode_attention:
                DECODE["decode_attention"] = read
                rows += model_rows(args, T, read)
    cols = ["level", "B", "T", "provider", "read", "eager ms", "graph ms", "replay loop ms", "GraphDecoder ms/token",
            "x vs transformer (GraphDecoder)", "core ms", "x vs softmax (eager)",
            "x vs softmax (graph)", "x vs softmax (core)", "KV MiB", "KV alloc MiB", "linear MiB"]
    text = markdown_table(rows, cols)
    print(text)  # noqa: T201
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_generation.md"), "w") as f:
            f.write(env_line() + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
