"""`natsl train`: train and compare natsl, linear, softmax and layer-hybrid models on a recall task or local text.

    natsl train --task mqar --models natsl,linear,softmax,layer_hybrid --steps 500 --out runs/mqar
    python -m natsl.train --task needle --device cuda --size 340m --seq-len 4096
    torchrun --nproc_per_node 2 -m natsl.train --device cuda ...     (DDP)
    torchrun --nproc_per_node 8 -m natsl.train --device cuda --fsdp ...     (FSDP2, sharded checkpoints)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from natsl.train.loop import (
    MODEL_KINDS,
    TrainSettings,
    build_config,
    ddp_active,
    dist_info,
    init_distributed,
    make_eval_set,
    train_model,
    under_torchrun,
)
from natsl.train.tasks import TASKS, make_task
from natsl.utils import SOFTMAX_BACKEND_CHOICES

# CLI flag → NAtSLConfig field (model overrides; unset flags keep the preset's value)
MODEL_FLAGS = {
    "hidden_size": "hidden_size", "layers": "num_hidden_layers", "heads": "num_heads", "head_dim": "head_dim",
    "expand_v": "expand_v", "softmax_heads": "num_softmax_heads", "router_heads": "num_router_heads",
    "attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size", "block_size": "block_size",
    "linear_backend": "linear_backend", "router_budget": "router_budget",
    "router_budget_weight": "router_budget_weight", "router_budget_scope": "router_budget_scope",
    "router_sample": "router_sample", "use_rope": "use_rope",
    "router_grad": "router_grad", "router_temperature": "router_temperature",
}


def _checked(cast, ok, what: str):
    """An argparse `type=` that parses with `cast` and accepts values for which `ok(v)` holds."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_fraction = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", default="mqar", choices=TASKS,
                   help="mqar (multi-query associative recall), needle (needle in a haystack), copy (selective "
                        "copying), text (a local .txt/.jsonl file or hf:DATASET). Default: mqar")
    g.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence. Default: 256")
    g.add_argument("--num-kv-pairs", type=_positive_int, default=None,
                   help="key-value pairs (mqar), needles (needle), tokens to copy (copy). Default: 8 / 4 / 16")
    g.add_argument("--num-queries", type=_positive_int, default=None,
                   help="queried keys (mqar: default all pairs; needle: default 1)")
    g.add_argument("--kv-at", default="start", choices=("start", "random"),
                   help="mqar: the key-value pairs open the sequence (Zoology) or follow a filler prefix of random "
                        "length. Default: start")
    g.add_argument("--vocab", type=_positive_int, default=None,
                   help="vocabulary of a synthetic task (= the model's vocab_size). Default: 64 (copy: 32)")
    g.add_argument("--data", default=None,
                   help="task text: a .txt or .jsonl file, hf:NAME[:CONFIG] (offline), or stdlib (the Python standard "
                        "library's sources: a real-text corpus on every machine)")
    g.add_argument("--tokenizer", default=None,
                   help="task text: a locally installed HF tokenizer (name or path); default: UTF-8 bytes")

    g = p.add_argument_group("models")
    g.add_argument("--models", default="natsl,linear,softmax,layer_hybrid",
                   help=f"comma list of {', '.join(MODEL_KINDS)} (natsl: NAtS-L in every layer; hybrid: natsl and "
                        "linear layers; layer_hybrid: 3 linear : 1 softmax layers). Default: "
                        "natsl,linear,softmax,layer_hybrid")
    g.add_argument("--size", default="tiny", choices=("tiny", "340m", "760m"), help="preset. Default: tiny")
    g.add_argument("--hidden-size", type=_positive_int)
    g.add_argument("--layers", type=_positive_int, help="num_hidden_layers")
    g.add_argument("--heads", type=_positive_int, help="linear heads (num_heads)")
    g.add_argument("--head-dim", type=_positive_int, help="linear key dim per head")
    g.add_argument("--expand-v", type=_positive_float, help="value dim / key dim of the linear heads")
    g.add_argument("--softmax-heads", type=_positive_int, help="softmax heads of natsl layers")
    g.add_argument("--router-heads", type=_positive_int, help="router heads of natsl layers")
    g.add_argument("--attention-heads", type=_positive_int, help="heads of full softmax layers")
    g.add_argument("--intermediate-size", type=_positive_int, help="SwiGLU width")
    g.add_argument("--block-size", type=_positive_int, help="routing block size (tokens)")
    g.add_argument("--linear-backend", choices=("gdn", "deltanet", "gla", "mamba2", "linear_attn"),
                   help="linear recurrence of natsl and linear layers (the same for every model)")
    g.add_argument("--softmax-backend", default="auto", choices=SOFTMAX_BACKEND_CHOICES,
                   help="softmax branch of natsl layers. Default: auto (sdpa on CPU)")
    g.add_argument("--linear-impl", default="auto", choices=("auto", "fla", "torch"),
                   help="fla Triton ops or PyTorch. Default: auto (torch on CPU, fla on CUDA)")
    g.add_argument("--router-budget", type=_fraction,
                   help="target softmax fraction of the router-budget regulariser (off by default, as in the paper)")
    g.add_argument("--router-budget-weight", type=float, help="weight of that regulariser. Default: 1.0")
    g.add_argument("--router-budget-scope", choices=("layer", "head"),
                   help="the budget on each layer's mean router probability or on each head's. Default: layer")
    g.add_argument("--router-sample", choices=("argmax", "gumbel"), help="router sampling. Default: argmax")
    g.add_argument("--router-grad", choices=("selected", "both"),
                   help="router gradient of natsl layers (spec §1.7). Default: selected")
    g.add_argument("--router-temperature", type=_positive_float,
                   help="temperature of the router's straight-through softmax. Default: 1.0")
    g.add_argument("--use-rope", action="store_true", default=None, help="RoPE on the natsl softmax branch")

    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps. Default: 1000")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per step (per GPU). Default: 32")
    g.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate. Default: 3e-3")
    g.add_argument("--warmup", type=_nonneg_int, default=None, help="warmup steps. Default: 5%% of --steps")
    g.add_argument("--min-lr-ratio", type=_fraction, default=0.1, help="final LR / peak LR (cosine). Default: 0.1")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay. Default: 0.1")
    g.add_argument("--grad-clip", type=float, default=1.0, help="grad-norm clip, 0 = off. Default: 1.0")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="model init and data seed. Default: 0")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N. Default: cuda if available, else cpu")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads of torch (torch.set_num_threads). Default: torch's default")
    g.add_argument("--eval-every", type=_nonneg_int, default=None,
                   help="steps between held-out evaluations (0 = only at the end). Default: --steps / 10")
    g.add_argument("--eval-examples", type=_positive_int, default=256, help="held-out examples. Default: 256")
    g.add_argument("--fla-configs", default=None,
                   help="read fla's kernel launch configurations from this folder instead of autotuning them "
                        "(natsl.tuning.use_fla_configs; 'auto': natsl's set for this GPU, if it has one). "
                        "Default: fla autotunes")
    g.add_argument("--precompile", default=None, metavar="MANIFEST",
                   help="CUDA only: before training, compile the Triton kernels of this manifest in parallel processes "
                        "into Triton's cache (natsl.tuning.precompile_triton_kernels; 'auto': natsl's manifest for "
                        "this GPU, if it has one), so the first step loads them instead of compiling one after "
                        "another. Under torchrun every process does this (each with all CPUs): for many processes "
                        "fill the cache once beforehand with a one-process run. Default: kernels compile on first use")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun only: shard the model with FSDP2 (fully_shard on every transformer block, "
                        "then on the whole model) instead of replicating it with DDP, so each process holds 1/N of "
                        "the parameters, gradients and AdamW state (each still trains on its own --batch-size). On "
                        "CUDA the compute copies of the weights are bf16 and gradients are reduced in fp32; on CPU "
                        "(gloo) everything stays fp32. Checkpoints are sharded (torch.distributed.checkpoint, one "
                        "dcp-step* folder) plus a consolidated HF model; resume them with --resume --fsdp")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (metrics, plots, checkpoints). Default: runs/<task>")
    g.add_argument("--save-every", type=_nonneg_int, default=0,
                   help="steps between checkpoints (0 = at the end only). Default: 0")
    g.add_argument("--stop-at", type=_positive_int, default=None,
                   help="stop after this step and checkpoint (the schedule still spans --steps); continue with "
                        "--resume")
    g.add_argument("--resume", action="store_true",
                   help="continue every model from its checkpoint in --out (models without one start afresh; a "
                        "--fsdp checkpoint needs --fsdp again, a non-FSDP one no --fsdp)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(prog: str = "natsl") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="natsl: token-level hybrid attention (NAtS-L).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("train", help="train and compare models on a task",
                       description="Train one or several model kinds on a task with the same budget; report loss, "
                                   "task accuracy, tokens/s, peak memory and the natsl softmax fraction.")
    add_train_arguments(p)
    p.set_defaults(subparser=p)
    return parser


def build_train_parser(prog: str = "python -m natsl.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train and compare natsl models on a task (= `natsl train`).")
    add_train_arguments(p)
    return p


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__}); use --device cpu")
    return name


def _parse_models(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ValueError("--models is empty")
    bad = [m for m in names if m not in MODEL_KINDS]
    if bad:
        raise ValueError(f"unknown model kind(s) {', '.join(bad)} in --models; choose from {', '.join(MODEL_KINDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--models lists a kind twice: {spec}")
    return names


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _out(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `natsl train` with parsed `args`; argument problems go to `parser.error` (exit 2)."""
    try:
        if args.fla_configs is not None:  # before anything imports fla
            from natsl.tuning import use_fla_configs

            try:
                use_fla_configs(args.fla_configs)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"--fla-configs: {e}") from None
        device = _resolve_device(args.device)
        if args.precompile is not None:
            if not device.startswith("cuda"):
                raise ValueError(f"--precompile needs a CUDA device (Triton kernels), got --device {device}")
            from natsl.tuning import precompile_triton_kernels

            try:
                _out(f"precompiled Triton kernels: {precompile_triton_kernels(args.precompile)}")
            except ValueError as e:
                raise ValueError(f"--precompile: {e}") from None
        models = _parse_models(args.models)
        task = make_task(args.task, seq_len=args.seq_len, num_kv_pairs=args.num_kv_pairs, vocab_size=args.vocab,
                         num_queries=args.num_queries, kv_at=args.kv_at, data=args.data, tokenizer=args.tokenizer)
        if args.stop_at is not None and args.stop_at > args.steps:
            raise ValueError(f"--stop-at {args.stop_at} is beyond --steps {args.steps}")
        if args.fsdp and not under_torchrun():
            raise ValueError("--fsdp needs torchrun (it shards the model over the torchrun processes): run "
                             "torchrun --nproc_per_node N -m natsl.train ... --fsdp")
        cpu = not device.startswith("cuda")
        overrides = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()
                     if getattr(args, flag) is not None}
        overrides["vocab_size"] = task.vocab_size
        overrides["softmax_backend"] = "sdpa" if cpu and args.softmax_backend == "auto" else args.softmax_backend
        overrides["linear_impl"] = "torch" if cpu and args.linear_impl == "auto" else args.linear_impl
        configs = {m: build_config(m, args.size, **overrides) for m in models}
        for c in configs.values():  # build once on the meta device: invalid head/dim combinations fail here
            with torch.device("meta"):
                from natsl.models import NAtSLForCausalLM

                NAtSLForCausalLM(c)
    except ValueError as e:
        parser.error(str(e))

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = init_distributed(device)
    rank, world, _ = dist_info()
    out = Path(args.out) if args.out else Path("runs") / args.task
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=warmup,
                             min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                             seed=args.seed, device=device, eval_every=eval_every, eval_examples=args.eval_examples,
                             save_every=args.save_every, stop_at=args.stop_at, resume=args.resume,
                             progress=not args.no_progress, fsdp=args.fsdp)
    parallel = (" (FSDP)" if args.fsdp else " (DDP)") if ddp_active() else ""
    header = (f"natsl train: task {task.describe()}; models {', '.join(models)} ({args.size}, "
              f"{configs[models[0]].linear_backend}, block {configs[models[0]].block_size}); {args.steps} steps x "
              f"{args.batch_size} x {world} process(es){parallel} on {device}; out {out}")
    if rank == 0:
        _log(header)
    eval_set = make_eval_set(task, args.eval_examples, args.batch_size, args.seed)
    results = []
    t0 = time.perf_counter()
    for m in models:
        try:
            results.append(train_model(m, configs[m], task, settings, out, eval_set, log=_log))
        except ValueError as e:  # e.g. a checkpoint that does not match the arguments
            if rank == 0:
                _log(f"natsl train: error: {e}")
            return 1
        if rank == 0:
            r = results[-1]
            _log(f"{m}: eval acc {100 * r.eval_acc:.1f}%, eval loss {r.eval_loss:.3f}, {r.wall_s:.0f} s")
    if rank != 0:
        return 0

    from natsl.train import report

    run_info = {"command": " ".join(sys.argv), "task": task.describe(), "args": vars(args), "device": device,
                "world_size": world, "ddp": ddp_active() and not args.fsdp,
                "fsdp": args.fsdp, "torch": torch.__version__, "total_s": time.perf_counter() - t0,
                "settings": settings.__dict__, "configs": {m: c.to_dict() for m, c in configs.items()}}
    files = report.write_metrics(out, results, run_info)
    summary = report.format_summary(results, header)
    (out / "summary.txt").write_text(summary + "\n")
    files.append(out / "summary.txt")
    if not args.no_plots:
        try:
            files.append(report.plot_curves(out / "curves.png", results, task.describe()))
            for r in results:
                p = report.plot_routing_map(out / f"routing_{r.name}.png", r)
                if p is not None:
                    files.append(p)
        except ImportError:
            _log("plots skipped: matplotlib is not installed (pip install 'natsl[train]')")
    _out(summary)
    _out(f"\ntotal {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(str(f) for f in files)
          + "; checkpoints in " + ", ".join(str(r.checkpoint) for r in results if r.checkpoint))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script `natsl`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args.subparser
    del args.subparser, args.command
    return run_train(args, sub)


def train_main(argv: list[str] | None = None) -> int:
    """`python -m natsl.train`."""
    parser = build_train_parser()
    return run_train(parser.parse_args(argv), parser)
