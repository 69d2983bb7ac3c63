"""Reports of `natsl train`: the summary table, a text routing map, metrics as JSON/CSV, and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

from natsl.train.loop import ModelResult

SUMMARY_COLUMNS = ("model", "layers", "params", "steps", "train_loss", "eval_loss", "eval_acc", "seq_acc",
                   "softmax", "tok/s", "peak_mem_MB", "wall_s")


def _fmt_frac(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _layout_short(layout: list[str]) -> str:
    return "".join({"natsl": "N", "linear": "L", "softmax": "S"}[t] for t in layout)


def softmax_share(r: ModelResult) -> float | None:
    """Share of (layer, block) pairs whose keys/values softmax attention keeps: a natsl layer counts its routed
    fraction, a softmax layer 1, a linear layer 0."""
    per_layer = []
    for i, t in enumerate(r.layer_layout):
        if t == "natsl":
            fr = r.softmax_fraction.get(str(i))
            if fr is None:
                return None
            per_layer.append(sum(fr) / len(fr))
        else:
            per_layer.append(1.0 if t == "softmax" else 0.0)
    return sum(per_layer) / len(per_layer)


def summary_rows(results: list[ModelResult]) -> list[dict]:
    rows = []
    for r in results:
        rows.append({
            "model": r.name, "layers": _layout_short(r.layer_layout), "params": f"{r.params / 1e6:.2f}M",
            "steps": str(r.steps), "train_loss": f"{r.train_loss:.3f}", "eval_loss": f"{r.eval_loss:.3f}",
            "eval_acc": f"{100 * r.eval_acc:.1f}%", "seq_acc": f"{100 * r.eval_seq_acc:.1f}%",
            "softmax": _fmt_frac(softmax_share(r)),
            "tok/s": f"{r.tokens_per_s:,.0f}", "peak_mem_MB": f"{r.peak_memory_mb:,.0f}", "wall_s": f"{r.wall_s:.0f}",
        })
    return rows


def format_table(rows: list[dict], columns=SUMMARY_COLUMNS) -> str:
    """A plain-text table (right-aligned numbers, left-aligned first column)."""
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) if i == 0 else c.rjust(widths[c]) for i, c in enumerate(columns))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(r[c].ljust(widths[c]) if i == 0 else r[c].rjust(widths[c]) for i, c in enumerate(columns)))
    return "\n".join(out)


def format_softmax_fractions(results: list[ModelResult]) -> str:
    """Per natsl layer, the per-router-head softmax fraction and router entropy on the held-out set, and the share
    of (layer, head) pairs at 0% / 100% softmax."""
    lines = []
    for r in results:
        if not r.softmax_fraction:
            continue
        parts = [f"L{i}: [" + " ".join(f"{100 * f:.0f}%" for f in fr) + "]" for i, fr in r.softmax_fraction.items()]
        lines.append(f"  {r.name}: " + "  ".join(parts))
        if r.router_entropy:
            parts = [f"L{i}: [" + " ".join(f"{e:.2f}" for e in en) + "]" for i, en in r.router_entropy.items()]
            lines.append(f"  {'':<{len(r.name)}}  router entropy (nats, ln 2 = 0.69 undecided): " + "  ".join(parts))
        if r.heads_at_0 is not None:
            lines.append(f"  {'':<{len(r.name)}}  heads at 0% softmax: {r.heads_at_0:.0%}, at 100%: "
                         f"{r.heads_at_100:.0%}")
    return "softmax fraction per natsl layer [per router head] (held-out set):\n" + "\n".join(lines) if lines else ""


def format_routing_map(result: ModelResult) -> str:
    """One held-out example: `#` = block routed to softmax, `.` = to the linear state; `^` marks blocks holding
    tokens the task needs remembered (keys/values, needles, data)."""
    rm = result.routing_map
    if not rm:
        return ""
    task_row = "".join("^" if x > 0 else " " for x in rm["relevant_blocks"])
    lines = [f"routing of one held-out example, {result.name} (blocks of {rm['block_size']} tokens; "
             f"# = softmax, . = linear, ^ = holds keys/values):", f"  {'task':<8}{task_row}"]
    for layer, heads in rm["layers"].items():
        for h, row in enumerate(heads):
            lines.append(f"  {f'L{layer}h{h}':<8}" + "".join("#" if x else "." for x in row))
    return "\n".join(lines)


def format_summary(results: list[ModelResult], header: str = "") -> str:
    parts = [header] if header else []
    parts.append(format_table(summary_rows(results)))
    parts.append("layers: N = natsl, L = linear, S = softmax; eval_acc: held-out accuracy on the scored (answer) tokens;"
                 "\nsoftmax: share of (layer, block) pairs whose keys/values softmax attention keeps (natsl layers: "
                 "routed fraction)")
    fr = format_softmax_fractions(results)
    if fr:
        parts.append(fr)
    for r in results:
        m = format_routing_map(r)
        if m:
            parts.append(m)
    return "\n\n".join(parts)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_metrics(out_dir: Path, results: list[ModelResult], run_info: dict) -> list[Path]:
    """`metrics.json` (run info + every model's result and history), `summary.csv` (one row per model),
    `history.csv` (one row per model and evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "metrics.json", out_dir / "summary.csv", out_dir / "history.csv"]
    with open(paths[0], "w") as f:
        json.dump(_clean({"run": run_info, "models": [asdict(r) for r in results]}), f, indent=1)
    fields = ["model", "kind", "layer_layout", "params", "steps", "train_loss", "eval_loss", "eval_acc", "eval_seq_acc",
              "softmax_fraction_mean", "softmax_fraction", "tokens_per_s", "peak_memory_mb", "peak_memory_kind",
              "train_s", "wall_s"]
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            d = asdict(r)
            row = {k: d.get(k) for k in fields if k != "model"}
            row["model"] = r.name
            row["layer_layout"] = " ".join(r.layer_layout)
            row["softmax_fraction"] = json.dumps(r.softmax_fraction)
            w.writerow(row)
    hist_fields = ["model", "step", "lr", "train_loss", "router_aux_loss", "eval_loss", "eval_acc", "eval_seq_acc",
                   "softmax_fraction_mean", "router_entropy_mean", "heads_at_0", "heads_at_100", "tokens_per_s"]
    with open(paths[2], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=hist_fields)
        w.writeheader()
        for r in results:
            for h in r.history:
                w.writerow({"model": r.name, **{k: h.get(k) for k in hist_fields[1:]}})
    return paths


def plot_curves(path: Path, results: list[ModelResult], title: str = "") -> Path | None:
    """Held-out accuracy, held-out loss and train loss against steps, one line per model; the softmax fraction of
    every (natsl layer, router head) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for r in results:
        if not r.history:
            continue
        steps = [h["step"] for h in r.history]
        axes[0].plot(steps, [100 * h["eval_acc"] for h in r.history], marker="o", ms=3, label=r.name)
        axes[1].plot(steps, [h["eval_loss"] for h in r.history], marker="o", ms=3, label=r.name)
        axes[2].plot(steps, [h["train_loss"] for h in r.history], marker="o", ms=3, label=r.name)
        per_head = [h.get("softmax_fraction") or {} for h in r.history]
        for layer, heads in (per_head[-1] or {}).items():  # one line per (natsl layer, router head)
            for k in range(len(heads)):
                axes[3].plot(steps, [100 * (f.get(layer) or [0] * len(heads))[k] for f in per_head], ms=2,
                             marker=".", label=f"{r.name} L{layer}h{k}")
    for ax, t in zip(axes, ("held-out accuracy (%)", "held-out loss", "train loss",
                            "softmax fraction per natsl layer/head (%)")):
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-2, 102)
    axes[3].set_ylim(-2, 102)
    axes[0].legend()
    if axes[3].lines:
        axes[3].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_map(path: Path, result: ModelResult, title: str = "") -> Path | None:
    """Which blocks each router head of each natsl layer sent to softmax on one held-out example, under a row
    showing where the task's key/value tokens are."""
    rm = result.routing_map
    if not rm:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [np.asarray(rm["relevant_blocks"], dtype=float)[None]]
    labels = ["task: keys/values"]
    for layer, heads in rm["layers"].items():
        for h, row in enumerate(heads):
            rows.append(np.asarray(row, dtype=float)[None])
            labels.append(f"layer {layer} head {h}")
    N = rows[0].shape[1]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.35 * N + 2), 0.55 * len(rows) + 1.2), sharex=True,
                             squeeze=False)
    for ax, row, lab, i in zip(axes[:, 0], rows, labels, range(len(rows))):
        ax.imshow(row, aspect="auto", cmap="Oranges" if i == 0 else "Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([0])
        ax.set_yticklabels([lab])
        ax.set_xticks(np.arange(-0.5, N, 1), minor=True)
        ax.grid(which="minor", axis="x", color="0.85", lw=0.6)
        ax.tick_params(which="minor", length=0)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel(f"block (of {rm['block_size']} tokens); blue = softmax, white = linear state")
    fig.suptitle(title or f"{result.name}: routing of one held-out example")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
