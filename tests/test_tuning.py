"""`natsl.tuning`: fla's autotuned launch configurations exported to fla's JSON files and read back by fla instead
of autotuning (under the Triton interpreter, where the shims make every autotuner take its first candidate)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import natsl.tuning as tuning

TESTS = Path(__file__).parent


def _run_gdn():
    """One small fla GDN chunk forward (its autotuned kernels choose their configurations)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 64, 2, 32, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(1, 64, 2, 32, generator=g)
    return chunk_gated_delta_rule(q, k, v, g=-torch.rand(1, 64, 2, generator=g), beta=torch.rand(1, 64, 2, generator=g))


def test_export_writes_fla_entries_and_merges(tmp_path):
    from fla.ops.utils.cache import AutotuneKey

    _run_gdn()
    files = tuning.export_fla_configs(tmp_path)
    names = {f.stem for f in files}
    assert {"chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "chunk_fwd_kernel_o"} <= names
    for f in files:
        data = json.loads(f.read_text())
        assert data["kernel_name"] == f.stem and data["autotune_entries"]
        for h, entry in data["autotune_entries"].items():
            assert h == AutotuneKey.key_hash(tuple(entry["autotune_key"]))
            assert {"kwargs", "num_warps", "num_stages", "num_ctas"} <= set(entry["config"])
    # entries of other keys already in a file are kept
    f = tmp_path / "chunk_fwd_kernel_o.json"
    data = json.loads(f.read_text())
    data["autotune_entries"]["other"] = {"autotune_key": [1], "config": {"kwargs": {}, "num_warps": 1,
                                                                       "num_stages": 1, "num_ctas": 1}}
    f.write_text(json.dumps(data))
    tuning.export_fla_configs(tmp_path)
    assert "other" in json.loads(f.read_text())["autotune_entries"]


def _fresh_process(body: str) -> str:
    """Run `body` in a new Python process under the Triton interpreter (shims applied, no fla cache mode set);
    returns its last line of output."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {str(TESTS)!r})
        from interpreter_shims import apply_interpreter_shims
        apply_interpreter_shims()
        import natsl.tuning as tuning
        from test_tuning import _run_gdn
    """) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k not in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=TESTS,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_fla_reads_the_exported_configs_instead_of_autotuning(tmp_path):
    """A fresh process that calls `use_fla_configs(folder)` before importing fla takes, for a kernel key with an
    entry, the entry's configuration: here one that autotuning would not pick (the shims keep the first
    candidate), so only a read of the file can put it in the autotuner's cache."""
    _fresh_process(f"""
        _run_gdn()
        tuning.export_fla_configs({str(tmp_path)!r})
        print("ok")
    """)
    f = tmp_path / "chunk_fwd_kernel_o.json"
    data = json.loads(f.read_text())
    (entry,) = data["autotune_entries"].values()  # one call, one key
    entry["config"]["num_warps"] = 1 if entry["config"]["num_warps"] != 1 else 2
    f.write_text(json.dumps(data))
    last = _fresh_process(f"""
        assert tuning.use_fla_configs({str(tmp_path)!r}) == __import__("pathlib").Path({str(tmp_path)!r})
        _run_gdn()
        print([c["num_warps"] for c in tuning.tuned_fla_configs()["chunk_fwd_kernel_o"].values()])
    """)
    assert last == str([entry["config"]["num_warps"]])


def test_use_fla_configs_errors(monkeypatch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR")}
    monkeypatch.setattr(os, "environ", env)
    with pytest.raises(ValueError, match="mode must be one of"):
        tuning.use_fla_configs(tmp_path, mode="loose")
    with pytest.raises(ValueError, match="must be a folder"):
        tuning.use_fla_configs(tmp_path / "missing")
    import fla.ops.utils.cache  # noqa: F401  (fla imported: its mode is fixed)

    with pytest.raises(RuntimeError, match="before fla is imported"):
        tuning.use_fla_configs(tmp_path)
    env["FLA_CACHE_MODE"] = "strict"  # set before fla's import: the folder can still be chosen
    assert tuning.use_fla_configs(tmp_path) == tmp_path and env["FLA_CONFIG_DIR"] == str(tmp_path)
    assert tuning.use_fla_configs() is None or torch.cuda.is_available()  # no GPU: no shipped set applies
    assert tuning.use_fla_configs("auto") is None or torch.cuda.is_available()
    assert tuning.gpu_folder_name("NVIDIA H200") == "NVIDIA_H200"
