"""Probe: chrome traces (CPU + CUDA) of the gdn linear branch at the paper heads, T=64k, 12.5% softmax blocks, to
find where the GPU idles: the softmax blocks' WY alone (fwd+bwd, no fla) and, with `--fla`, one frozen-router
fwd+bwd of the whole branch. Writes /tmp/*.json traces and `<out>/gaps.md`, a summary of CPU ops that overlap GPU idle gaps.

    python benchmarks/probe_branch_trace.py --out $OUT [--fla]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear_branch import SHAPES, delta_parts, setup  # noqa: E402
from utils import allow_fla_gated_backward_on_hopper, bench_ms  # noqa: E402


def trace(fn, path: Path) -> list[dict]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())["traceEvents"]


def gaps(events: list[dict], min_us: float = 30.0) -> str:
    """GPU idle gaps (between kernels/memcpys on the device) longer than `min_us`, each with the CPU ops (depth
    ordered by duration) that were running when the gap started."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "python_function",
                                                                          "user_annotation", "cuda_driver")]
    lines, end, busy, total_idle = [], gpu[0]["ts"], 0.0, 0.0
    for e in gpu:
        if e["ts"] - end > min_us:
            total_idle += e["ts"] - end
            at = [c for c in cpu if c["ts"] <= end + 1 <= c["ts"] + c["dur"]]
            at = sorted(at, key=lambda c: -c["dur"])[:6]
            lines.append(f"- idle {e['ts'] - end:.0f} us before {e['name'][:60]}; cpu: "
                         + " > ".join(f"{c['name'][:50]} ({c['dur']:.0f})" for c in at))
        busy += e["dur"]
        end = max(end, e["ts"] + e["dur"])
    span = end - gpu[0]["ts"]
    return (f"GPU span {span / 1e3:.2f} ms, kernels {busy / 1e3:.2f} ms, idle gaps > {min_us} us: "
            f"{total_idle / 1e3:.2f} ms\n" + "\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--T", type=int, default=65536)
    args = ap.parse_args()
    out = Path(args.out)
    shape = SHAPES["paper-340M"]
    report = []
    parts = delta_parts("gdn", shape, args.T, 0.125)
    wy = next(fn for name, fn in parts.items() if name.startswith("softmax blocks"))
    report.append(f"## WY alone, T={args.T}: do_bench {bench_ms(wy)[0]:.3f} ms")
    report.append(gaps(trace(wy, Path("/tmp/wy.json"))))
    if args.fla:
        allow_fla_gated_backward_on_hopper()
        for provider, tag in (("fla-plain", "plain"), ("natsl-branch-frozen-routing", "frozen"),
                              ("natsl-branch", "train")):
            fn = setup("gdn", shape, args.T, 0.125, provider, "fwd+bwd")[0]
            fn()
            report.append(f"\n## {tag} fwd+bwd, T={args.T}, 12.5%: do_bench {bench_ms(fn)[0]:.3f} ms")
            report.append(gaps(trace(fn, Path(f"/tmp/{tag}.json"))))
    text = "\n".join(report)
    (out / "gaps.md").write_text(text + "\n")
    print(text)  # noqa: T201


if __name__ == "__main__":
    main()
