"""Fixtures shared by the GPU tests."""

import os

import pytest


@pytest.fixture(scope="module")
def fla_harness():
    """The two explicit harness opt-ins of the fla-backed GPU tests, active only inside the module that asks for
    them (restored afterwards); skips the module if fla is not installed.

    - fla refuses its gated backward (`chunk_bwd_dqkwg`, gdn and mamba2) on Triton >= 3.4, < 3.7.1 on Hopper (fla
      #640). The H200 image has Triton 3.6, so the guard is bypassed with fla's own flag
      `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`; test_linear_branch_gpu.py compares every gradient with
      the float64 reference under it.
    - Triton's autotuner keeps the first config of every kernel (fla compiles and tunes for 40-130 s per op and
      shape otherwise; correctness does not depend on the config). `NATSL_GPU_AUTOTUNE=1` tunes as usual.
    """
    pytest.importorskip("fla")
    import fla.ops.common.chunk_o as chunk_o
    import triton.runtime.autotuner as autotuner

    saved_flag, saved_prune = chunk_o.TRITON_ABOVE_3_7_1, autotuner.Autotuner.prune_configs
    chunk_o.TRITON_ABOVE_3_7_1 = True
    if os.environ.get("NATSL_GPU_AUTOTUNE") != "1":
        autotuner.Autotuner.prune_configs = lambda self, kwargs: saved_prune(self, kwargs)[:1]
    yield
    chunk_o.TRITON_ABOVE_3_7_1, autotuner.Autotuner.prune_configs = saved_flag, saved_prune
