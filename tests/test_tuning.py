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
        if f.name == tuning.TRITON_AUTOTUNE_FILE:  # plain triton.autotune kernels another test ran in this process
            assert data["kernels"] and all(":" in target for target in data["kernels"])
            continue
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


def test_plain_triton_autotune_choices_are_exported_and_read_back(tmp_path):
    """fla's kernels under plain `triton.autotune` (SwiGLU: 30 candidates each, which fla's files do not cover):
    `export_fla_configs` writes their choices to `triton_autotune.json`, and in a fresh process `use_fla_configs`
    puts them into the autotuners' caches before any call (here a configuration the interpreter's shims would not
    pick), where the call then uses it instead of tuning; a file of another Triton version is ignored."""
    _fresh_process(f"""
        import torch
        from fla.modules.activations import swiglu
        x, y = (torch.randn(4, 64, requires_grad=True) for _ in range(2))
        swiglu(x, y).sum().backward()
        tuning.export_fla_configs({str(tmp_path)!r})
        print("ok")
    """)
    f = tmp_path / tuning.TRITON_AUTOTUNE_FILE
    data = json.loads(f.read_text())
    target = "fla.modules.activations.ops:swiglu_fwd_kernel"
    assert {target, "fla.modules.activations.ops:swiglu_fwdbwd_kernel"} <= set(data["kernels"])
    (entry,) = data["kernels"][target]
    assert entry["key"][0] == 64 and "torch.float32" in entry["key"]
    entry["config"]["num_warps"] = 4 if entry["config"]["num_warps"] != 4 else 8
    f.write_text(json.dumps(data))
    check = f"""
        import torch
        folder = {str(tmp_path)!r}
        tuning.use_fla_configs(folder)
        import fla.modules.activations.ops as ops
        from fla.modules.activations import swiglu
        before = [c.num_warps for c in ops.swiglu_fwd_kernel.cache.values()]
        x, y = (torch.randn(4, 64) for _ in range(2))
        out = swiglu(x, y)
        assert torch.allclose(out, x * torch.sigmoid(x) * y, atol=1e-6)
        print([before, [c.num_warps for c in ops.swiglu_fwd_kernel.cache.values()]])
    """
    n = entry["config"]["num_warps"]
    assert _fresh_process(check) == str([[n], [n]])
    data["triton_version"] = "0.0"
    f.write_text(json.dumps(data))
    assert _fresh_process(check) == str([[], [1]])  # ignored: the shims' first candidate (1 warp) after the call


def test_record_triton_compiles_writes_a_manifest(tmp_path):
    """The recording hooks (called here as Triton calls them: `jit_cache_hook` before a compile, which must return
    a false value or the compile is skipped, `jit_post_compile_hook` after) write resolvable kernels to the manifest,
    merged with its entries; unresolvable ones are only counted; the hooks that were set before come back."""
    from triton import knobs
    from triton.runtime.jit import JitFunctionInfo

    fn = tuning._jit_function("fla.ops.common.chunk_o", "chunk_fwd_kernel_o")
    assert fn is not None and tuning._jit_function("fla.ops.common.chunk_o", "missing") is None
    assert tuning._jit_function("no.such.module", "k") is None and tuning._jit_function("fla", "a.b") is None
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"kernels": [{"module": "m", "name": "old", "seconds": 0.0, "specialization": "s0"}]}))
    calls = []
    prev = lambda **kw: calls.append(kw["compile"]["specialization_data"])  # noqa: E731
    knobs.runtime.jit_post_compile_hook = prev
    try:
        with tuning.record_triton_compiles(path) as stats:
            for module, spec in (("fla.ops.common.chunk_o", "s1"), ("generated_by_inductor", "s2")):
                kw = dict(key=1, repr="r", fn=JitFunctionInfo(module, "chunk_fwd_kernel_o", fn),
                          compile={"specialization_data": spec}, is_manual_warmup=False, already_compiled=False)
                assert not knobs.runtime.jit_cache_hook(**kw)
                knobs.runtime.jit_post_compile_hook(**kw)
        assert knobs.runtime.jit_post_compile_hook is prev and knobs.runtime.jit_cache_hook is None
    finally:
        knobs.runtime.jit_post_compile_hook = None
    assert calls == ["s1", "s2"] and (stats["recorded"], stats["unresolvable"]) == (1, 1)
    data = json.loads(path.read_text())
    assert {k["specialization"] for k in data["kernels"]} == {"s0", "s1"}
    (new,) = [k for k in data["kernels"] if k["specialization"] == "s1"]
    assert (new["module"], new["name"]) == ("fla.ops.common.chunk_o", "chunk_fwd_kernel_o")


def test_precompile_skips_what_it_cannot_compile(tmp_path):
    """Worker processes run for a manifest of the running Triton version; an entry whose module is gone and one whose
    specialization does not load are skipped (counted), not errors. Other versions, no manifest: nothing to do."""
    import triton

    kernels = [{"module": "no.such.module", "name": "k", "seconds": 1.0, "specialization": "{}"},
               {"module": "fla.ops.common.chunk_o", "name": "chunk_fwd_kernel_o", "seconds": 2.0,
                "specialization": "{}"}]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"triton_version": triton.__version__, "kernels": kernels}))
    result = tuning.precompile_triton_kernels(path, workers=2)
    assert (result["kernels"], result["compiled"], result["skipped"], result["worker_errors"]) == (2, 0, 2, 0)
    path.write_text(json.dumps({"triton_version": "0.0", "kernels": kernels}))
    assert tuning.precompile_triton_kernels(path)["kernels"] == 0
    with pytest.raises(ValueError, match="manifest file"):
        tuning.precompile_triton_kernels(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        tuning.precompile_triton_kernels(path, workers=0)
    if not torch.cuda.is_available():  # no GPU: no shipped manifest applies
        assert tuning.default_manifest() is None and tuning.precompile_triton_kernels("auto")["kernels"] == 0
    # the manifest natsl ships for the H200 loads and names kernels that exist
    shipped = json.loads((tuning.MANIFESTS_ROOT / "NVIDIA_H200" / "kernels.json").read_text())
    assert shipped["kernels"] and all(tuning._jit_function(k["module"], k["name"]) for k in shipped["kernels"])


def test_precompile_worker_preloads_each_resolvable_entry(tmp_path, monkeypatch):
    """The worker's loop: `JITFunction.preload(specialization)` for each entry that resolves, then its launcher; one
    that fails to load or does not resolve is not counted, a launcher that fails does not undo the compile."""
    loaded = []

    class Compiled:
        def __init__(self, spec):
            self.spec = spec

        @property
        def run(self):  # building the launcher may fail (a candidate too large): still compiled
            loaded.append(f"{self.spec}:launcher")
            raise RuntimeError("out of resources")

    class Kernel:
        def preload(self, spec):
            if spec == "bad":
                raise RuntimeError("specialization for another target")
            loaded.append(spec)
            return Compiled(spec)

    monkeypatch.setattr(tuning, "_jit_function", lambda module, name: Kernel() if module == "m" else None)
    shard = tmp_path / "shard.json"
    shard.write_text(json.dumps([{"module": "m", "name": "k", "specialization": "s1"},
                                 {"module": "m", "name": "k", "specialization": "bad"},
                                 {"module": "gone", "name": "k", "specialization": "s2"}]))
    assert tuning._precompile_shard(str(shard)) == 1 and loaded == ["s1", "s1:launcher"]
