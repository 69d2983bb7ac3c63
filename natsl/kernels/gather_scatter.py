"""Gather / scatter of rows and routed tokens with autograd (spec §3: moving tokens by route).

Index layout and maths: `natsl/kernels/README.md`. Pure-PyTorch twins (test oracle and CPU fallback): `naive.py`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from natsl.kernels.naive import (
    naive_copy_blocks,
    naive_gather_rows,
    naive_gather_tokens,
    naive_scatter_add_rows,
    naive_scatter_rows,
    naive_scatter_tokens,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _offsets(r, w, R1, R2, s0, s1, s2, sw, FLAT: tl.constexpr, UNIT_W: tl.constexpr):
    # [BR, BW] element offsets of columns w of rows r in a [R0, R1, R2] row space with strides (s0, s1, s2);
    # FLAT: R1 = R2 = 1 (no divisions); UNIT_W: unit column stride (vectorised access)
    if FLAT:  # noqa: SIM108 (a compile-time branch)
        o_r = r * s0
    else:
        o_r = (r // (R1 * R2)) * s0 + ((r // R2) % R1) * s1 + (r % R2) * s2
    if UNIT_W:
        return o_r[:, None] + w[None, :]
    return o_r[:, None] + w[None, :] * sw


@triton.jit(do_not_specialize=["S", "R"])
def gather_rows_fwd_kernel(
    x, idx, o, S, R, W,
    xR1, xR2, xs0, xs1, xs2, xsw,
    oR1, oR2, os0, os1, os2, osw,
    BR: tl.constexpr, BW: tl.constexpr,
    X_FLAT: tl.constexpr, X_UNIT_W: tl.constexpr, O_FLAT: tl.constexpr, O_UNIT_W: tl.constexpr,
):
    # o[j] = x[idx[j]] for 0 <= idx[j] < R, else 0: every element of o[:S, :W] is written
    i_r, i_w = tl.program_id(0), tl.program_id(1)
    o_j = i_r.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    o_w = i_w.to(tl.int64) * BW + tl.arange(0, BW).to(tl.int64)  # [BW]
    m_j = o_j < S
    m_w = o_w < W
    k = tl.load(idx + o_j, mask=m_j, other=-1).to(tl.int64)
    m_k = m_j & (k >= 0) & (k < R)
    p_x = x + _offsets(k, o_w, xR1, xR2, xs0, xs1, xs2, xsw, X_FLAT, X_UNIT_W)
    b_x = tl.load(p_x, mask=m_k[:, None] & m_w[None, :], other=0.)  # [BR, BW]
    p_o = o + _offsets(o_j, o_w, oR1, oR2, os0, os1, os2, osw, O_FLAT, O_UNIT_W)
    tl.store(p_o, b_x.to(o.dtype.element_ty), mask=m_j[:, None] & m_w[None, :])


@triton.jit(do_not_specialize=["S", "R"])
def scatter_rows_fwd_kernel(
    y, idx, o, S, R, W,
    yR1, yR2, ys0, ys1, ys2, ysw,
    oR1, oR2, os0, os1, os2, osw,
    BR: tl.constexpr, BW: tl.constexpr,
    X_FLAT: tl.constexpr, X_UNIT_W: tl.constexpr, O_FLAT: tl.constexpr, O_UNIT_W: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    # o[idx[j]] = y[j] (or += with ACCUMULATE) for 0 <= idx[j] < R; other rows of o are not touched
    i_r, i_w = tl.program_id(0), tl.program_id(1)
    o_j = i_r.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    o_w = i_w.to(tl.int64) * BW + tl.arange(0, BW).to(tl.int64)  # [BW]
    m_w = o_w < W
    k = tl.load(idx + o_j, mask=o_j < S, other=-1).to(tl.int64)
    m = ((k >= 0) & (k < R))[:, None] & m_w[None, :]
    p_y = y + _offsets(o_j, o_w, yR1, yR2, ys0, ys1, ys2, ysw, X_FLAT, X_UNIT_W)
    b_y = tl.load(p_y, mask=m, other=0.).to(o.dtype.element_ty)  # [BR, BW]
    p_o = o + _offsets(k, o_w, oR1, oR2, os0, os1, os2, osw, O_FLAT, O_UNIT_W)
    if ACCUMULATE:
        tl.atomic_add(p_o, b_y, mask=m, sem="relaxed")
    else:
        tl.store(p_o, b_y, mask=m)


@triton.jit
def copy_blocks_kernel(src, dst, order, first, count, W, H, NS, ssb, sst, ssh, ssw, dsb, dsh, dst_, C: tl.constexpr,
                       BW: tl.constexpr):
    # slot t of (b, h): block order[b, h, t] of src[b, :, h] -> block first[b, h] + t of dst[b, h], if t < count
    t, bh = tl.program_id(0), tl.program_id(1)
    if t < tl.load(count + bh):
        b, h = (bh // H).to(tl.int64), bh % H
        s_row = tl.load(order + bh.to(tl.int64) * NS + t).to(tl.int64) * C
        d_row = (tl.load(first + bh).to(tl.int64) + t) * C
        rows, cols = tl.arange(0, C).to(tl.int64), tl.arange(0, BW)
        mask = (cols < W)[None, :]
        x = tl.load(src + b * ssb + h * ssh + (s_row + rows)[:, None] * sst + cols[None, :] * ssw, mask=mask)
        tl.store(dst + b * dsb + h * dsh + (d_row + rows)[:, None] * dst_ + cols[None, :], x.to(dst.dtype.element_ty),
                 mask=mask)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, order: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
                block_size: int) -> None:
    """Copy whole blocks of tokens per (batch, head), in place, without a host sync (the KV-cache write of a prefill
    chunk's softmax blocks, `NAtSLLayerState._write_blocks`).

    For every `(b, h)` and slot `t < count[b, h]`: block `first[b, h] + t` (rows `C·(first + t) + [0, C)`) of
    `dst[b, h]` gets block `order[b, h, t]` of `src[b, :, h]`. Slots `t >= count` copy nothing: one program per slot
    whose count is known only on the device, of which those past the count return at once.

    Args:
        src (torch.Tensor): `[B, n·C, H, W]`, any strides.
        dst (torch.Tensor): `[B, H, R, W]`, contiguous; the written blocks must lie in `[0, R)`.
        order (torch.Tensor): `[B, H, w]` int64 source block of each slot (entries past the count are ignored).
        first, count (torch.Tensor): `[B, H]` int64 destination block of slot 0, number of slots to copy (`<= w`).
        block_size (int): `C`.
    """
    B, H, w = order.shape
    if not dst.is_contiguous():
        raise ValueError("dst must be contiguous")
    if not uses_triton(dst):
        return naive_copy_blocks(src, dst, order, first, count, block_size)
    if w == 0 or B * H == 0:
        return None
    order, first, count = order.contiguous(), first.contiguous(), count.contiguous()
    W = dst.shape[-1]
    copy_blocks_kernel[(w, B * H)](src, dst, order, first, count, W, H, w, src.stride(0), src.stride(1),
                                   src.stride(2), src.stride(3), dst.stride(0), dst.stride(1), dst.stride(2),
                                   C=block_size, BW=_next_pow2(W), num_warps=4)
    return None


# a plain bool (not an isinstance test on a kernel object at call time): torch.compile traces it without a break
_INTERPRETED = not isinstance(gather_rows_fwd_kernel, triton.runtime.JITFunction)


def interpreted() -> bool:
    """Whether natsl's kernels run under the Triton interpreter (`TRITON_INTERPRET=1` before triton was imported)."""
    return _INTERPRETED


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the public functions run natsl's kernels on `t` (CUDA, or CPU under the interpreter);
    otherwise they fall back to the naive twins."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted())


def _row_view(x: torch.Tensor) -> tuple[list[int], list[int], int]:
    """`([R0, R1, R2], [s0, s1, s2], s_w)` of the row space of `x = [*R, W]` (leading dims merged where strides allow).

    Raises `ValueError` if more than three non-mergeable leading dims remain (the caller then reshapes).
    """
    dims = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 3:
        raise ValueError("more than 3 non-mergeable leading dims")
    dims += [(1, 0)] * (3 - len(dims))
    return [d[0] for d in dims], [d[1] for d in dims], x.stride(-1)


def _rows_args(x: torch.Tensor) -> tuple[torch.Tensor, list[int], tuple[bool, bool]]:
    """`(x, [R1, R2, s0, s1, s2, s_w], (flat, unit_w))` for the kernels; copies only a view with more than 3
    non-mergeable leading dims."""
    try:
        sizes, strides, sw = _row_view(x)
    except ValueError:
        x = x.reshape(-1, x.shape[-1])
        sizes, strides, sw = _row_view(x)
    return x, [sizes[1], sizes[2], *strides, sw], (sizes[1] == sizes[2] == 1, sw == 1)


def _num_rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _next_pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 / triton.cdiv carry ~µs of dispatch each in the launch path
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(S: int, W: int, elem_size: int, block_rows: int | None, block_w: int | None) -> tuple[int, int]:
    if interpreted():
        # the interpreter costs ~ms per program instance: few programs with big tiles
        BW = block_w or min(_next_pow2(W), 8192)
        BR = block_rows or max(1, min(_next_pow2(S), 2 ** 18 // BW))
    else:
        BW = block_w or min(_next_pow2(W), 2048 // elem_size)
        BR = block_rows or max(1, min(_next_pow2(S), 8192 // (BW * elem_size)))
    return BR, BW


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # every allocation the kernels fill goes through here (the tests NaN-poison it)
    return torch.empty(shape, dtype=dtype, device=device)


def gather_rows_fwd(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, *,
                    block_rows: int | None = None, block_w: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """`out[j] = x_rows[idx[j]]` (zero row where `idx[j]` is outside `[0, R)`); one launch, no autograd.

    `x` is `[*R, W]` with any strides, `idx` a contiguous `[S]`, `out` (allocated if `None`) `[S, W]`, any strides.
    `block_rows`, `block_w`, `num_warps` override the tile heuristic (benchmark sweeps only).
    """
    S, W = idx.shape[0], x.shape[-1]
    if out is None:
        out = _empty((S, W), x.dtype, x.device)
    if S == 0 or W == 0:
        return out
    if x.numel() == 0:
        return out.zero_()
    x, x_args, (x_flat, x_unit) = _rows_args(x)
    _, o_args, (o_flat, o_unit) = _rows_args(out)
    BR, BW = _tile(S, W, x.element_size(), block_rows, block_w)
    grid = (_cdiv(S, BR), _cdiv(W, BW))
    gather_rows_fwd_kernel[grid](x, idx, out, S, _num_rows(x), W, *x_args, *o_args, BR=BR, BW=BW, X_FLAT=x_flat,
                                 X_UNIT_W=x_unit, O_FLAT=o_flat, O_UNIT_W=o_unit, num_warps=num_warps or 4)
    return out


def scatter_rows_fwd(y: torch.Tensor, idx: torch.Tensor, num_rows: int, out: torch.Tensor | None = None, *,
                     accumulate: bool = False, block_rows: int | None = None, block_w: int | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    """`out[idx[j]] = y_rows[j]` (`+=` with `accumulate`), skipping `idx[j]` outside `[0, num_rows)`; no autograd.

    `y` is `[*S, W]` with any strides, `idx` a contiguous `[S]`. Without `out` a zero `[num_rows, W]` is allocated
    (float32/float64 for `accumulate`: the caller casts); with `out` the rows not indexed are left untouched.
    """
    W = y.shape[-1]
    if out is None:
        dtype = y.dtype if not accumulate or y.dtype == torch.float64 else torch.float32
        out = torch.zeros((num_rows, W), dtype=dtype, device=y.device)
    S = idx.shape[0]
    if S == 0 or W == 0 or num_rows == 0:
        return out
    y, y_args, (y_flat, y_unit) = _rows_args(y)
    _, o_args, (o_flat, o_unit) = _rows_args(out)
    BR, BW = _tile(S, W, y.element_size(), block_rows, block_w)
    grid = (_cdiv(S, BR), _cdiv(W, BW))
    scatter_rows_fwd_kernel[grid](y, idx, out, S, num_rows, W, *y_args, *o_args, BR=BR, BW=BW, X_FLAT=y_flat,
                                  X_UNIT_W=y_unit, O_FLAT=o_flat, O_UNIT_W=o_unit, ACCUMULATE=accumulate,
                                  num_warps=num_warps or 4)
    return out


def gather_rows_bwd(do: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None, unique_indices: bool,
                    num_rows: int) -> torch.Tensor:
    """`dx [num_rows, W]` of `gather_rows`: a gather through `inverse` if given (no atomics), else a scatter
    (`unique_indices`) or a scatter-add into float32."""
    if inverse is not None:
        return gather_rows_fwd(do, inverse)
    if unique_indices:
        return scatter_rows_fwd(do, idx, num_rows)
    return scatter_rows_fwd(do, idx, num_rows, accumulate=True).to(do.dtype)


def scatter_rows_bwd(do: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`dy [S, W]` of `scatter_rows` / `scatter_add_rows`: the gather `do[idx]` (zero rows where `idx < 0`)."""
    return gather_rows_fwd(do, idx)


class GatherRowsFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, idx, inverse, unique_indices):
        ctx.save_for_backward(idx, inverse)
        ctx.unique_indices = unique_indices
        ctx.x_shape = x.shape
        return gather_rows_fwd(x, idx)

    @staticmethod
    def backward(ctx, do):
        idx, inverse = ctx.saved_tensors
        dx = gather_rows_bwd(do, idx, inverse, ctx.unique_indices, math.prod(ctx.x_shape[:-1]))
        return dx.view(ctx.x_shape), None, None, None


class ScatterRowsFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, idx, num_rows, accumulate):
        ctx.save_for_backward(idx)
        ctx.y_shape = y.shape
        out = scatter_rows_fwd(y, idx, num_rows, accumulate=accumulate)
        return out.to(y.dtype) if accumulate else out

    @staticmethod
    def backward(ctx, do):
        (idx,) = ctx.saved_tensors
        return scatter_rows_bwd(do, idx).view(ctx.y_shape), None, None, None


def _needs_grad(t: torch.Tensor) -> bool:
    # the autograd Function costs ~20 µs of host time per call (measured on the H200 host): skip it where no gradient can flow
    return t.requires_grad and torch.is_grad_enabled()


def _check_float(name: str, t, ndim_min: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def _check_index(name: str, idx, device: torch.device, ndim: int | None = 1) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {idx.dtype}")
    if ndim is not None and idx.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device}, but the data is on {device}")
    return idx.contiguous()


def _check_range(name: str, idx: torch.Tensor, upper: int, what: str) -> None:
    if idx.numel() and bool((idx >= upper).any()):  # the one host sync of `validate=True`
        raise ValueError(f"{name} has entries >= {upper} ({what}); max is {int(idx.max())}")


def _check_out(out, shape, dtypes, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype not in dtypes:
        raise TypeError(f"out must have dtype {' or '.join(map(str, dtypes))}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, but the data is on {device}")


def _check_no_grad_out(t: torch.Tensor) -> None:
    if torch.is_grad_enabled() and t.requires_grad:
        raise ValueError("out= is not differentiable: call without out (or under torch.no_grad())")


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, inverse: torch.Tensor | None = None,
                unique_indices: bool = False, out: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """Gather rows of `x` by `idx`: `o[j] = x_rows[idx[j]]`, a zero row where `idx[j] < 0`.

    The row space of `x` is its leading dims flattened in row-major order; strided views (e.g. the
    `[B, T, Hr, G*D]` view of a `[B, T, H, D]` slice of a fused projection) are read in place, without copies.

    Args:
        x (torch.Tensor): `[*R, W]` float16/bfloat16/float32/float64, any strides.
        idx (torch.Tensor): `[S]` int32/int64 row indices; negative entries give zero rows (e.g. probe rows).
        inverse (torch.Tensor, Optional): `[R]` int32/int64 with `inverse[idx[j]] = j` for `idx[j] >= 0` and `-1`
            elsewhere. Then the backward is a gather too (no atomics); `idx` must not repeat. Default: `None`.
        unique_indices (bool): promise that the non-negative entries of `idx` do not repeat, so the backward is a
            plain scatter instead of an atomic scatter-add. Default: `False`.
        out (torch.Tensor, Optional): `[S, W]` buffer of `x`'s dtype to write into (not differentiable).
        validate (bool): check `idx < R` (one host sync). Without it out-of-range entries give zero rows.
            Default: `True`.

    Returns:
        `[S, W]` tensor of `x`'s dtype.
    """
    _check_float("x", x)
    idx = _check_index("idx", idx, x.device)
    R = _num_rows(x)
    if inverse is not None:
        inverse = _check_index("inverse", inverse, x.device)
        if inverse.shape[0] != R:
            raise ValueError(f"inverse must have shape [{R}] (the rows of x), got {tuple(inverse.shape)}")
    if out is not None:
        _check_out(out, (idx.shape[0], x.shape[-1]), (x.dtype,), x.device)
        _check_no_grad_out(x)
    if validate:
        _check_range("idx", idx, R, "rows of x")
        if inverse is not None:
            _check_range("inverse", inverse, idx.shape[0], "entries of idx")
    if not uses_triton(x):
        o = naive_gather_rows(x, idx)
        return o if out is None else out.copy_(o)
    if out is not None or not _needs_grad(x):
        return gather_rows_fwd(x, idx, out)
    return GatherRowsFunction.apply(x, idx, inverse, unique_indices)


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int, *, out: torch.Tensor | None = None,
                 validate: bool = True) -> torch.Tensor:
    """Scatter rows of `y` to `idx`: `o[idx[j]] = y_rows[j]`; entries `idx[j] < 0` are skipped.

    The adjoint of `gather_rows` for non-repeating indices (and its backward is that gather). Repeated
    indices leave one of the rows (unspecified which): use `scatter_add_rows` to sum them.

    Args:
        y (torch.Tensor): `[*S, W]` float16/bfloat16/float32/float64, any strides (row space: leading dims).
        idx (torch.Tensor): `[S]` int32/int64 destination rows.
        num_rows (int): rows `R` of the output.
        out (torch.Tensor, Optional): `[R, W]` buffer of `y`'s dtype; rows not in `idx` keep their values
            (`index_copy_` semantics; not differentiable). Default: a new zero-filled tensor.
        validate (bool): check `idx < num_rows` (one host sync); without it such entries are skipped.
            Default: `True`.

    Returns:
        `[R, W]` tensor of `y`'s dtype (zero in rows no index points to).
    """
    return _scatter(y, idx, num_rows, out, validate, accumulate=False)


def scatter_add_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int, *, out: torch.Tensor | None = None,
                     validate: bool = True) -> torch.Tensor:
    """Scatter-add rows of `y` to `idx`: `o[idx[j]] += y_rows[j]` (atomic; repeats allowed); `idx[j] < 0` skipped.

    The adjoint of `gather_rows` for any index. float16/bfloat16 inputs accumulate in float32 and the result is
    cast back; summation order is not deterministic.

    Args:
        y (torch.Tensor): `[*S, W]` float16/bfloat16/float32/float64, any strides.
        idx (torch.Tensor): `[S]` int32/int64 destination rows.
        num_rows (int): rows `R` of the output.
        out (torch.Tensor, Optional): `[R, W]` float32 or float64 accumulator, added into in place (not
            differentiable). Default: a new zero-filled tensor.
        validate (bool): check `idx < num_rows` (one host sync). Default: `True`.

    Returns:
        `[R, W]`: `out` if given, else a tensor of `y`'s dtype.
    """
    return _scatter(y, idx, num_rows, out, validate, accumulate=True)


def _scatter(y, idx, num_rows, out, validate, accumulate):
    _check_float("y", y)
    idx = _check_index("idx", idx, y.device)
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    S = _num_rows(y)
    if idx.shape[0] != S:
        raise ValueError(f"idx must have one entry per row of y ({S}), got {idx.shape[0]}")
    if out is not None:
        dtypes = (torch.float32, torch.float64) if accumulate else (y.dtype,)
        _check_out(out, (num_rows, y.shape[-1]), dtypes, y.device)
        _check_no_grad_out(y)
    if validate:
        _check_range("idx", idx, num_rows, "num_rows")
    if not uses_triton(y):
        if out is None:
            return (naive_scatter_add_rows if accumulate else naive_scatter_rows)(y, idx, num_rows)
        keep = (idx >= 0) & (idx < num_rows)
        return out.index_put_((idx[keep].long(),), y.reshape(-1, y.shape[-1])[keep].to(out.dtype),
                              accumulate=accumulate)
    if out is not None:
        return scatter_rows_fwd(y, idx, num_rows, out, accumulate=accumulate)
    if not _needs_grad(y):
        o = scatter_rows_fwd(y, idx, num_rows, accumulate=accumulate)
        return o.to(y.dtype) if accumulate else o
    return ScatterRowsFunction.apply(y, idx, num_rows, accumulate)


def _merge_view(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return x.view(shape)
    except RuntimeError:  # the merged dims have incompatible strides: one copy
        return x.reshape(shape)


def gather_tokens(x: torch.Tensor, src: torch.Tensor, num_router_heads: int, *, dest: torch.Tensor | None = None,
                  validate: bool = True) -> torch.Tensor:
    """Pack the routed tokens of `x`: `o[s] = x[b, t, r*G:(r+1)*G]` for the `s`-th entry `src[s] = (b*T + t)*Hr + r`.

    The `G = H / Hr` heads of a router head travel together; the head-major transpose is folded into `src`
    (from `natsl.kernels.index.token_routes` or `token_source_rows`), so `x` is read in place.

    Args:
        x (torch.Tensor): `[B, T, H, D]`, `H` a multiple of `num_router_heads`; any strides with the `[H, D]`
            dims mergeable (else one copy).
        src (torch.Tensor): `[S]` int32/int64 source rows in `[0, B*T*Hr)`, not repeating.
        num_router_heads (int): `Hr`.
        dest (torch.Tensor, Optional): `[B, T, Hr]` packed destination of every token, `-1` if not routed
            (`token_destination`); makes the backward a gather (every element written once, no zero-fill).
        validate (bool): range checks (one host sync each for `src` and `dest`). Default: `True`.

    Returns:
        `[S, G, D]` tensor of `x`'s dtype.
    """
    _check_float("x", x, 0)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, T, H, D], got {tuple(x.shape)}")
    B, T, H, D = x.shape
    Hr = num_router_heads
    if not isinstance(Hr, int) or Hr < 1 or H % Hr:
        raise ValueError(f"num_router_heads must be a positive divisor of H={H}, got {Hr!r}")
    src = _check_index("src", src, x.device)
    if dest is not None:
        dest = _check_index("dest", dest, x.device, ndim=None)
        if tuple(dest.shape) != (B, T, Hr):
            raise ValueError(f"dest must have shape [B, T, Hr] = [{B}, {T}, {Hr}], got {tuple(dest.shape)}")
        dest = dest.view(-1)
    if validate:
        _check_range("src", src, B * T * Hr, "B*T*num_router_heads")
        if dest is not None:
            _check_range("dest", dest, src.shape[0], "entries of src")
    S, G = src.shape[0], H // Hr
    if not uses_triton(x):
        return naive_gather_tokens(x, src, Hr)
    rows = _merge_view(x, (B, T, Hr, G * D))
    if not _needs_grad(x):
        return gather_rows_fwd(rows, src).view(S, G, D)
    return GatherRowsFunction.apply(rows, src, dest, True).view(S, G, D)


def scatter_tokens(y: torch.Tensor, dest: torch.Tensor, *, src: torch.Tensor | None = None,
                   validate: bool = True) -> torch.Tensor:
    """Unpack routed tokens: `o[b, t, r*G:(r+1)*G] = y[dest[b, t, r]]`, zero where `dest < 0`. Inverse of
    `gather_tokens` on the routed tokens.

    Computed as a gather through `dest` (one launch, every output element written once, no atomics).

    Args:
        y (torch.Tensor): `[S, G, D]` packed tokens, any strides.
        dest (torch.Tensor): `[B, T, Hr]` int32/int64 packed position of every token, `-1` if not routed
            (`token_destination`); non-negative entries must not repeat.
        src (torch.Tensor, Optional): `[S]` source rows (`token_source_rows`); makes the backward a gather.
            Default: `None` (the backward is a scatter into a zero-filled `[S, G, D]`).
        validate (bool): range checks (one host sync each for `dest` and `src`). Default: `True`.

    Returns:
        `[B, T, Hr*G, D]` tensor of `y`'s dtype.
    """
    _check_float("y", y, 0)
    if y.dim() != 3:
        raise ValueError(f"y must have shape [S, G, D], got {tuple(y.shape)}")
    dest = _check_index("dest", dest, y.device, ndim=None)
    if dest.dim() != 3:
        raise ValueError(f"dest must have shape [B, T, Hr], got {tuple(dest.shape)}")
    S, G, D = y.shape
    B, T, Hr = dest.shape
    if src is not None:
        src = _check_index("src", src, y.device)
        if src.shape[0] != S:
            raise ValueError(f"src must have shape [S] = [{S}] (the rows of y), got {tuple(src.shape)}")
    if validate:
        _check_range("dest", dest, S, "rows of y")
        if src is not None:
            _check_range("src", src, B * T * Hr, "B*T*Hr")
    if not uses_triton(y):
        return naive_scatter_tokens(y, dest)
    rows = _merge_view(y, (S, G * D))
    if not _needs_grad(y):
        return gather_rows_fwd(rows, dest.view(-1)).view(B, T, Hr * G, D)
    return GatherRowsFunction.apply(rows, dest.view(-1), src, True).view(B, T, Hr * G, D)
