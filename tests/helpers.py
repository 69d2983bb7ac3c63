"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

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


def random_routing(B: int, N: int, Hr: int, p_softmax: float, seed: int, device="cpu", dtype=torch.float64,
                   requires_grad: bool = False) -> torch.Tensor:
    """Hard one-hot routing `[B, N, Hr, 2]` (index 0 = softmax)."""
    g = gen(seed)
    soft = torch.rand(B, N, Hr, generator=g) < p_softmax
    r = torch.stack([soft, ~soft], -1).to(dtype=dtype, device=device)
    return r.requires_grad_(requires_grad)
