"""Training on the GPU (issue 9): the bf16-autocast training step of every model kind and linear backend, and
`natsl train` under torchrun with one process taking the DDP (NCCL) path.

Run on the H200 with `NATSL_TEST_DEVICE=cuda python -m pytest -q -m gpu tests/gpu/test_train_gpu.py` (fla installed).
Harness opt-in, as in test_linear_branch_gpu.py: on Triton >= 3.4, < 3.7.1 + Hopper fla refuses its gated backward
(fla #640); the H200 image has Triton 3.6, so fla's own flag `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` is set
in-process by the `fla_harness` fixture (tests/gpu/conftest.py) and by the torchrun entry script below; gradients
under that bypass are checked against the float64 reference in test_linear_branch_gpu.py, not here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import natsl.kernels.gather_scatter as gs
from natsl import NAtSLConfig, NAtSLForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gs.interpreted(), reason="set NATSL_TEST_DEVICE=cuda: the Triton interpreter is on"),
    pytest.mark.usefixtures("fla_harness"),  # tests/gpu/conftest.py: fla #640 bypass, first autotune config
]
ROOT = Path(__file__).resolve().parents[2]
ENTRY = ("import sys\nimport fla.ops.common.chunk_o as m\nm.TRITON_ABOVE_3_7_1 = True  # fla #640, see module doc\n"
         "from natsl.train.cli import train_main\nsys.exit(train_main(sys.argv[1:]))\n")


@pytest.mark.parametrize("family", ["natsl", "layer_hybrid"])
@pytest.mark.parametrize("backend", ["gdn", "deltanet", "gla", "mamba2", "linear_attn"])
def test_autocast_training_step(family, backend):
    """fp32 weights + bf16 autocast (what `natsl train --device cuda` does): a step runs, loss and grads finite."""
    torch.manual_seed(0)
    config = NAtSLConfig.preset("tiny", family, linear_backend=backend, hidden_size=128, num_heads=2, head_dim=64,
                                block_size=64)
    model = NAtSLForCausalLM(config).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 200), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torchrun_one_gpu_takes_the_ddp_path(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(entry),
           "--task", "mqar", "--seq-len", "256", "--num-kv-pairs", "4", "--vocab", "32", "--steps", "6",
           "--models", "natsl,linear", "--hidden-size", "128", "--heads", "2", "--head-dim", "64",
           "--block-size", "64", "--no-plots", "--no-progress", "--device", "cuda", "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["run"]["ddp"] and m["run"]["world_size"] == 1 and m["run"]["device"].startswith("cuda")
    assert all(r["steps"] == 6 for r in m["models"])
