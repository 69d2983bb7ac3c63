"""`flash` softmax backend: flash-attn varlen calls over gathered tokens (spec §1.3, §1.5, §1.7, §3.3).

Exact for training: the own block of every query is one causal varlen sequence per block; the past softmax
blocks of a query block form a prefix of its (batch, router head, sequence) list of softmax blocks, split by the
base-16 digits of its length (spec §3.3's dyadic scheme is `radix_bits=1`): one varlen call per digit level; the
parts are merged by their log-sum-exp and a custom backward runs each part's kernel backward with the merged
output and LSE. The softmax gate gradient of spec §1.7 comes out of the same backward calls (a constant-one
query column). Maths: `layers/softmax/README.md`.

Varlen kernels sit behind one small interface (`fwd` → `(out, lse)`, `bwd` → `(dq, dk, dv)`): torch's flash
kernels (the ones under `torch.nn.attention.varlen.varlen_attn`; the default), flash-attn-4 (`flash_attn.cute`,
forward only: its sm90 varlen backward failed the gradient check), and a pure-torch twin that makes the whole
algorithm testable on CPU. flash-attn 2 (`flash_attn`) has no adapter: torch's varlen kernels are flash-attn 2.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from natsl.kernels import gather_rows, scatter_add_rows
from natsl.kernels.index import blocks_before, nonzero_static
from natsl.layers.routing import Routing

# --------------------------------------------------------------------------------------------------------------
# varlen kernels: q [Tq, H, Dq], k [Tk, H, Dq], v [Tk, H, Dv]; cu_q, cu_k int32 [S + 1]; lse [H, Tq] (natural log
# of Σ exp(scale·q·k), over the keys of the query's sequence; FA2's bottom-right alignment for `causal`)
# --------------------------------------------------------------------------------------------------------------


class TorchVarlen:
    """Pure-PyTorch varlen attention with the flash-attn interface (dense per call: for tests and CPU).

    Args:
        equal_head_dims (bool): behave like flash-attn 2 and require `Dq == Dv` (so the backend pads exactly as
            it does for the GPU kernel). Default: `True`.
    """

    name = "torch"

    def __init__(self, equal_head_dims: bool = True):
        self.equal_head_dims = equal_head_dims

    def reasons(self, device: torch.device, dtype: torch.dtype, needs_grad: bool = False) -> list[str]:
        return []

    @staticmethod
    def _allowed(cu_q, cu_k, Tq, Tk, causal):
        dev = cu_q.device
        cu_q, cu_k = cu_q.long(), cu_k.long()
        sq = torch.searchsorted(cu_q[1:], torch.arange(Tq, device=dev), right=True)
        sk = torch.searchsorted(cu_k[1:], torch.arange(Tk, device=dev), right=True)
        allowed = sq[:, None] == sk[None, :]
        if causal:
            pq = torch.arange(Tq, device=dev) - cu_q[sq]
            pk = torch.arange(Tk, device=dev) - cu_k[sk]
            shift = (cu_k[1:] - cu_k[:-1] - cu_q[1:] + cu_q[:-1])[sq]
            allowed &= pk[None, :] <= (pq + shift)[:, None]
        return allowed

    @staticmethod
    def _compute_dtype(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _probs(self, q, k, cu_q, cu_k, causal, scale, lse=None):
        dt = self._compute_dtype(q)
        s = torch.einsum("qhd,khd->hqk", q.to(dt), k.to(dt)) * scale
        allowed = self._allowed(cu_q, cu_k, q.shape[0], k.shape[0], causal)
        s = s.masked_fill(~allowed, float("-inf"))
        if lse is None:
            lse = s.logsumexp(-1)
        finite = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        return torch.exp(s - finite[..., None]), lse

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        p, lse = self._probs(q, k, cu_q, cu_k, causal, scale)
        out = torch.einsum("hqk,khd->qhd", p, v.to(p.dtype))
        return out.to(q.dtype).contiguous(), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)

    def bwd(self, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        p, _ = self._probs(q, k, cu_q, cu_k, causal, scale, lse=lse.to(self._compute_dtype(q)))
        dt = p.dtype
        do_, v_ = do.to(dt), v.to(dt)
        dp = torch.einsum("qhd,khd->hqk", do_, v_)
        delta = (do_ * out.to(dt)).sum(-1).T  # [H, Tq]
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("hqk,khd->qhd", ds, k.to(dt)) * scale
        dk = torch.einsum("hqk,qhd->khd", ds, q.to(dt)) * scale
        dv = torch.einsum("hqk,qhd->khd", p, do_)
        return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# looked up once (find_spec inside a traced call is a torch.compile graph break)
_HAS_TORCH_VARLEN = hasattr(torch.ops.aten, "_flash_attention_backward") and \
    importlib.util.find_spec("torch.nn.attention.varlen") is not None


class TorchFlashVarlen:
    """torch's own flash-attention 2 kernels (`aten._flash_attention_forward/backward`, what
    `torch.nn.attention.varlen.varlen_attn` calls), fp16/bf16 on sm80+."""

    name = "varlen"
    equal_head_dims = True

    def reasons(self, device: torch.device, dtype: torch.dtype, needs_grad: bool = False) -> list[str]:
        out = []
        if device.type != "cuda":
            out.append("torch's flash varlen kernels need a CUDA device")
        elif torch.cuda.get_device_capability(device) < (8, 0):
            out.append("torch's flash varlen kernels need compute capability >= 8.0")
        if not _HAS_TORCH_VARLEN:
            out.append(f"torch {torch.__version__} has no varlen flash attention (needs torch >= 2.10)")
        elif device.type == "cuda" and not torch.backends.cuda.is_flash_attention_available():
            out.append("this torch build has no flash attention kernels")
        if dtype not in (torch.float16, torch.bfloat16):
            out.append(f"flash varlen kernels need float16/bfloat16 inputs, got {dtype}")
        return out

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                           scale=scale)[:2]
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"torch {torch.__version__}: unexpected varlen LSE shape {tuple(lse.shape)}, "
                               f"want [H, total_q] = {[q.shape[1], q.shape[0]]}")
        return out, lse

    def bwd(self, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0,
                                                              causal, rng, unused, scale=scale)
        return dq, dk, dv


class FA4Varlen:
    """flash-attn-4 (`flash_attn.cute`, CuTe DSL) varlen forward/backward, fp16/bf16 on sm90/sm100."""

    name = "fa4"
    equal_head_dims = False

    def reasons(self, device: torch.device, dtype: torch.dtype, needs_grad: bool = False) -> list[str]:
        out = []
        if needs_grad:
            # measured on the H200 (sm90) with flash-attn-4 4.0.0b36: forward exact, varlen backward dq wrong
            out.append("flash-attn-4's varlen backward failed natsl's bf16 gradient check on sm90 (4.0.0b36: dq "
                       "~100x the bf16 error); use it for inference only (no grad)")
        if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
            out.append("flash-attn-4 is not installed (`pip install flash-attn-4`, or `pip install natsl[flash4]`)")
        if device.type != "cuda":
            out.append("flash-attn-4 needs a CUDA device")
        elif torch.cuda.get_device_capability(device)[0] not in (9, 10, 11):
            out.append("flash-attn-4 needs compute capability 9.x, 10.x or 11.x")
        if dtype not in (torch.float16, torch.bfloat16):
            out.append(f"flash-attn-4 needs float16/bfloat16 inputs, got {dtype}")
        return out

    def fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        from flash_attn.cute.interface import _flash_attn_fwd
        res = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                              softmax_scale=scale, causal=causal, return_lse=True)
        return res[0], res[1]

    def bwd(self, do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        from flash_attn.cute.interface import _flash_attn_bwd
        res = _flash_attn_bwd(q, k, v, out, do, lse, softmax_scale=scale, causal=causal, cu_seqlens_q=cu_q,
                              cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        return res[0], res[1], res[2]


VARLEN_KERNELS = {"fa4": FA4Varlen, "varlen": TorchFlashVarlen, "torch": TorchVarlen}
# "auto" on CUDA takes the first of these that can run (the pure-torch twin is never chosen automatically);
# torch's flash kernels first: the only GPU kernels that passed the bf16 forward + backward checks on the H200
KERNEL_PREFERENCE = ("varlen", "fa4")

# --------------------------------------------------------------------------------------------------------------
# the plan: which gathered rows every varlen call reads (built on the device; one host sync)
# --------------------------------------------------------------------------------------------------------------


RADIX_BITS = 4  # the past prefix is split by base-16 digits (see build_plan)


@dataclass(frozen=True)
class _Level:
    q: slice  # this level's part of the plan's concatenated query rows
    k: slice  # and of its key rows
    cu_q: torch.Tensor  # [S + 1] int32 offsets of the level's varlen sequences in its query rows
    cu_k: torch.Tensor  # [S + 1] int32
    max_q: int
    max_k: int


@dataclass(frozen=True)
class _Plan:
    B: int
    T: int
    N: int
    Hr: int
    diag_cu: torch.Tensor | None  # [B*N + 1] int32 token offsets of every block in the [B*T] token space
    diag_max: int
    q_rows: torch.Tensor  # [Σ nq] rows of the [B*T*Hr, G, *] row space, all levels concatenated
    k_rows: torch.Tensor  # [Σ nk]
    k_gate: torch.Tensor  # [Σ nk] entry of the flattened [B, N, Hr] gate each key row belongs to
    levels: tuple[_Level, ...]


def _nonzero(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Flat indices of the `size` true entries of `mask`."""
    return nonzero_static(mask.reshape(-1), size, fill_value=0).view(-1)


def _cu_from_groups(gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`[num_groups + 1]` int32 offsets of the runs of equal values in the sorted-by-run `gid [n]`."""
    n = gid.shape[0]
    change = gid[1:] != gid[:-1]
    starts = _nonzero(change, num_groups - 1) + 1
    return torch.cat([gid.new_zeros(1), starts, gid.new_full((1,), n)]).to(torch.int32)


def build_plan(routing: Routing, T: int, radix_bits: int = RADIX_BITS) -> _Plan:
    """Gathered row lists and `cu_seqlens` of the diagonal call and of every level (one host sync).

    With `p` the number of softmax blocks before a query block in its (batch, router head, sequence) and its
    base-`S` digits (`S = 2**radix_bits`), `c_l = p >> (l·bits)`, `d_l = c_l mod S`: at level `l` the query block
    attends to the softmax blocks of local rank `[(c_l - d_l)·S^l, c_l·S^l)` (none if `d_l = 0`). These ranges
    tile `[0, p)`; one varlen sequence per (batch, router head, sequence, `c_l`), a run of query blocks.
    """
    lay = routing.layout(T)
    soft = routing.is_softmax()  # [B, N, Hr]
    B, N, Hr = soft.shape
    dev = soft.device
    C = routing.block_size
    if lay.num_seqs is None:
        fb = torch.zeros(N, dtype=torch.long, device=dev)
        bseq, n_seqs = fb, 1
    else:
        n_seqs, bseq = lay.num_seqs, lay.block_seq
        nblk = torch.bincount(bseq, minlength=n_seqs)
        fb = (torch.cumsum(nblk, 0) - nblk)[bseq]
    si = soft.long()
    excl = blocks_before(si)  # [B, N, Hr] softmax blocks before n in its batch row
    seq_base = excl[:, fb]  # ... before the first block of n's sequence
    p = excl - seq_base  # ... before n in its sequence (= the local rank of a softmax block)
    # inverse map: block of the g-th softmax block of every (b, r) row (slot N collects the linear blocks)
    inv = torch.full((B, Hr, N + 1), N, dtype=torch.long, device=dev)
    inv.scatter_(2, torch.where(soft, excl, N).permute(0, 2, 1),
                 torch.arange(N, device=dev).view(1, 1, N).expand(B, Hr, N).contiguous())

    S = 1 << radix_bits
    L = max(-(-max(N - 1, 1).bit_length() // radix_bits), 1)
    shift = (torch.arange(L, device=dev) * radix_bits).view(L, 1, 1, 1)
    c = p.permute(0, 2, 1)[None] >> shift  # [L, B, Hr, N]
    dgt = c & (S - 1)
    qb = dgt != 0
    b_idx = torch.arange(B, device=dev).view(1, B, 1, 1)
    r_idx = torch.arange(Hr, device=dev).view(1, 1, Hr, 1)
    gid = ((b_idx * Hr + r_idx) * n_seqs + bseq.view(1, 1, 1, N)) * (N + 1) + c  # varlen sequence id
    prev_same = torch.zeros_like(qb)
    prev_same[..., 1:] = qb[..., :-1] & (gid[..., 1:] == gid[..., :-1])
    start = qb & ~prev_same  # first query block of every sequence
    nblk_k = torch.where(start, dgt << shift, 0)  # key blocks of every sequence (at its first query block)
    qtok = qb * lay.block_len.view(1, 1, 1, N)
    cs = torch.cumsum(qtok, -1)
    base = torch.where(start, cs - qtok, 0).cummax(-1).values
    run = torch.where(qb, cs - base, 0)  # query tokens of the sequence so far
    stats = torch.stack([qtok.sum((1, 2, 3)), start.sum((1, 2, 3)), nblk_k.sum((1, 2, 3)), run.amax((1, 2, 3)),
                         nblk_k.amax((1, 2, 3))]).tolist()  # the one host sync
    nq, ns, nkb, max_q, max_kb = stats

    tb = lay.token_block
    q_lin = _nonzero(qb[..., tb], sum(nq))  # flat [L, B, Hr, T] entries, level-major
    t = q_lin % T
    r = (q_lin // T) % Hr
    b = (q_lin // (T * Hr)) % B
    q_rows = (b * T + t) * Hr + r
    gq = gid[..., tb].reshape(-1)[q_lin]

    s_lin = _nonzero(start, sum(ns))  # sequences, in the same (level, b, r, block) order as the queries
    s_n = s_lin % N
    s_r = (s_lin // N) % Hr
    s_b = (s_lin // (N * Hr)) % B
    s_l = s_lin // (N * Hr * B)
    s_nblk = nblk_k.reshape(-1)[s_lin]
    s_c = c.reshape(-1)[s_lin]
    s_sh = s_l * radix_bits
    first_g = ((s_c - (s_c & (S - 1))) << s_sh) + seq_base[s_b, s_n, s_r]  # row rank of the first key block
    total_kb = sum(nkb)
    seq_of = torch.repeat_interleave(torch.arange(s_lin.shape[0], device=dev), s_nblk, output_size=total_kb)
    within = torch.arange(total_kb, device=dev) - (torch.cumsum(s_nblk, 0) - s_nblk)[seq_of]
    kb_b, kb_r = s_b[seq_of], s_r[seq_of]
    kblock = inv[kb_b, kb_r, first_g[seq_of] + within]  # [Σ key blocks], all full (C tokens)
    ar = torch.arange(C, device=dev)
    k_rows = (((kb_b * T + lay.block_start[kblock])[:, None] + ar) * Hr + kb_r[:, None]).reshape(-1)
    k_gate = ((kb_b * N + kblock) * Hr + kb_r)[:, None].expand(-1, C).reshape(-1)
    seq_ktok = s_nblk * C

    levels = []
    oq = ok = os_ = 0
    for lev in range(L):
        if ns[lev] == 0:
            continue
        n_k = nkb[lev] * C
        sl_q, sl_k = slice(oq, oq + nq[lev]), slice(ok, ok + n_k)
        cu_k = torch.cat([seq_ktok.new_zeros(1), torch.cumsum(seq_ktok[os_:os_ + ns[lev]], 0)]).to(torch.int32)
        levels.append(_Level(sl_q, sl_k, _cu_from_groups(gq[sl_q], ns[lev]), cu_k, int(max_q[lev]),
                             int(max_kb[lev]) * C))
        oq, ok, os_ = oq + nq[lev], ok + n_k, os_ + ns[lev]

    diag_cu = None
    if routing.diagonal != "linear":
        starts = (torch.arange(B, device=dev)[:, None] * T + lay.block_start[None]).reshape(-1)
        diag_cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return _Plan(B, T, N, Hr, diag_cu, C, q_rows, k_rows, k_gate, tuple(levels))


# --------------------------------------------------------------------------------------------------------------
# forward / backward over the parts
# --------------------------------------------------------------------------------------------------------------


def _round8(x: int) -> int:
    return -(-x // 8) * 8


def _padded_dims(d: int, dv: int, equal: bool, gate_col: bool) -> tuple[int, int]:
    Dq, Dv = _round8(d + int(gate_col)), _round8(dv)
    if equal:
        Dq = Dv = max(Dq, Dv)
    return Dq, Dv


def _pad(x: torch.Tensor, D: int, one_col: int | None = None) -> torch.Tensor:
    """`x [..., d]` → contiguous `[..., D]`, zero-padded, with column `one_col` set to 1 if given."""
    d = x.shape[-1]
    if d == D and one_col is None:
        return x.contiguous()
    out = x.new_zeros(*x.shape[:-1], D)
    out[..., :d] = x
    if one_col is not None:
        out[..., one_col] = 1
    return out


def _gather(x_rows: torch.Tensor, idx: torch.Tensor, G: int) -> torch.Tensor:
    """Rows `idx` of `x_rows [R, G*D]` as a contiguous `[S, G, D]` (natsl's gather kernel)."""
    return gather_rows(x_rows, idx, validate=False).view(idx.shape[0], G, -1)


def _scatter_add(acc: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> None:
    """`acc [R, W] (float32/64) += y` at rows `idx` (natsl's scatter-add kernel)."""
    scatter_add_rows(y.reshape(y.shape[0], -1), idx, acc.shape[0], out=acc, validate=False)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_parts(qp, kp, vp, plan: _Plan, kernel, scale):
    """Merged `(o [R, G, Dv] acc dtype, lse [R, G])` of the diagonal part and every level (R = B*T*Hr)."""
    B, T, H, Dq = qp.shape
    Dv = vp.shape[-1]
    G, R = H // plan.Hr, B * T * plan.Hr
    adt = _acc_dtype(qp.dtype)
    dev = qp.device
    m = torch.full((R, G), float("-inf"), dtype=adt, device=dev)
    if plan.diag_cu is not None:
        od, lsed = kernel.fwd(qp.view(B * T, H, Dq), kp.view(B * T, H, Dq), vp.view(B * T, H, Dv), plan.diag_cu,
                              plan.diag_cu, plan.diag_max, plan.diag_max, True, scale)
        m = lsed.to(adt).T.reshape(R, G).contiguous()
    lse_d = m.clone()
    o_l = lse_l = None
    if plan.levels:
        qg = _gather(qp.view(R, G * Dq), plan.q_rows, G)
        kg, vg = _gather(kp.view(R, G * Dq), plan.k_rows, G), _gather(vp.view(R, G * Dv), plan.k_rows, G)
        outs = [kernel.fwd(qg[lv.q], kg[lv.k], vg[lv.k], lv.cu_q, lv.cu_k, lv.max_q, lv.max_k, False, scale)
                for lv in plan.levels]
        o_l = torch.cat([o for o, _ in outs]) if len(outs) > 1 else outs[0][0]
        lse_l = torch.cat([x.to(adt).T for _, x in outs])  # [Σ nq, G]
        m.scatter_reduce_(0, plan.q_rows[:, None].expand(-1, G), lse_l, "amax")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if plan.diag_cu is not None:
        acc_s = torch.exp(lse_d - m_safe)
        acc_o = od.reshape(R, G, Dv).to(adt) * acc_s[..., None]
    else:
        acc_s = torch.zeros(R, G, dtype=adt, device=dev)
        acc_o = torch.zeros(R, G, Dv, dtype=adt, device=dev)
    if o_l is not None:
        w = torch.exp(lse_l - m_safe[plan.q_rows])
        _scatter_add(acc_o.view(R, G * Dv), plan.q_rows, o_l * w[..., None])
        _scatter_add(acc_s, plan.q_rows, w)
    seen = acc_s > 0
    s_safe = torch.where(seen, acc_s, torch.ones_like(acc_s))
    o = torch.where(seen[..., None], acc_o / s_safe[..., None], 0.0)
    lse = torch.where(seen, m_safe + torch.log(s_safe), torch.full_like(acc_s, float("-inf")))
    return o.contiguous(), lse.contiguous()


class _FlashSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, plan: _Plan, kernel, scale: float):
        B, T, H, d = q.shape
        dv = v.shape[-1]
        gate_grad = gate is not None and ctx.needs_input_grad[3]
        Dq, Dv = _padded_dims(d, dv, kernel.equal_head_dims, gate_grad)
        # a constant-one query column against a zero key column leaves the scores unchanged; its key gradient is
        # scale·Σ_t dS_ts, the column sum the softmax gate gradient needs (README)
        qp = _pad(q, Dq, one_col=d if gate_grad else None)
        kp, vp = _pad(k, Dq), _pad(v, Dv)
        o, lse = _forward_parts(qp, kp, vp, plan, kernel, scale)
        o = o.to(q.dtype)
        ctx.save_for_backward(qp, kp, vp, o, lse)
        ctx.plan, ctx.kernel, ctx.scale, ctx.dims, ctx.gate_grad = plan, kernel, scale, (d, dv), gate_grad
        ctx.gate_dtype = None if gate is None else gate.dtype
        return o.view(B, T, H, Dv)[..., :dv]

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, o, lse = ctx.saved_tensors
        plan, kernel, scale = ctx.plan, ctx.kernel, ctx.scale
        d, dv = ctx.dims
        B, T, H, Dq = qp.shape
        Dv = vp.shape[-1]
        G, R = H // plan.Hr, B * T * plan.Hr
        adt = _acc_dtype(qp.dtype)
        dop = _pad(do.to(qp.dtype), Dv)
        lse_k = lse.to(torch.float32) if qp.dtype != torch.float64 else lse
        dq = torch.zeros(R, G * Dq, dtype=adt, device=qp.device)
        dk, dvv = torch.zeros_like(dq), torch.zeros(R, G * Dv, dtype=adt, device=qp.device)
        if plan.diag_cu is not None:
            lse_d = lse_k.reshape(B * T, H).T.contiguous()
            g = kernel.bwd(dop.view(B * T, H, Dv), qp.view(B * T, H, Dq), kp.view(B * T, H, Dq),
                           vp.view(B * T, H, Dv), o.view(B * T, H, Dv), lse_d, plan.diag_cu, plan.diag_cu,
                           plan.diag_max, plan.diag_max, True, scale)
            dq += g[0].reshape(R, -1)
            dk += g[1].reshape(R, -1)
            dvv += g[2].reshape(R, -1)
        dgate = None
        if plan.levels:
            qr, kr = plan.q_rows, plan.k_rows
            qg, dog, og = (_gather(x.view(R, -1), qr, G) for x in (qp, dop, o))
            kg, vg = _gather(kp.view(R, -1), kr, G), _gather(vp.view(R, -1), kr, G)
            lse_g = lse_k[qr]  # [Σ nq, G]
            grads = [kernel.bwd(dog[lv.q], qg[lv.q], kg[lv.k], vg[lv.k], og[lv.q], lse_g[lv.q].T.contiguous(),
                                lv.cu_q, lv.cu_k, lv.max_q, lv.max_k, False, scale) for lv in plan.levels]
            dqg, dkg, dvg = (torch.cat([g[i] for g in grads]) if len(grads) > 1 else grads[0][i] for i in range(3))
            _scatter_add(dq, qr, dqg)
            _scatter_add(dk, kr, dkg)
            _scatter_add(dvv, kr, dvg)
            if ctx.gate_grad:
                dgate = torch.zeros(B * plan.N * plan.Hr, dtype=torch.float64, device=qp.device)
                dgate.index_add_(0, plan.k_gate, dkg[:, :, d].to(torch.float64).sum(-1) / scale)
        if ctx.gate_grad and dgate is None:
            dgate = torch.zeros(B * plan.N * plan.Hr, dtype=torch.float64, device=qp.device)
        dq = dq.view(B, T, H, Dq)[..., :d].to(qp.dtype)
        dk = dk.view(B, T, H, Dq)[..., :d].to(qp.dtype)
        dvv = dvv.view(B, T, H, Dv)[..., :dv].to(qp.dtype)
        if dgate is not None:
            dgate = dgate.view(B, plan.N, plan.Hr).to(ctx.gate_dtype)
        return dq, dk, dvv, dgate, None, None, None


# --------------------------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------------------------


def _kernel_reasons(kernel, device, dtype, needs_grad) -> list[str]:
    return [f"{kernel.name}: {r}" for r in kernel.reasons(device, dtype, needs_grad)]


def _needs_grad(q, k, v, routing: Routing) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, routing.weights))


class FlashSoftmax:
    """Softmax branch over flash-attn varlen kernels on gathered tokens (exact, fwd + bwd).

    Args:
        kernel (str or kernel object): `"auto"` (the first of `KERNEL_PREFERENCE` that runs), `"varlen"`,
            `"fa4"`, `"torch"` (pure PyTorch: tests / CPU) or an object with the varlen-kernel interface.
            Default: `"auto"`.
        radix_bits (int): the past prefix of a query block is split by base-`2**radix_bits` digits: fewer,
            longer varlen calls for larger values, more duplicated key rows. Default: `RADIX_BITS` (4).
    """

    name = "flash"

    def __init__(self, kernel="auto", radix_bits: int = RADIX_BITS):
        if not isinstance(radix_bits, int) or radix_bits < 1:
            raise ValueError(f"radix_bits must be a positive int, got {radix_bits!r}")
        self.kernel = kernel
        self.radix_bits = radix_bits

    def _candidates(self):
        if isinstance(self.kernel, str):
            if self.kernel == "auto":
                return [VARLEN_KERNELS[n]() for n in KERNEL_PREFERENCE]
            return [VARLEN_KERNELS[self.kernel]()]
        return [self.kernel]

    def select_kernel(self, device: torch.device, dtype: torch.dtype, needs_grad: bool = False):
        """`(kernel or None, reasons)`: the first candidate kernel that runs here, or every reason none does."""
        reasons = []
        for kern in self._candidates():
            r = _kernel_reasons(kern, device, dtype, needs_grad)
            if not r:
                return kern, []
            reasons += r
        return None, reasons

    def not_supported_reasons(self, q, k, v, routing: Routing, router_grad: str = "selected") -> list[str]:
        _, reasons = self.select_kernel(q.device, q.dtype, _needs_grad(q, k, v, routing))
        reasons = list(reasons)
        if router_grad == "both" and routing.weights.requires_grad and torch.is_grad_enabled():
            reasons.append("flash computes the softmax-gate gradient of selected (softmax) blocks only: "
                           "router_grad='both' also needs it for unselected blocks (use backend='sdpa')")
        if max(q.shape[-1] + 1, v.shape[-1]) > 256:
            reasons.append(f"head dims must be <= 255 (q/k) and <= 256 (v), got {q.shape[-1]} and {v.shape[-1]}")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, scale: float,
                router_grad: str = "selected") -> torch.Tensor:
        """`q, k: [B, T, H_A, d]`, `v: [B, T, H_A, d_v]` → `o [B, T, H_A, d_v]` (one host sync for the plan)."""
        kernel, reasons = self.select_kernel(q.device, q.dtype, _needs_grad(q, k, v, routing))
        if kernel is None:
            raise ValueError("flash softmax backend cannot run: " + "; ".join(reasons))
        plan = build_plan(routing, q.shape[1], self.radix_bits)
        gate = None
        if torch.is_grad_enabled() and routing.weights.requires_grad:
            gate = routing.gates(router_grad)[0]
        return _FlashSoftmaxFunction.apply(q, k, v, gate, plan, kernel, scale)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int, *,
                 scale: float | None = None, kernel="auto", return_lse: bool = False):
    """Decode shape: one query per (batch, router head) against its packed KV, in one varlen call (no autograd).

    Args:
        q (torch.Tensor): `[B, H_A, d]` the current token's softmax queries.
        k (torch.Tensor): `[S, G, d]` packed keys: the rows of every (batch, router head) pair, pairs in row-major
            `(b, r)` order, `G = H_A / Hr` heads per row.
        v (torch.Tensor): `[S, G, d_v]`.
        cu_seqlens_k (torch.Tensor): `[B*Hr + 1]` int32/int64 offsets of each pair's rows (`Hr` is inferred).
        max_seqlen_k (int): the longest pair.
        scale (float, Optional): Default: `d ** -0.5`.
        kernel: as in `FlashSoftmax`. Default: `"auto"`.
        return_lse (bool): also return the log-sum-exp (for merging with another part). Default: `False`.

    Returns:
        `o [B, H_A, d_v]` (zero for a pair without keys) and, with `return_lse`, `lse [B, H_A]` float32
        (`-inf` for a pair without keys).
    """
    B, H, d = q.shape
    P = cu_seqlens_k.numel() - 1
    if P % B or H % (P // B):
        raise ValueError(f"cu_seqlens_k must have B*Hr + 1 entries with Hr dividing H={H}, got {P + 1} for B={B}")
    G = H // (P // B)
    if k.dim() != 3 or k.shape[1] != G or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k, v must be [S, G={G}, *] packed rows, got {tuple(k.shape)} and {tuple(v.shape)}")
    scale = d ** -0.5 if scale is None else scale
    kern, reasons = FlashSoftmax(kernel).select_kernel(q.device, q.dtype)
    if kern is None:
        raise ValueError("flash_decode cannot run: " + "; ".join(reasons))
    dv = v.shape[-1]
    Dq, Dv = _padded_dims(d, dv, kern.equal_head_dims, False)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    cu_q = torch.arange(P + 1, device=q.device, dtype=torch.int32)
    out, lse = kern.fwd(_pad(q.reshape(P, G, d), Dq), _pad(k, Dq), _pad(v, Dv), cu_q, cu_k, 1, max(int(max_seqlen_k), 1),
                        False, scale)
    empty = (cu_k[1:] == cu_k[:-1])[:, None]  # [P, 1]
    out = out[..., :dv].masked_fill(empty[..., None], 0.0).reshape(B, H, dv)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(lse.T, float("-inf")), lse.T).reshape(B, H).float()
    return out, lse


__all__ = ["FlashSoftmax", "flash_decode", "build_plan", "VARLEN_KERNELS", "TorchVarlen", "TorchFlashVarlen",
           "FA4Varlen"]
