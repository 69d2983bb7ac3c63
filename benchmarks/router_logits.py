"""Why routers choose heads rather than blocks: the router's logit margin split into a per-sequence shared part and a
per-block part (issue 23).

A `BlockRouter` is linear in the block mean `x̄_b` of its layer input (no bias): the margin of softmax over linear
of block `b` and router head `h` is `d_bh = (w_h,soft − w_h,lin) · x̄_b`. Write `x̄_b = s + r_b`, with `s` the mean of
the sequence's block means (what every block of the sequence shares) and `r_b` the block's own part; then
`d_bh = d_shared,h + d_own,bh`. A head routes every block the same way when `|d_shared|` is larger than the spread
of `d_own` over the blocks; a router that selects blocks needs `d_own` to move the margin across zero on the blocks
the task needs (MQAR: the blocks holding key-value pairs).

Usage (a `natsl train` run folder with checkpoints; CPU or CUDA):

    python benchmarks/router_logits.py runs/demo [--examples 64] [--device cpu]

Prints one table per natsl model: per (layer, router head) the routed softmax fraction, the mean shared margin, the
spread (std over blocks) of the own part, their ratio, and the mean margin of the blocks holding keys/values
against the other blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import markdown_table  # noqa: E402

from natsl.kernels.index import block_layout  # noqa: E402
from natsl.layers.router import block_mean  # noqa: E402
from natsl.layers.routing import SOFTMAX  # noqa: E402
from natsl.models import NAtSLForCausalLM  # noqa: E402
from natsl.train.loop import natsl_layer_inputs  # noqa: E402
from natsl.train.tasks import make_task  # noqa: E402


def margins(model: NAtSLForCausalLM, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per natsl layer: `(d_shared [B, 1, Hr], d_own [B, N, Hr])`, the softmax-minus-linear logit margin of every
    block split as in the module docstring (dense input, blocks of the model's block size; the last may be partial)."""
    out = {}
    for i, x in natsl_layer_inputs(model, input_ids).items():
        router = model.model.layers[i].attn.router
        xm = block_mean(x, block_layout(x.shape[1], router.block_size, device=x.device))  # [B, N, D], float32
        w = router.proj.weight.float().view(router.num_router_heads, 2, -1)
        dw = w[:, SOFTMAX] - w[:, 1 - SOFTMAX]  # [Hr, D]
        s = xm.mean(1, keepdim=True)
        out[i] = (s @ dw.T, (xm - s) @ dw.T)
    return out


def table(model: NAtSLForCausalLM, batch) -> list[dict]:
    C = model.config.block_size
    ids, rel = batch.input_ids, batch.relevant
    B, T = ids.shape
    N = -(-T // C)
    # [B, N] the block holds a token the task needs remembered
    holds = torch.nn.functional.pad(rel, (0, N * C - T)).view(B, N, C).any(-1)
    rows = []
    for i, (shared, own) in margins(model, ids).items():
        d = shared + own
        for h in range(d.shape[-1]):
            dh, sh, oh = d[..., h], shared[..., h], own[..., h]
            spread = oh.std(1).mean().item()  # within a sequence, over its blocks
            rows.append({"layer": i, "head": h, "softmax": f"{(dh > 0).float().mean().item():.1%}",
                         "mean shared margin": sh.mean().item(), "spread of own part": spread,
                         "|shared| / spread": abs(sh.mean().item()) / max(spread, 1e-12),
                         "margin, key-value blocks": dh[holds].mean().item() if holds.any() else float("nan"),
                         "margin, other blocks": dh[~holds].mean().item() if (~holds).any() else float("nan")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a `natsl train --out` folder (with MODEL/checkpoint)")
    ap.add_argument("--examples", type=int, default=64, help="held-out sequences. Default: 64")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    run = json.loads((args.run / "metrics.json").read_text())["run"]
    a = run["args"]
    task = make_task(a["task"], seq_len=a["seq_len"], num_kv_pairs=a["num_kv_pairs"], vocab_size=a["vocab"],
                     num_queries=a["num_queries"], kv_at=a["kv_at"])
    batch = task.sample(args.examples, torch.Generator().manual_seed(1234), split="eval")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    found = False
    for ckpt in sorted(args.run.glob("*/checkpoint")):
        model = NAtSLForCausalLM.from_pretrained(ckpt).to(args.device).eval()
        if "natsl" not in model.config.layer_layout:
            continue
        found = True
        rows = table(model, batch.to(args.device))
        print(f"\n## {ckpt.parent.name}: {run['task']}\n")  # noqa: T201
        print(markdown_table(rows, list(rows[0])))  # noqa: T201
    if not found:
        print(f"no natsl checkpoint under {args.run}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
