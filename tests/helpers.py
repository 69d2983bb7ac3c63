"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

import warnings

import torch


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def nan_empty(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A buffer filled with NaN: a kernel writing into it proves every element was written."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMSE of `out` against `ref` (fla's `get_err_ratio`)."""
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 0.0) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    abs_err = (ref.double() - out.double()).abs().max().item()
    if abs_err <= atol:
        return
    err = rel_err(ref, out)
    assert err <= ratio, f"{name}: relative RMSE {err:.3e} > {ratio:.1e} (max abs err {abs_err:.3e})"


def linear_gate_inputs(gn: torch.Generator, backend: str, B: int, T: int, H: int, K: int,
                       dtype=torch.float64) -> dict:
    """Random `g` (log decay in [-0.5, 0]) and `beta` (in [0, 1]) for the backends that take them."""
    out = {}
    if backend in ("gdn", "mamba2"):
        out["g"] = -torch.rand(B, T, H, generator=gn, dtype=dtype) * 0.5
    if backend == "gla":
        out["g"] = -torch.rand(B, T, H, K, generator=gn, dtype=dtype) * 0.5
    if backend in ("gdn", "deltanet"):
        out["beta"] = torch.rand(B, T, H, generator=gn, dtype=dtype)
    return out


def random_cu_seqlens(gn: torch.Generator, T: int, n_seq: int) -> torch.Tensor:
    """`[n_seq + 1]` offsets of `n_seq` non-empty sequences covering `T` tokens."""
    cuts = sorted(torch.randperm(T - 1, generator=gn)[: n_seq - 1].add(1).tolist())
    return torch.tensor([0, *cuts, T])


def host_syncs(fn) -> list[tuple[str, int]]:
    """(file, line) of every synchronising CUDA call that `fn()` makes (`torch.cuda.set_sync_debug_mode("warn")`)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [(w.filename.rsplit("/", 1)[-1], w.lineno) for w in caught
            if "called a synchronizing CUDA operation" in str(w.message)]


class TracedCapture:
    """CPU stand-in for CUDA-graph capture in `natsl.models.graphs.GraphDecoder` (same protocol as
    `CUDAGraphCapture`): `make_fx` records the aten ops of one call of the step, running them, with every host value
    baked in as a constant and every tensor the step does not create kept by reference; a replay runs exactly those
    ops again on the same tensors, as a CUDA graph replays its kernels on the same memory."""

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        from torch.fx.experimental.proxy_tensor import make_fx

        box = []
        graph = make_fx(lambda: box.append(fn()) or box[-1])()
        return graph, box[0]
