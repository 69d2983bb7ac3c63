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
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

#: where natsl's own configuration sets live, one folder per GPU (fla's sanitised GPU name)
CONFIGS_ROOT = Path(__file__).parent / "configs" / "fla"
#: fla's lookup modes that read the files (`FLA_CACHE_MODE`); "strict": exact key only, else autotune
FLA_MODES = ("strict", "fuzzy", "full")


def gpu_folder_name(device_name: str) -> str:
    """fla's folder name of a GPU (`fla.ops.utils.cache.sanitize_gpu_name`): e.g. `"NVIDIA H200"` → `NVIDIA_H200`."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def default_config_dir() -> Path | None:
    """natsl's configuration folder for the current CUDA GPU, or `None` (no GPU, or no set shipped for it)."""
    import torch

    if not torch.cuda.is_available():
        return None
    path = CONFIGS_ROOT / gpu_folder_name(torch.cuda.get_device_name(0))
    return path if path.is_dir() else None


def use_fla_configs(path: str | os.PathLike | None = None, mode: str = "strict") -> Path | None:
    """Make fla read its kernels' launch configurations from `path` instead of autotuning (where an entry exists).

    Sets fla's `FLA_CONFIG_DIR` and `FLA_CACHE_MODE`; call it before anything imports fla (fla reads the mode once,
    at import). An explicit `FLA_CACHE_MODE` in the environment is left as it is.

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
    return folder


def _config_dict(cfg) -> dict:
    """fla's JSON form of a `triton.Config`."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": getattr(cfg, "num_ctas", 1), "maxnreg": getattr(cfg, "maxnreg", None)}


def tuned_fla_configs() -> dict[str, dict[tuple, dict]]:
    """`{kernel name: {autotune key: config dict}}` of every fla autotuner in this process that has chosen one."""
    from fla.ops.utils.cache import CachedAutotuner

    tuners = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            for _ in range(3):  # a kernel is `heuristics(autotune(jit(fn)))`: unwrap to the autotuner
                if isinstance(obj, CachedAutotuner):
                    tuners[id(obj)] = obj
                    break
                obj = getattr(obj, "fn", None)
    found: dict[str, dict[tuple, dict]] = {}
    for tuner in tuners.values():
        if tuner.cache:
            found.setdefault(tuner.kernel_name, {}).update({k: _config_dict(c) for k, c in tuner.cache.items()})
    return found


def export_fla_configs(path: str | os.PathLike) -> list[Path]:
    """Write the configurations fla's autotuners chose in this process into the folder `path` (created if needed),
    one `{kernel_name}.json` per kernel in fla's format (entries keyed by the hash of their autotune key), merged
    with the entries the files already hold (this process's choice wins for the same key).

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
    return written
