"""The NAtS-L linear branch (spec §1.4, §1.5, §1.7, §3.2), composed over stock linear-attention ops.

Routing reaches the recurrence only through its inputs: the linear write gate `m_L` on `beta` / `k` (and `g`),
modified queries, block batches and initial states. Three exact compositions share one entry point; the maths and
why each is exact (including the router gradient) are in `natsl/layers/README.md`, section "Linear branch".
"""

from __future__ import annotations

import collections
import functools
import os

import torch

from natsl.kernels.index import nonzero_static
from natsl.kernels.naive import naive_gather_rows, naive_scatter_rows
from natsl.layers.routing import Routing
from natsl.utils import LINEAR_BACKENDS, ROUTER_GRADS, capture_cuda_graph, check_choice

LINEAR_IMPLS = ("auto", "fla", "torch")
DELTA_BACKENDS = ("gdn", "deltanet")
COMPILE_MODES = ("auto", "on", "off", "cudagraphs")
#: Inductor backend of the compiled block maths; tests set `"aot_eager"` to check the traced graphs on CPU.
COMPILE_BACKEND = "inductor"
_COMPILED: dict = {}


def compile_mode() -> str:
    """The validated `NATSL_COMPILE` value (default `"auto"`)."""
    mode = os.environ.get("NATSL_COMPILE", "auto")
    check_choice("NATSL_COMPILE", mode, COMPILE_MODES)
    return mode


def bucket_blocks(n: int) -> int:
    """`n` rounded up to a multiple of `max(2**floor(log2 n) / 4, 8)`: at most 25% (or 7 blocks) of padding and
    four sizes per power of two, so `NATSL_COMPILE=cudagraphs` records few CUDA graphs across routings."""
    if n <= 8:
        return 8
    step = max((1 << (n.bit_length() - 1)) // 4, 8)
    return -(-n // step) * step


def graphs_wanted() -> bool:
    """Whether `NATSL_COMPILE=cudagraphs` replays the softmax blocks' WY maths as CUDA graphs (`_BlockGraphs`); the
    caller then pads the block batch to `bucket_blocks` sizes. On CPU the padded batch runs eager (tests)."""
    return compile_mode() == "cudagraphs" and not torch.compiler.is_compiling()


#: Most `_BlockGraphs` (one per padded block count and input signature) kept at once; the oldest is dropped first.
MAX_BLOCK_GRAPHS = 8
_BLOCK_GRAPHS: collections.OrderedDict = collections.OrderedDict()
_GRAPH_POOL: list = []


class _BlockGraphs:
    """CUDA graphs of one block-maths function `fn(*args)` at one static signature (shapes, dtypes, constants).

    Forward graph: `fn` without autograd. Backward graph: `fn` recomputed from the saved inputs and
    `torch.autograd.grad` of it (nothing is kept from the forward replay). Every replay copies its inputs into the
    graph's static buffers and clones its outputs, so calls of several layers, and several forwards before one
    backward, are independent: the failure of CUDA-graph trees under autograd (benchmarks/RESULTS.md, "Linear branch,
    third follow-up") cannot happen. All graphs share one memory pool (replays run in stream order, and every
    static input/output stays referenced). Graphs are captured lazily, the first forward/backward of a signature,
    after two warm-up runs on a side stream (where `torch.compile` compiles)."""

    def __init__(self, fn, args):
        self.fn = fn
        self.pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.inputs = [args[i].detach().clone() for i in self.pos]  # static input buffers
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]  # the constants; tensors go in `_with`
        self.fwd_graph = self.bwd_graph = None

    def _with(self, tensors):
        args = list(self.args)
        for i, t in zip(self.pos, tensors):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            args[i] = t
        return args

    @staticmethod
    def _capture(body):
        if not _GRAPH_POOL:
            _GRAPH_POOL.append(torch.cuda.graph_pool_handle())
        return capture_cuda_graph(body, pool=_GRAPH_POOL[0])

    def _fwd_body(self):
        with torch.no_grad():
            return self.fn(*self._with(self.inputs))

    def _bwd_body(self):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in self.inputs]
            outs = self.fn(*self._with(leaves))
            return torch.autograd.grad(outs, leaves, self.grad_out, allow_unused=True)

    def _load(self, static, tensors):
        for s, t in zip(static, tensors):
            s.copy_(t)

    def forward(self, tensors) -> tuple:
        self._load(self.inputs, tensors)
        if self.fwd_graph is None:
            self.fwd_graph, self.fwd_out = self._capture(self._fwd_body)
        self.fwd_graph.replay()
        return tuple(o.clone() for o in self.fwd_out)

    def backward(self, tensors, grads) -> tuple:
        self._load(self.inputs, tensors)
        if self.bwd_graph is None:
            self.grad_out = [g.detach().clone() for g in grads]
            self.bwd_graph, self.bwd_out = self._capture(self._bwd_body)
        else:
            self._load(self.grad_out, grads)
        self.bwd_graph.replay()
        return tuple(None if g is None else g.clone() for g in self.bwd_out)


class _GraphedBlockMath(torch.autograd.Function):
    """Autograd around `_BlockGraphs`: saves the inputs; the backward replays the recompute-and-grad graph."""

    @staticmethod
    def forward(ctx, graphs, *tensors):
        ctx.graphs = graphs
        ctx.save_for_backward(*tensors)
        return graphs.forward(tensors)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.graphs.backward(ctx.saved_tensors, grads))


def _replay(fn, args):
    """`fn(*args)` through the `_BlockGraphs` of its signature (created, or moved to the newest end of the cache)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    sig = (fn, tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args))
    graphs = _BLOCK_GRAPHS.get(sig)
    if graphs is None:
        graphs = _BLOCK_GRAPHS[sig] = _BlockGraphs(fn, args)
        while len(_BLOCK_GRAPHS) > MAX_BLOCK_GRAPHS:
            _BLOCK_GRAPHS.popitem(last=False)
    _BLOCK_GRAPHS.move_to_end(sig)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _GraphedBlockMath.apply(graphs, *tensors)
    with torch.no_grad():
        return graphs.forward(tensors)


def _block_math(fn, graphs: bool = False):
    """`fn` (pure tensor maths of the per-block WY solves) compiled with `torch.compile` where `NATSL_COMPILE`
    allows it, eager otherwise.

    The delta-rule branch does a few hundred small torch ops per call on 64×64 blocks; eager, they are bound by
    host launches (benchmarks/RESULTS.md, "Linear branch"). Compiled, Inductor fuses the element-wise work and
    one graph replaces the per-op autograd records. `NATSL_COMPILE`: `"auto"` (default: CUDA tensors only),
    `"on"` (any device; needs a working Inductor backend, e.g. a C++ compiler on CPU), `"cudagraphs"` (as `"auto"`,
    and a function made with `graphs=True` is replayed as CUDA graphs of the compiled maths, forward and backward
    (`_BlockGraphs`); the caller pads the block count to `bucket_blocks` sizes) or `"off"`. The first call per shape
    family compiles (seconds); the block count is marked dynamic so changing routings do not recompile. Inside an
    outer `torch.compile` the eager function is traced as part of the outer graph.
    """

    def call(*args):
        mode = compile_mode()
        t0 = args[0]
        if (mode == "off" or (mode in ("auto", "cudagraphs") and not t0.is_cuda)
                or torch.compiler.is_compiling()):
            return fn(*args)
        key = (fn, COMPILE_BACKEND)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
        if graphs and mode == "cudagraphs":
            return _replay(_COMPILED[key], args)
        for a in args:
            if isinstance(a, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return _COMPILED[key](*args)

    return functools.wraps(fn)(call)


def resolve_linear_op(backend: str, impl: str, device: torch.device):
    """The plain recurrence of `backend` for `impl` (`"auto"`: fla on CUDA, PyTorch elsewhere)."""
    check_choice("linear_backend", backend, LINEAR_BACKENDS)
    check_choice("linear_impl", impl, LINEAR_IMPLS)
    if impl == "fla" or (impl == "auto" and torch.device(device).type == "cuda"):
        from natsl.layers.linear.fla_ops import FLA_LINEAR_OPS, require_fla

        require_fla()
        return FLA_LINEAR_OPS[backend]
    from natsl.layers.linear import TORCH_LINEAR_OPS

    return TORCH_LINEAR_OPS[backend]


def linear_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, backend: str,
                  g: torch.Tensor | None = None, beta: torch.Tensor | None = None, impl: str = "auto",
                  scale: float | None = None, decay_through_softmax: bool = True, router_grad: str = "selected",
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    r"""Linear-branch output `o_L` of a routed layer call (spec §1.4) with the router gradient of spec §1.7.

    Equal (up to float rounding) to `natsl.reference.linear_branch_reference`; held to it by
    `tests/layers/test_linear_branch.py`.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]` linear queries / keys (`H` a multiple of the router heads `Hr`; head `h`
            follows router head `h // (H / Hr)`).
        v (torch.Tensor): `[B, T, H, V]`.
        routing (Routing): block types `[B, N, Hr, 2]` (index 0 = softmax), block size, diagonal policy and
            `cu_seqlens` for packed input (`B = 1`; blocks restart per sequence).
        backend (str): `"gdn"`, `"deltanet"`, `"gla"`, `"mamba2"` or `"linear_attn"`.
        g (torch.Tensor, Optional): log decay `[B, T, H]` (gdn, mamba2) or `[B, T, H, K]` (gla).
        beta (torch.Tensor, Optional): activated write strength `[B, T, H]` (gdn, deltanet).
        impl (str): `"auto"` (fla on CUDA, else PyTorch), `"fla"` or `"torch"`. Default: `"auto"`.
        scale (float, Optional): read-out scale. Default: `K ** -0.5`.
        decay_through_softmax (bool): whether softmax blocks decay the carried state. Default: `True`.
        router_grad (str): `"selected"` or `"both"` (spec §1.7). Default: `"selected"`.
        initial_state (torch.Tensor, Optional): `[B or N_seq, H, K, V]`.
        output_final_state (bool): return the state after the last block. Default: `False`.

    Returns:
        `o [B, T, H, V]` in the dtype of `q`, and `final_state [B or N_seq, H, K, V]` (float32; float64 for
        float64 inputs) or `None`.
    """
    check_choice("linear_backend", backend, LINEAR_BACKENDS)
    check_choice("linear_impl", impl, LINEAR_IMPLS)
    check_choice("router_grad", router_grad, ROUTER_GRADS)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a natsl Routing, got {type(routing).__name__}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, H, K = q.shape
    Hr = routing.num_router_heads
    if routing.B != B or H % Hr:
        raise ValueError(f"routing {tuple(routing.weights.shape)} does not fit B={B} and H={H} linear heads "
                         f"(a multiple of the router heads)")
    op = resolve_linear_op(backend, impl, q.device)
    scale = K ** -0.5 if scale is None else float(scale)
    cdt = torch.promote_types(q.dtype, torch.float32)
    lay = routing.layout(T)
    _, gate_l = routing.gates(router_grad)
    w = gate_l[:, lay.token_block].repeat_interleave(H // Hr, dim=-1).to(q.dtype)  # [B, T, H] write gate m_L
    need_w_grad = torch.is_grad_enabled() and w.requires_grad
    ctx = _Call(op, backend, routing, lay, B, T, H, Hr, K, v.shape[-1], scale, cdt, need_w_grad)
    fast = decay_through_softmax and not (backend in DELTA_BACKENDS and routing.diagonal == "softmax")
    if fast and backend in DELTA_BACKENDS:
        o, final = _delta_path(ctx, q, k, v, g, beta, w, initial_state, output_final_state)
    elif fast:
        o, final = _additive_path(ctx, q, k, v, g, w, initial_state, output_final_state)
    else:
        o, final = _probe_path(ctx, q, k, v, g, beta, w, decay_through_softmax, initial_state, output_final_state)
    if final is not None:
        final = final.to(cdt)
    return o.to(q.dtype), final


class _Call:
    """Per-call constants shared by the paths."""

    def __init__(self, op, backend, routing, lay, B, T, H, Hr, K, V, scale, cdt, need_w_grad):
        self.op, self.backend, self.routing, self.lay = op, backend, routing, lay
        self.B, self.T, self.H, self.Hr, self.G, self.K, self.V = B, T, H, Hr, H // Hr, K, V
        self.C = routing.block_size
        self.scale, self.cdt, self.need_w_grad = scale, cdt, need_w_grad
        self.cu = routing.cu_seqlens
        t = torch.arange(T, device=lay.token_block.device)
        if self.cu is None:
            self.first_token = t == 0  # [T] first token of a sequence
            self.first_rows = torch.arange(B, device=t.device) * T  # [B or N_seq] its rows in [B*T]
        else:
            cu = self.cu.to(t.device, torch.long)
            self.first_token = t == cu[lay.token_seq]
            self.first_rows = cu[:-1]
        self.first_blocks = torch.arange(B, device=t.device) * lay.N  # [B or N_seq] block of each sequence start
        if self.cu is not None:
            lens = cu[1:] - cu[:-1]
            nblk = (lens + self.C - 1) // self.C
            self.first_blocks = torch.cumsum(nblk, 0) - nblk
            j = torch.arange(self.C, device=t.device)
            rows = lay.block_start[:, None] + j
            self.all_rows = torch.where(j < lay.block_len[:, None], rows, torch.full_like(rows, -1))  # [N, C]
            first = self.first_token[rows.clamp(max=T - 1)]
            self.all_rows_prev = torch.where((self.all_rows >= 0) & ~first, rows - 1, torch.full_like(rows, -1))


def _gather(x2d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of `x2d [R, W]` (zero rows for `idx < 0`): natsl's Triton gather on CUDA, plain indexing elsewhere."""
    if x2d.is_cuda:
        from natsl.kernels import gather_rows

        return gather_rows(x2d, idx, unique_indices=True, validate=False)
    return naive_gather_rows(x2d, idx)


def _scatter(y2d: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[num_rows, W]`, zero except rows `idx[j] >= 0` which receive `y2d[j]` (the adjoint of `_gather`)."""
    if y2d.is_cuda:
        from natsl.kernels import scatter_rows

        return scatter_rows(y2d, idx, num_rows, validate=False)
    return naive_scatter_rows(y2d, idx, num_rows)


def _block_rows(c: _Call, b, r, n, Hr: int | None = None) -> torch.Tensor:
    """`[nb, C]` rows of the tokens of blocks `(b, r, n)` in the `[B*T*Hr]` row space, `-1` past a partial block."""
    Hr = c.Hr if Hr is None else Hr
    j = torch.arange(c.C, device=n.device)
    rows = ((b * c.T + c.lay.block_start[n])[:, None] + j) * Hr + r[:, None]
    return torch.where(j < c.lay.block_len[n][:, None], rows, torch.full_like(rows, -1))


def _blockify(x: torch.Tensor, idx: torch.Tensor, Hr: int) -> torch.Tensor:
    """`x [B, T, H, D]` → `[nb, C, H/Hr, D]`: the tokens of `idx [nb, C]` (zero rows for padding)."""
    B, T, H, D = x.shape
    return _gather(x.reshape(B * T * Hr, (H // Hr) * D), idx.reshape(-1)).view(*idx.shape, H // Hr, D)


def _blockify_gate(x: torch.Tensor | None, idx: torch.Tensor, Hr: int) -> torch.Tensor | None:
    """`_blockify` for `[B, T, H]` (→ `[nb, C, G]`) or `[B, T, H, K]` tensors; `None` stays `None`."""
    if x is None or x.dim() == 4:
        return None if x is None else _blockify(x, idx, Hr)
    return _blockify(x[..., None], idx, Hr)[..., 0]


def _unblockify(y: torch.Tensor, idx: torch.Tensor, B: int, T: int, Hr: int) -> torch.Tensor:
    """Inverse of `_blockify`: `[nb, C, G, D]` → `[B, T, Hr*G, D]`, zero at tokens not in `idx`."""
    nb, C, G, D = y.shape
    return _scatter(y.reshape(nb * C, G * D), idx.reshape(-1), B * T * Hr).view(B, T, Hr * G, D)


def _packed_blocks(c: _Call, x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """`[1, T, H, D]` or `[1, T, H]` → `[n, H, C, D]` / `[n, H, C]` in the compute dtype: the token rows `idx
    [n, C]` of packed input (zero where `idx < 0`)."""
    y = _blockify_gate(x, idx, 1)
    return None if y is None else y.transpose(1, 2).to(c.cdt)


# ---------------------------------------------------------------------------------------------------------------
# batched unit-lower-triangular inverses (2x2 block recursion down to 16, then Π_j (I + (−L)^{2^j})): a few dozen
# batched matmuls, far fewer launches and FLOPs than a blocked substitution, and no batched trsm


def _unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """`(I + L)^{-1}` for strictly lower `L [..., n, n]`. Differentiable."""
    n = L.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:
        return _unit_lower_inverse(torch.nn.functional.pad(L, (0, p - n, 0, p - n)))[..., :n, :n]
    if n <= 16:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        inv, P, j = eye - L, L, 2
        while j < n:
            P = P @ P
            inv = inv @ (eye + P)
            j *= 2
        return inv
    h = n // 2
    diag = _unit_lower_inverse(torch.stack([L[..., :h, :h], L[..., h:, h:]], -3))
    Ai, Di = diag[..., 0, :, :], diag[..., 1, :, :]
    low = -(Di @ L[..., h:, :h] @ Ai)
    return torch.cat([torch.cat([Ai, torch.zeros_like(Ai)], -1), torch.cat([low, Di], -1)], -2)


def _causal_decay(gb: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`exp(G_t − G_s)` for `s ≤ t` else 0 (`G` the in-block cumsum of `gb [..., C]`); the causal mask if no decay."""
    C = like.shape[-2]
    incl = torch.ones(C, C, dtype=torch.bool, device=like.device).tril()
    if gb is None:
        return incl.to(like.dtype)
    Gc = gb.cumsum(-1)
    return (Gc[..., :, None] - Gc[..., None, :]).masked_fill(~incl, float("-inf")).exp()


# ---------------------------------------------------------------------------------------------------------------
# delta rule (gdn, deltanet), decay_through_softmax=True


def _delta_block_read_and_local(qb, kb, vb, bb, gb, scale):
    """Per block (`[n, G, C, *]`, compute dtype): the read query `X_tᵀ q_t` of the block-start state and the
    zero-initial-state outputs of the block's own (real) updates. See README "Linear branch", delta rule."""
    KK = kb @ kb.transpose(-1, -2)
    QK = (qb @ kb.transpose(-1, -2)).tril()
    bcol = bb[..., None]
    P0 = _unit_lower_inverse((bcol * KK).tril(-1))
    q_read = qb - (QK @ P0) @ (bcol * kb)
    if gb is None:
        return q_read, scale * (QK @ P0) @ (bcol * vb)
    # the gated system is the ungated one under the diagonal similarity D = diag(exp(G)): (I + D L D⁻¹)⁻¹ =
    # D (I + L)⁻¹ D⁻¹, i.e. its inverse is P0 ∘ γ (γ_ts = exp(G_t − G_s) ≤ 1 for s ≤ t): no second inverse
    gamma = _causal_decay(gb, qb)
    return q_read, scale * ((QK * gamma) @ (P0 * gamma)) @ (bcol * vb)


@functools.partial(_block_math, graphs=True)
def _delta_blocks(qb, kb, vb, bb, gb, scale: float):
    """Gathered softmax blocks `q, k [nb, C, G, K]`, `v [nb, C, G, V]`, `β, g [nb, C, G]` (g may be None) →
    `(q_read [nb·C, G·K], o_blk [nb·C, G·V])` in the compute dtype (`_delta_block_read_and_local`)."""
    cdt = torch.promote_types(qb.dtype, torch.float32)
    q_read, o_blk = _delta_block_read_and_local(*(None if x is None else x.transpose(1, 2).to(cdt)
                                                  for x in (qb, kb, vb, bb, gb)), scale)
    nb, G, C = q_read.shape[:3]
    return q_read.transpose(1, 2).reshape(nb * C, -1), o_blk.transpose(1, 2).reshape(nb * C, -1)


def _gate_grad_blocks(Qb, Kb, Rb, Vb, gb, Bb, Wb, dOb, scale):
    """`β_s a_s·u_s` per token of blocks `[nb, H, C, *]` (compute dtype; `Rb` the previous token's read, `gb` may
    be None): see `_delta_in_block_gate_grad`. Returns `[nb, H, C]`."""
    Ub = Vb - Rb * (1.0 if gb is None else gb.exp()[..., None])
    gamma = _causal_decay(gb, Qb)
    P = _unit_lower_inverse(((Bb * Wb)[..., None] * (Kb @ Kb.transpose(-1, -2)) * gamma).tril(-1))
    Z = (scale * (Qb @ Kb.transpose(-1, -2)) * gamma).transpose(-1, -2) @ (dOb @ Ub.transpose(-1, -2))
    return Bb * (P * Z).sum(-2)


@_block_math
def _dense_gate_grad(q_in, k, o_r, read0, v, beta, g, w, do, C: int, scale: float):
    """`_gate_grad_blocks` for dense `[B, T, H, *]` token tensors, blocked here (zero-padded last block). The
    previous token's read is `o_r` shifted by one, with `read0 [B, H, V]` (the initial state's read, in the compute
    dtype; `None`: zero) at t = 0. Returns `[B, T, H]`."""
    B, T, H = q_in.shape[:3]
    N = (T + C - 1) // C
    cdt = torch.promote_types(q_in.dtype, torch.float32)
    first = torch.zeros_like(o_r[:, :1], dtype=cdt) if read0 is None else read0[:, None].to(cdt)
    prev = torch.cat([first, o_r[:, :-1].to(cdt)], 1)

    def blocks(x):
        if x is None:
            return None
        x4 = x if x.dim() == 4 else x[..., None]
        y = torch.nn.functional.pad(x4, (0, 0, 0, 0, 0, N * C - T)).reshape(B * N, C, H, -1).transpose(1, 2)
        return y.to(cdt) if x.dim() == 4 else y[..., 0].to(cdt)

    corr = _gate_grad_blocks(*(blocks(x) for x in (q_in, k, prev, v, g, beta, w, do)), scale)
    return corr.transpose(1, 2).reshape(B, N * C, H)[:, :T]


_packed_gate_grad = _block_math(_gate_grad_blocks)


def _delta_in_block_gate_grad(c: _Call, q_in, k, v, beta, g, w, o_r, initial_state, do):
    """Per token, the part of the main pass's `∂L/∂w` that flows through outputs of the token's own block
    (`β_s a_s·u_s`); the reference has no such path (spec §1.7), so it is subtracted. Returns `[B, T, H]`.

    `o_r` is the reads pass output (`S_tᵀ k_{t+1}` at token t), so `u_t = v_t − α_t o_r[t−1]` (and `S_0ᵀ k_t` at a
    sequence start). With `P = (I + L)^{-1}` and `X` the block's causal read matrix,
    `β_s a_s·u_s = β_s Σ_t' P_{t's} (Xᵀ D)_{t's}`, `D_{ts} = dO_t·u_s`: only `C×C` products besides `D`."""
    read0 = None
    if initial_state is not None:
        k0 = k.reshape(c.B * c.T, c.H, c.K)[c.first_rows]
        read0 = torch.einsum("nhk,nhkv->nhv", k0.to(c.cdt), initial_state.to(c.cdt))  # [B or N_seq, H, V]
    if c.cu is None:
        return _dense_gate_grad(q_in, k, o_r, read0, v, beta, g, w, do, c.C, c.scale)
    Qb, Kb, Vb, gb, Bb, Wb, dOb = (_packed_blocks(c, x, c.all_rows) for x in (q_in, k, v, g, beta, w, do))
    Rb = _packed_blocks(c, o_r, c.all_rows_prev)  # [nN, H, C, V], zero at sequence starts
    if read0 is not None:
        Rb[c.first_blocks, :, 0] = read0
    corr = _packed_gate_grad(Qb, Kb, Rb, Vb, gb, Bb, Wb, dOb, c.scale)  # [nN, H, C]
    return _unblockify(corr.transpose(1, 2)[..., None], c.all_rows, c.B, c.T, 1)[..., 0]


class _GateGradCorrection(torch.autograd.Function):
    """Identity on the main-pass output `o`; its backward removes the in-block part of the write gate's gradient."""

    @staticmethod
    def forward(ctx, o, w, q_in, k, v, beta, g, o_r, initial_state, call):
        ctx.call = call
        ctx.save_for_backward(q_in, k, v, beta, g, w, o_r, initial_state)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q_in, k, v, beta, g, w, o_r, initial_state = ctx.saved_tensors
        with torch.no_grad():
            corr = _delta_in_block_gate_grad(ctx.call, q_in, k, v, beta, g, w, o_r, initial_state, do)
        return (do, (-corr).to(w.dtype)) + (None,) * 8


def _delta_reads(c: _Call, k, v, g, bw, initial_state):
    """Forward-only call of the write-gated recurrence whose query at token t is `k_{t+1}` (scale 1): its output
    is `S_tᵀ k_{t+1}`, the read that `u_{t+1} = v_{t+1} − α_{t+1} S_tᵀ k_{t+1}` needs."""
    with torch.no_grad():
        last = torch.roll(c.first_token, -1)
        k_next = torch.cat([k[:, 1:], torch.zeros_like(k[:, :1])], 1).masked_fill(last[None, :, None, None], 0)
        return c.op(k_next, k, v, g, bw, scale=1.0, initial_state=initial_state, cu_seqlens=c.cu)[0]


def _rows_of_blocks(c: _Call, which: str):
    """The `which` blocks ("softmax", "linear" or "all"): `idx [nb, C]` token rows (−1 past a partial block), the valid
    rows `[n_tok]` and their positions in `idx.view(-1)`. Their counts come from `Routing.block_counts` (one host
    sync per routing, which waits only for the work queued before `Routing.prefetch_block_counts`)."""
    soft = c.routing.is_softmax()
    n_soft, tok_soft, tok_all = c.routing.block_counts(c.T)
    if which == "softmax":
        mask, nb, n_tok = soft, n_soft, tok_soft
    elif which == "linear":
        mask, nb, n_tok = ~soft, soft.numel() - n_soft, tok_all - tok_soft
    else:
        mask, nb, n_tok = torch.ones_like(soft), soft.numel(), tok_all
    b, r, n = nonzero_static(mask.permute(0, 2, 1), size=nb).unbind(-1)
    idx = _block_rows(c, b, r, n)
    flat = idx.reshape(-1)
    valid = nonzero_static(flat >= 0, size=n_tok).squeeze(-1)
    return idx, flat[valid], valid


def _delta_path(c: _Call, q, k, v, g, beta, w, initial_state, output_final_state):
    """gdn / deltanet: main pass with `β·m_L` and, at softmax-block tokens, the read query `X_tᵀ q_t`; plus the
    blocks' zero-state outputs from a batched WY solve. Exact; no probes, no second recurrence call for `o`."""
    q_in, blocks = q, None
    bw = beta * w
    if c.need_w_grad:  # the reads pass needs no block counts: queue it before waiting for them
        c.routing.prefetch_block_counts(c.T)
        nd = [None if x is None else x.detach() for x in (k, v, g, bw, initial_state)]
        o_r = _delta_reads(c, *nd)
    idx, rows, valid = _rows_of_blocks(c, "softmax")
    R = c.B * c.T * c.Hr
    if rows.numel():
        if graphs_wanted():  # padding blocks (rows -1) gather as zeros; `valid` skips their outputs
            idx = torch.nn.functional.pad(idx, (0, 0, 0, bucket_blocks(idx.shape[0]) - idx.shape[0]), value=-1)
        qb, kb, vb = (_blockify(x, idx, c.Hr) for x in (q, k, v))
        q_read, o_blk = _delta_blocks(qb, kb, vb, _blockify_gate(beta, idx, c.Hr), _blockify_gate(g, idx, c.Hr),
                                      c.scale)
        q_in = q.reshape(R, c.G * c.K).index_copy(0, rows, q_read.index_select(0, valid).to(q.dtype)).view_as(q)
        blocks = o_blk.index_select(0, valid)
    o, final = c.op(q_in, k, v, g, bw, scale=c.scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=c.cu)
    if c.need_w_grad:
        nd = [None if x is None else x.detach() for x in (q_in, k, v, beta, g, initial_state)]
        o = _GateGradCorrection.apply(o, w, nd[0], nd[1], nd[2], nd[3], nd[4], o_r, nd[5], c)
    if blocks is not None:
        o_rows = o.reshape(R, c.G * c.V)
        o = o_rows.index_copy(0, rows, (o_rows.index_select(0, rows).to(c.cdt) + blocks).to(o.dtype)).view_as(o)
    return o, final


# ---------------------------------------------------------------------------------------------------------------
# additive (gla, mamba2, linear_attn), decay_through_softmax=True


def _additive_path(c: _Call, q, k, v, g, w, initial_state, output_final_state):
    """gla / mamba2 / linear_attn: `o = main(k·m_L) + Σ_blocks zero-state run(k·c)` with `c = 1 − m_L`
    (`−m_L` for diagonal="softmax"). The output is affine in the state, so this is exact, router gradient included."""
    o, final = c.op(q, k * w[..., None], v, g, None, scale=c.scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=c.cu)
    coef = -w if c.routing.diagonal == "softmax" else 1 - w
    # blocks whose zero-state run is non-zero, or all of them when the gate needs its gradient
    which = "all" if c.need_w_grad else "linear" if c.routing.diagonal == "softmax" else "softmax"
    idx, rows, valid = _rows_of_blocks(c, which)
    if rows.numel():
        qb, kb, vb = (_blockify(x, idx, c.Hr) for x in (q, k * coef[..., None], v))
        o_blk, _ = c.op(qb, kb, vb, _blockify_gate(g, idx, c.Hr), None, scale=c.scale)
        o_rows = o.reshape(-1, c.G * c.V)
        add = o_blk.reshape(-1, c.G * c.V).index_select(0, valid).to(c.cdt)
        o = o_rows.index_copy(0, rows, (o_rows.index_select(0, rows).to(c.cdt) + add).to(o.dtype)).view_as(o)
    return o, final


# ---------------------------------------------------------------------------------------------------------------
# generic: probe tokens + block batch with initial states


def _probe_path(c: _Call, q, k, v, g, beta, w, decay_through_softmax, initial_state, output_final_state):
    """Any backend and option: main pass per (batch|sequence, router head) with `K` probe tokens before every
    "virtual" block (their outputs are `scale·S^{(i)}`), then every virtual block as one batch row from its start
    state. Virtual blocks: softmax blocks (all blocks for diagonal="softmax" or when the gate needs gradients)."""
    lay, dev = c.lay, q.device
    B, T, Hr, G, K = c.B, c.T, c.Hr, c.G, c.K
    soft = c.routing.is_softmax()
    virtual = torch.ones_like(soft) if (c.need_w_grad or c.routing.diagonal == "softmax") else soft
    # write-gated inputs of the carried state
    if c.backend in DELTA_BACKENDS:
        beta_m, k_m = beta * w, k
    else:
        beta_m, k_m = None, k * w[..., None]
    g_m = g if (g is None or decay_through_softmax) else g * (w if g.dim() == 3 else w[..., None])

    # flat order of the main pass: (b, seq, r, t); every token of a virtual block start is preceded by K probes
    t = torch.arange(T, device=dev)
    if c.cu is None:
        seq_start, seq_len, n_seq = torch.zeros_like(t), torch.full_like(t, T), 1
    else:
        cu = c.cu.to(dev, torch.long)
        seq_start, seq_len, n_seq = cu[lay.token_seq], (cu[1:] - cu[:-1])[lay.token_seq], cu.numel() - 1
    bb = torch.arange(B, device=dev)[:, None, None]
    rr = torch.arange(Hr, device=dev)[None, None, :]
    tt = t[None, :, None]
    r0 = (bb * T + seq_start[None, :, None]) * Hr + rr * seq_len[None, :, None] + (tt - seq_start[None, :, None])
    row = (bb * T + tt) * Hr + rr  # [B, T, Hr] row of (b, t, r)
    vstart = virtual[:, lay.token_block] & (t == lay.block_start[lay.token_block])[None, :, None]
    flat_row = torch.empty(B * T * Hr, dtype=torch.long, device=dev).index_put_((r0.reshape(-1),), row.reshape(-1))
    vs_flat = vstart.reshape(-1)[flat_row]
    pos_flat = torch.arange(B * T * Hr, device=dev) + K * torch.cumsum(vs_flat.long(), 0)
    vi = vs_flat.nonzero().flatten()  # one host sync: the number of virtual blocks
    nV = vi.numel()
    S_main = B * T * Hr + K * nV
    src = torch.full((S_main,), -1, dtype=torch.long, device=dev).index_put_((pos_flat,), flat_row)
    pstart = pos_flat[vi] - K
    probe_q = torch.zeros(S_main, K, dtype=q.dtype, device=dev)
    ar = torch.arange(K, device=dev)
    probe_q.index_put_(((pstart[:, None] + ar).reshape(-1), ar.repeat(nV)), torch.ones((), dtype=q.dtype, device=dev))
    # varlen units (b, seq, r), ordered as the flat order
    unit = ((bb * n_seq + lay.token_seq[None, :, None]) * Hr + rr).reshape(-1)
    n_units = B * n_seq * Hr
    unit_len = torch.bincount(unit, minlength=n_units) + K * torch.bincount(unit, weights=vstart.reshape(-1).to(
        torch.float64), minlength=n_units).long()
    cu_main = torch.nn.functional.pad(torch.cumsum(unit_len, 0), (1, 0))

    def pack(x):
        if x is None:
            return None
        x4 = x if x.dim() == 4 else x[..., None]
        y = _gather(x4.reshape(B * T * Hr, -1), src).view(1, S_main, G, x4.shape[-1])
        return y if x.dim() == 4 else y[..., 0]

    q_main = pack(q) + probe_q[None, :, None, :]
    init = None if initial_state is None else initial_state.reshape(-1, Hr, G, K, c.V).reshape(n_units, G, K, c.V)
    o_main, final = c.op(q_main, pack(k_m), pack(v), pack(g_m), pack(beta_m), scale=c.scale, initial_state=init,
                         output_final_state=output_final_state, cu_seqlens=cu_main)
    if final is not None:
        final = final.reshape(-1, Hr * G, K, c.V)
    o_rows = o_main.reshape(S_main, G * c.V)
    pos_row = torch.empty(B * T * Hr, dtype=torch.long, device=dev).index_put_((flat_row,), pos_flat)
    pos_row = pos_row.masked_fill(virtual[:, lay.token_block].reshape(-1), -1)
    o = _gather(o_rows, pos_row).view(B, T, Hr * G, c.V)
    if nV == 0:
        return o, final
    # block-start states of the virtual blocks, then every virtual block from its start state
    S_v = _gather(o_rows, (pstart[:, None] + ar).reshape(-1)).view(nV, K, G, c.V).transpose(1, 2)
    S_v = S_v.to(c.cdt) / c.scale
    vrow = flat_row[vi]
    vb_, vr_, vt_ = vrow // Hr // T, vrow % Hr, (vrow // Hr) % T
    idx = _block_rows(c, vb_, vr_, lay.token_block[vt_])
    # diagonal="softmax": the own block is read but not written (spec §1.5)
    no_write = c.routing.diagonal == "softmax"
    qb, kb, vb = (_blockify(x, idx, Hr) for x in (q, k, v))
    if no_write and c.backend not in DELTA_BACKENDS:
        kb = torch.zeros_like(kb)
    betab = None if beta is None else _blockify_gate(beta, idx, Hr)
    if betab is not None and no_write:
        betab = torch.zeros_like(betab)
    o_blk, _ = c.op(qb, kb, vb, _blockify_gate(g, idx, Hr), betab, scale=c.scale, initial_state=S_v)
    return o.to(c.cdt) + _unblockify(o_blk, idx, B, T, Hr).to(c.cdt), final
