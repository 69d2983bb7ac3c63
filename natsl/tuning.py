"""Launch configurations of fla's autotuned kernels, saved once and loaded instead of autotuning.

fla autotunes most of its Triton kernels on their first call: every candidate configuration is compiled and timed,
which is most of a cold first training step (fla's own GDN model: ~300 s on the H200, benchmarks/RESULTS.md), and
the choice is keyed on head counts and dims but not on the sequence length, so the first call's length picks it
for every later call. fla can instead read configurations from JSON files, one per kernel, in the directory
`FLA_CONFIG_DIR` (its own mechanism: `fla.ops.utils.cache`, `FLA_CACHE_MODE`). natsl uses it:

- :func:`export_fla_configs` writes the configurations fla's autotuners chose in this process (after runs at the
  lengths you care about) into such a directory, merged with what it already holds;
- :func:`use_fla_configs` points fla at a directory (by default the one natsl ships for this GPU,
  `natsl/configs/fla/<GPU name>/`, if there is one) before fla is imported. With the default `"strict"` mode a
  kernel call whose key (head counts, dims, flags, dtypes) has an entry skips autotuning; any other call autotunes
  as usual.

The configurations are per GPU model and per Triton version (a file records the version it was made with).

With the configurations fixed, what is left of a cold first step is compiling each kernel once, one after the other
in the launching thread. :func:`record_triton_compiles` writes a manifest of the kernels a run compiles (Triton's own
specialization data, as `JITFunction.preload` takes it) and :func:`precompile_triton_kernels` compiles a manifest's
kernels in parallel worker processes into Triton's on-disk cache, from which the run's launches then load them.
natsl ships a manifest per GPU model (`natsl/configs/triton/<GPU name>/kernels.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: where natsl's own configuration sets live, one folder per GPU (fla's sanitised GPU name)
CONFIGS_ROOT = Path(__file__).parent / "configs" / "fla"
#: natsl's Triton kernel manifests (:func:`record_triton_compiles`), one folder per GPU
MANIFESTS_ROOT = Path(__file__).parent / "configs" / "triton"
#: fla's lookup modes that read the files (`FLA_CACHE_MODE`); "strict": exact key only, else autotune
FLA_MODES = ("strict", "fuzzy", "full")


def gpu_folder_name(device_name: str) -> str:
    """fla's folder name of a GPU (`fla.ops.utils.cache.sanitize_gpu_name`): e.g. `"NVIDIA H200"` → `NVIDIA_H200`."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def _this_gpu(root: Path) -> Path | None:
    """`root/<this CUDA GPU's folder>` (existing or not), or `None` without a GPU."""
    import torch

    return root / gpu_folder_name(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def default_config_dir() -> Path | None:
    """natsl's configuration folder for the current CUDA GPU, or `None` (no GPU, or no set shipped for it)."""
    path = _this_gpu(CONFIGS_ROOT)
    return path if path is not None and path.is_dir() else None


def use_fla_configs(path: str | os.PathLike | None = None, mode: str = "strict") -> Path | None:
    """Make fla read its kernels' launch configurations from `path` instead of autotuning (where an entry exists).

    Sets fla's `FLA_CONFIG_DIR` and `FLA_CACHE_MODE`; call it before anything imports fla (fla reads the mode once,
    at import). An explicit `FLA_CACHE_MODE` in the environment is left as it is. If the folder holds a
    :data:`TRITON_AUTOTUNE_FILE`, its configurations go into the caches of fla's plain `triton.autotune` kernels
    (this imports fla).

    Args:
        path: the folder of `{kernel_name}.json` files, or `None` / `"auto"`: natsl's set for this GPU
            (:func:`default_config_dir`). Default: `None`.
        mode (str): fla's lookup mode, `"strict"` (exact key), `"fuzzy"` (numeric key values may differ) or
            `"full"` (fuzzy, then a file's default). Default: `"strict"`.

    Returns:
        The folder in use, or `None` if there is none (no path given and no set for this GPU: nothing changes).

    Raises:
        ValueError: `mode` not one of the above, or `path` not a folder.
        RuntimeError: fla was imported already (its mode would not change).
    """
    if mode not in FLA_MODES:
        raise ValueError(f"mode must be one of {FLA_MODES}, got {mode!r}")
    if path is None or path == "auto":
        folder = default_config_dir()
        if folder is None:
            return None
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"path must be a folder of fla kernel configurations, got {str(path)!r}")
    if "fla.ops.utils.cache" in sys.modules and "FLA_CACHE_MODE" not in os.environ:
        raise RuntimeError("use_fla_configs() must run before fla is imported (fla reads FLA_CACHE_MODE at import)")
    os.environ["FLA_CONFIG_DIR"] = str(folder)
    os.environ.setdefault("FLA_CACHE_MODE", mode)
    if (folder / TRITON_AUTOTUNE_FILE).is_file():  # imports fla (its cache mode is set by now)
        _load_triton_autotune_configs(folder / TRITON_AUTOTUNE_FILE)
    return folder


def _config_dict(cfg) -> dict:
    """fla's JSON form of a `triton.Config`."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": getattr(cfg, "num_ctas", 1), "maxnreg": getattr(cfg, "maxnreg", None)}


def _unwrap(obj, types):
    """The first object of the `.fn` chain from `obj` (a kernel is `heuristics(autotune(jit(fn)))`) that is an
    instance of `types`, or `None`."""
    for _ in range(4):
        if isinstance(obj, types):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def _fla_autotuners() -> list[tuple[str, str, object]]:
    """`(module, attribute, autotuner)` of every Triton autotuner at module level in the imported fla modules, each
    once."""
    from triton.runtime.autotuner import Autotuner

    tuners: dict[int, tuple[str, str, object]] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for attr, obj in list(vars(module).items()):
            tuner = _unwrap(obj, Autotuner)
            if tuner is not None:
                tuners.setdefault(id(tuner), (name, attr, tuner))
    return list(tuners.values())


def tuned_fla_configs() -> dict[str, dict[tuple, dict]]:
    """`{kernel name: {autotune key: config dict}}` of every fla autotuner in this process that has chosen one (fla's
    `CachedAutotuner`s, whose choices fla itself can read back from files)."""
    from fla.ops.utils.cache import CachedAutotuner

    found: dict[str, dict[tuple, dict]] = {}
    for _, _, tuner in _fla_autotuners():
        if isinstance(tuner, CachedAutotuner) and tuner.cache:
            found.setdefault(tuner.kernel_name, {}).update({k: _config_dict(c) for k, c in tuner.cache.items()})
    return found


#: the file (in a folder of fla configurations) for fla kernels under plain `triton.autotune`, which fla's files do
#: not cover (e.g. its SwiGLU kernels: 30 candidates each); natsl's format, read by :func:`use_fla_configs`
TRITON_AUTOTUNE_FILE = "triton_autotune.json"


def tuned_triton_autotune_configs() -> dict[str, list[dict]]:
    """`{"module:attribute": [{"key": autotune key, "config": config dict}, ...]}` of the fla kernels under plain
    `triton.autotune` (not fla's `CachedAutotuner`) that have chosen a configuration in this process."""
    from fla.ops.utils.cache import CachedAutotuner

    found: dict[str, list[dict]] = {}
    for module, attr, tuner in _fla_autotuners():
        if not isinstance(tuner, CachedAutotuner) and tuner.cache:
            found[f"{module}:{attr}"] = [{"key": list(k), "config": _config_dict(c)} for k, c in tuner.cache.items()]
    return found


def _load_triton_autotune_configs(file: Path) -> int:
    """Put the configurations of a :data:`TRITON_AUTOTUNE_FILE` into the autotuners' caches (importing their fla
    modules), so those calls skip autotuning; entries of another Triton version or of kernels that no longer exist
    are ignored. Returns the number of entries applied."""
    import importlib

    import triton
    from triton.runtime.autotuner import Autotuner

    data = json.loads(file.read_text())
    if data.get("triton_version") != triton.__version__:
        return 0
    applied = 0
    for target, entries in data.get("kernels", {}).items():
        module, _, attr = target.partition(":")
        try:
            obj = _unwrap(getattr(importlib.import_module(module), attr), Autotuner)
        except (ImportError, AttributeError):
            continue
        if obj is None:
            continue
        for e in entries:
            c = e["config"]
            obj.cache[tuple(e["key"])] = triton.Config(c["kwargs"], num_warps=c["num_warps"], num_stages=c["num_stages"],
                                                       num_ctas=c.get("num_ctas", 1), maxnreg=c.get("maxnreg"))
            applied += 1
    return applied


def export_fla_configs(path: str | os.PathLike) -> list[Path]:
    """Write the configurations fla's autotuners chose in this process into the folder `path` (created if needed),
    one `{kernel_name}.json` per kernel in fla's format (entries keyed by the hash of their autotune key), merged
    with the entries the files already hold (this process's choice wins for the same key); the choices of fla
    kernels under plain `triton.autotune` go to :data:`TRITON_AUTOTUNE_FILE` in the same folder.

    Returns:
        The files written.
    """
    import triton
    from fla.ops.utils.cache import AutotuneKey

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entries in sorted(tuned_fla_configs().items()):
        file = folder / f"{name}.json"
        data = json.loads(file.read_text()) if file.exists() else {}
        merged = dict(data.get("autotune_entries") or {})
        for key, config in entries.items():
            merged[AutotuneKey.key_hash(key)] = {"autotune_key": list(key), "config": config}
        data.update(kernel_name=name, triton_version=triton.__version__, autotune_entries=merged)
        file.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        written.append(file)
    plain = tuned_triton_autotune_configs()
    if plain:
        file = folder / TRITON_AUTOTUNE_FILE
        data = json.loads(file.read_text()) if file.exists() else {}
        kernels = data.get("kernels", {}) if data.get("triton_version") == triton.__version__ else {}
        for target, entries in plain.items():
            merged = {json.dumps(e["key"]): e for e in kernels.get(target, [])}
            merged.update({json.dumps(e["key"]): e for e in entries})
            kernels[target] = list(merged.values())
        file.write_text(json.dumps({"triton_version": triton.__version__, "kernels": kernels}, indent=1,
                                   sort_keys=True) + "\n")
        written.append(file)
    return written


def _jit_function(module: str, name: str):
    """The Triton kernel function named `name` in `module` (a `JITFunction`, or under `TRITON_INTERPRET=1` an
    `InterpretedFunction`; fla's autotune / heuristics wrappers unwrapped), or `None` if the module cannot be imported
    or holds no such kernel at module level."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if "." in name:  # a nested or class-level kernel: not reachable by module and name
        return None
    try:
        return _unwrap(getattr(importlib.import_module(module), name), (JITFunction, InterpretedFunction))
    except (ImportError, AttributeError):
        return None


def default_manifest() -> Path | None:
    """natsl's Triton kernel manifest for the current CUDA GPU, or `None` (no GPU, or none shipped for it)."""
    folder = _this_gpu(MANIFESTS_ROOT)
    return folder / "kernels.json" if folder is not None and (folder / "kernels.json").is_file() else None


@contextlib.contextmanager
def record_triton_compiles(path: str | os.PathLike):
    """Record every Triton kernel compiled (or loaded from Triton's disk cache) inside the block into the JSON
    manifest `path`, merged with the entries it already holds: module, name, Triton's specialization data and the
    seconds it took. Kernels that cannot be found again by module and name (e.g. generated by torch.compile) are
    counted but not written. Chains to hooks already set in `triton.knobs.runtime`.

    Yields:
        dict: `{"recorded": n, "unresolvable": m, "seconds": total compile seconds}`, filled in when the block ends.
    """
    import triton
    from triton import knobs

    rt = knobs.runtime
    prev_pre, prev_post = rt.jit_cache_hook, rt.jit_post_compile_hook
    started: dict[str, float] = {}
    found: dict[str, dict] = {}
    stats = {"recorded": 0, "unresolvable": 0, "seconds": 0.0}

    def pre(**kw):
        started[kw["compile"]["specialization_data"]] = time.perf_counter()
        return prev_pre(**kw) if prev_pre else None  # a true value would skip the compile

    def post(**kw):
        spec = kw["compile"]["specialization_data"]
        seconds = time.perf_counter() - started.pop(spec, time.perf_counter())
        stats["seconds"] += seconds
        info = kw["fn"]
        if _jit_function(info.module, info.name) is info.jit_function:
            found[spec] = {"module": info.module, "name": info.name, "seconds": round(seconds, 3),
                           "specialization": spec}
        else:
            stats["unresolvable"] += 1
        return prev_post(**kw) if prev_post else None

    rt.jit_cache_hook, rt.jit_post_compile_hook = pre, post
    try:
        yield stats
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = prev_pre, prev_post
        file = Path(path)
        data = json.loads(file.read_text()) if file.exists() else {}
        kernels = {k["specialization"]: k for k in data.get("kernels", [])}
        kernels.update(found)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"triton_version": triton.__version__,
                                    "kernels": sorted(kernels.values(), key=lambda k: -k["seconds"])}, indent=1) + "\n")
        stats["recorded"] = len(found)


def precompile_triton_kernels(path: str | os.PathLike | None = None, workers: int | None = None,
                              timeout: float = 900.0) -> dict:
    """Compile the kernels of a manifest (:func:`record_triton_compiles`) in `workers` parallel processes into
    Triton's on-disk cache (`TRITON_CACHE_DIR`), so that a run's first launches load them instead of compiling one
    after the other. Kernels already in the cache cost a lookup. Entries whose module or kernel no longer exists, or
    that fail to compile, are skipped (the run compiles them as usual); nothing here changes what a kernel computes.

    Args:
        path: the manifest, or `None` / `"auto"`: natsl's for this GPU (:func:`default_manifest`).
        workers (int): processes (each with its own CUDA context); default: the CPU count, at most 16.
        timeout (float): seconds to wait for the workers.

    Returns:
        `{"kernels": n, "compiled": c, "skipped": s, "worker_errors": e, "seconds": wall seconds, "manifest": path}`
        (`skipped` includes the kernels of the `e` workers that died or timed out); `kernels` is 0 if there is no
        manifest, or it was made with another Triton version.

    Raises:
        ValueError: `path` not a file, or `workers` < 1.
    """
    import triton

    t0 = time.perf_counter()
    if path is None or path == "auto":
        file = default_manifest()
        if file is None:
            return {"kernels": 0, "compiled": 0, "skipped": 0, "worker_errors": 0, "seconds": 0.0, "manifest": None}
    else:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"path must be a Triton kernel manifest file, got {str(path)!r}")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 16)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    data = json.loads(file.read_text())
    kernels = data.get("kernels", []) if data.get("triton_version") == triton.__version__ else []
    result = {"kernels": len(kernels), "compiled": 0, "skipped": 0, "worker_errors": 0, "seconds": 0.0,
              "manifest": str(file)}
    if not kernels:
        return result
    # longest first onto the least loaded worker
    shards: list[list[dict]] = [[] for _ in range(min(workers, len(kernels)))]
    load = [0.0] * len(shards)
    for k in sorted(kernels, key=lambda k: -k.get("seconds", 0.0)):
        i = load.index(min(load))
        shards[i].append(k)
        load[i] += k.get("seconds", 0.0) or 0.01
    # the workers import natsl (and through the manifest's modules, fla) from where this process found them
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent)] + sys.path))
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, shard in enumerate(shards):
            shard_file = Path(tmp) / f"shard{i}.json"
            shard_file.write_text(json.dumps(shard))
            procs.append(subprocess.Popen([sys.executable, "-m", "natsl.tuning", "precompile-shard", str(shard_file)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))
        for proc, shard in zip(procs, shards):
            try:
                out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
                done = json.loads(out.strip().splitlines()[-1])["compiled"] if proc.returncode == 0 else None
            except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
                proc.kill()
                done = None
            if done is None:  # the worker died, timed out or reported nothing: its kernels compile in the run
                result["worker_errors"] += 1
                done = 0
            result["compiled"] += done
            result["skipped"] += len(shard) - done
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _precompile_shard(shard_file: str) -> int:
    """Worker of :func:`precompile_triton_kernels`: preload each kernel of the shard (compiles into the cache), then
    build its launcher (which Triton versions with per-signature C launchers also compile into the cache)."""
    done = 0
    for k in json.loads(Path(shard_file).read_text()):
        fn = _jit_function(k["module"], k["name"])
        if fn is None:
            continue
        try:
            kernel = fn.preload(k["specialization"])
        except Exception:  # noqa: BLE001 — a kernel that no longer matches is compiled by the run itself
            continue
        done += 1
        with contextlib.suppress(Exception):  # e.g. an autotune candidate too large for the GPU: the run skips it too
            kernel.run  # noqa: B018 — the property builds the launcher and loads the binary
    return done


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "precompile-shard":
    sys.stdout.write(json.dumps({"compiled": _precompile_shard(sys.argv[2])}) + "\n")
