"""`natsl.tuning`'s kernel manifest on the GPU: the compiles of a real run are recorded, worker processes compile the
manifest into a fresh Triton cache, and a new process then loads every kernel from that cache (it adds no entry).

Run on the H200 with `NATSL_TEST_DEVICE=cuda python -m pytest -q -m gpu tests/gpu/test_tuning_gpu.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import natsl.kernels.gather_scatter as gs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gs.interpreted(), reason="set NATSL_TEST_DEVICE=cuda: the Triton interpreter is on"),
]

# one process: fla's l2norm forward and backward (an autotuned fla kernel pair) under `record_triton_compiles`, or
# `precompile_triton_kernels` of a manifest
SCRIPT = """
import json, sys
import torch
import natsl.tuning as tuning
mode, path = sys.argv[1], sys.argv[2]
if mode == "precompile":
    print(json.dumps(tuning.precompile_triton_kernels(path, workers=2)))
    sys.exit()
from fla.modules.norm.l2norm import l2norm
x = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with tuning.record_triton_compiles(path) as stats:
    l2norm(x).float().square().sum().backward()
    torch.cuda.synchronize()
print(json.dumps(stats))
"""


def _run(mode: str, path: Path, cache: Path) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), FLA_CACHE_RESULTS="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2])] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_precompiled_manifest_is_loaded_from_the_cache(tmp_path):
    manifest = tmp_path / "kernels.json"
    recorded = _run("record", manifest, tmp_path / "cache_a")
    assert recorded["recorded"] >= 2 and recorded["unresolvable"] == 0  # fwd + bwd (and their autotune candidates)
    names = {k["name"] for k in json.loads(manifest.read_text())["kernels"]}
    assert any("fwd" in n for n in names) and any("bwd" in n for n in names)
    cache_b = tmp_path / "cache_b"
    pre = _run("precompile", manifest, cache_b)
    assert pre["kernels"] == recorded["recorded"] and pre["compiled"] == pre["kernels"] and pre["skipped"] == 0
    before = _files(cache_b)
    again = _run("record", tmp_path / "again.json", cache_b)
    assert again["recorded"] == recorded["recorded"]
    assert _files(cache_b) == before  # every kernel of the run came from the precompiled cache
