"""The training loop of `natsl train`: AdamW, warmup + cosine, clipping, bf16 autocast on CUDA, step-seeded data,
held-out evaluation, checkpoints (`save_pretrained` + optimizer state) with resume, and DDP under `torchrun` (or
FSDP2 with sharded checkpoints, `TrainSettings.fsdp`; see `natsl.train.fsdp`).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from natsl.models import NAtSLConfig, NAtSLForCausalLM
from natsl.train.tasks import IGNORE, Task, TaskBatch

MODEL_KINDS = ("natsl", "hybrid", "linear", "softmax", "layer_hybrid")
TRAINER_STATE = "trainer_state.pt"
# train batches are seeded by (seed, step, rank); the held-out set by a seed no train batch uses
_EVAL_SEED_OFFSET = 1 << 62


@dataclass
class TrainSettings:
    """Everything about a run that is not the model or the task.

    Attributes:
        steps (int): optimizer steps (the length of the LR schedule).
        batch_size (int): sequences per step and per process.
        lr (float): peak learning rate.
        warmup (int): linear warmup steps.
        min_lr_ratio (float): the cosine ends at `lr * min_lr_ratio`.
        weight_decay (float): AdamW decay (not on biases, norms, or params marked `_no_weight_decay`).
        grad_clip (float): global grad-norm clip (`0` = off).
        seed (int): model init and data seed.
        device (str): `"cpu"`, `"cuda"` or `"cuda:N"`.
        eval_every (int): steps between held-out evaluations (`0` = only at the end).
        eval_examples (int): size of the held-out set.
        save_every (int): steps between checkpoints (`0` = only at the end / at `stop_at`).
        stop_at (int, Optional): stop after this step (checkpointed; continue with `resume`).
        resume (bool): continue from the checkpoint in the output dir if there is one.
        progress (bool): tqdm progress bars.
        fsdp (bool): shard the model with FSDP2 instead of wrapping it in DDP (needs a process group, i.e.
            torchrun); checkpoints are then sharded (`torch.distributed.checkpoint`) plus a consolidated HF model.
            See `natsl.train.fsdp`.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0
    eval_examples: int = 256
    save_every: int = 0
    stop_at: int | None = None
    resume: bool = False
    progress: bool = True
    fsdp: bool = False


@dataclass
class ModelResult:
    """What `train_model` reports for one model (JSON-serialisable via `asdict`)."""

    name: str
    kind: str
    layer_layout: list[str]
    params: int
    steps: int
    train_loss: float
    eval_loss: float
    eval_acc: float
    eval_seq_acc: float
    softmax_fraction_mean: float | None
    softmax_fraction: dict[str, list[float]]
    router_entropy: dict[str, list[float]]
    heads_at_0: float | None
    heads_at_100: float | None
    tokens_per_s: float
    peak_memory_mb: float
    peak_memory_kind: str
    train_s: float
    wall_s: float
    history: list[dict] = field(default_factory=list)
    routing_map: dict | None = None
    checkpoint: str | None = None


def build_config(kind: str, size: str = "tiny", **overrides) -> NAtSLConfig:
    """The config of model kind `kind` (see `MODEL_KINDS`) on preset `size`, with config-field overrides.

    `layer_hybrid` is 3 linear : 1 softmax layers; with fewer than 4 layers its last layer is the softmax one.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    config = NAtSLConfig.preset(size, kind, **overrides)
    if kind == "layer_hybrid" and "softmax" not in config.layer_layout:
        layout = list(config.layer_layout)
        layout[-1] = "softmax"
        config = NAtSLConfig.preset(size, kind, **overrides, layer_layout=layout)
    return config


def lr_factor(step: int, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from 1 to `min_lr_ratio` at `steps`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: 0/1-d ones (biases, norms) and those marked
    `_no_weight_decay`. Under FSDP take them before sharding: `fully_shard` replaces the parameters, which drops the
    marks."""
    return {n for n, p in model.named_parameters() if p.ndim < 2 or getattr(p, "_no_weight_decay", False)}


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """AdamW groups: decay on every trainable parameter but those named in `no_decay` (default:
    :func:`no_decay_names` of `model`)."""
    skip = no_decay_names(model) if no_decay is None else no_decay
    decay, keep = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (keep if n in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def rng_state() -> dict:
    """The CPU (and, where there is one, every CUDA device's) RNG state, for a checkpoint."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def dist_info() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` from torchrun's environment (`(0, 1, 0)` without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def under_torchrun() -> bool:
    """Whether this process was launched by torchrun (its environment names a rank), one process included."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def ddp_active() -> bool:
    """Whether a process group is up, so the model is trained wrapped in `DistributedDataParallel`."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str) -> str:
    """Under torchrun (any number of processes, so that one process also runs the DDP path): init the process
    group (NCCL on CUDA, gloo on CPU) and return this rank's device; otherwise return `device` unchanged."""
    rank, world, local_rank = dist_info()
    if not under_torchrun():
        return device
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


class PeakMemory:
    """Peak memory of one model's run: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak
    resident set (Linux `VmHWM`, reset per model through `/proc/self/clear_refs`; else `ru_maxrss`, never reset)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_max_allocated"
            return
        self.kind = "cpu_peak_rss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "cpu_peak_rss_process"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the train batch of `step` on `rank`: a pure function of them, so resuming replays the data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + rank)


def make_eval_set(task: Task, examples: int, batch_size: int, seed: int) -> list[TaskBatch]:
    """The held-out batches (a stream no train batch draws from; the held-out split for text)."""
    g = torch.Generator().manual_seed(_EVAL_SEED_OFFSET + seed)
    out, left = [], examples
    while left > 0:
        out.append(task.sample(min(batch_size, left), g, split="eval"))
        left -= batch_size
    return out


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """`(correct tokens, scored tokens, fully correct sequences, sequences with a scored token)` of next-token
    predictions `logits [B, T, V]` against HF-convention `labels [B, T]`."""
    target = labels[:, 1:]
    mask = target != IGNORE
    hit = (logits[:, :-1].argmax(-1) == target) & mask
    has = mask.any(1)
    seq_ok = (hit.sum(1) == mask.sum(1)) & has
    return int(hit.sum()), int(mask.sum()), int(seq_ok.sum()), int(has.sum())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def routing_stats(fractions: dict[str, list[float]], entropies: dict[str, list[float]]) -> dict:
    """Summary of per-(layer, router head) routing: the mean softmax fraction, the mean router entropy (nats; ln 2 =
    undecided, 0 = certain), and the share of heads that route no block (0%) or every block (100%) to softmax."""
    fr = [f for v in fractions.values() for f in v]
    en = [e for v in entropies.values() for e in v]
    if not fr:
        return {"softmax_fraction_mean": None, "router_entropy_mean": None, "heads_at_0": None, "heads_at_100": None}
    return {"softmax_fraction_mean": sum(fr) / len(fr), "router_entropy_mean": sum(en) / len(en) if en else None,
            "heads_at_0": sum(f <= 0.0 for f in fr) / len(fr), "heads_at_100": sum(f >= 1.0 for f in fr) / len(fr)}


@torch.no_grad()
def evaluate(model: NAtSLForCausalLM, batches: list[TaskBatch], device: torch.device) -> dict:
    """Held-out loss, token accuracy on scored positions, sequence accuracy, and per natsl layer the `[H_R]`
    softmax fraction and router entropy (means over the examples), summarised by :func:`routing_stats`."""
    was_training = model.training
    model.eval()
    loss_sum = n_tok = hit = seq_ok = n_seq = 0
    frac: dict[int, torch.Tensor] = {}
    ent: dict[int, torch.Tensor] = {}
    n_ex = 0
    for batch in batches:
        batch = batch.to(device)
        with _autocast(device):
            out = model(input_ids=batch.input_ids, labels=batch.labels)
        h, m, s, ns = token_accuracy(out.logits, batch.labels)
        loss_sum += float(out.lm_loss) * m
        n_tok, hit, seq_ok, n_seq = n_tok + m, hit + h, seq_ok + s, n_seq + ns
        B = batch.input_ids.shape[0]
        for i, st in enumerate(out.routing_stats):
            if st is not None:
                frac[i] = frac.get(i, 0) + st.softmax_fraction.float().cpu() * B
                if st.router_entropy is not None:
                    ent[i] = ent.get(i, 0) + st.router_entropy.float().cpu() * B
        n_ex += B
    model.train(was_training)
    fractions = {str(i): [round(float(x), 4) for x in f / n_ex] for i, f in frac.items()}
    entropies = {str(i): [round(float(x), 4) for x in e / n_ex] for i, e in ent.items()}
    return {"eval_loss": loss_sum / max(n_tok, 1), "eval_acc": hit / max(n_tok, 1),
            "eval_seq_acc": seq_ok / max(n_seq, 1), "softmax_fraction": fractions, "router_entropy": entropies,
            **routing_stats(fractions, entropies)}


@torch.no_grad()
def natsl_layer_inputs(model: NAtSLForCausalLM, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """`{layer index: the input [B, T, D] of its attention}` for every natsl layer, from one forward of `input_ids`
    without gradients (forward pre-hooks, removed afterwards); what each layer's router sees."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [block.attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, block in enumerate(model.model.layers) if block.layer_type == "natsl"]
    try:
        if hooks:
            with torch.no_grad():
                model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def routing_map(model: NAtSLForCausalLM, batch: TaskBatch, device: torch.device) -> dict | None:
    """Where every natsl layer routes the first example of `batch`: `{"layers": {idx: [H_R][N] (1 = softmax)},
    "relevant_blocks": [N] (share of the block's tokens the task needs remembered), "block_size": C}`.

    The routing is recomputed from each layer's router on that layer's input (`natsl_layer_inputs`)."""
    if not any(block.layer_type == "natsl" for block in model.model.layers):
        return None
    was_training = model.training
    model.eval()
    try:
        with _autocast(device), torch.no_grad():
            inputs = natsl_layer_inputs(model, batch.input_ids[:1].to(device))
            layers = {}
            for i, x in inputs.items():
                weights, _ = model.model.layers[i].attn.router(x)
                layers[str(i)] = (weights[0, :, :, 0] > 0.5).int().T.tolist()
    finally:
        model.train(was_training)
    C = model.config.block_size
    rel = batch.relevant[0].float()
    N = -(-rel.numel() // C)
    rel = torch.nn.functional.pad(rel, (0, N * C - rel.numel())).view(N, C).mean(1)
    return {"layers": layers, "relevant_blocks": [round(float(x), 3) for x in rel], "block_size": C}


def _same_config(a: NAtSLConfig, b: NAtSLConfig) -> list[str]:
    skip = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"}
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in set(da) | set(db) if k not in skip and da.get(k) != db.get(k))


def save_hf_model(path: Path, model: NAtSLForCausalLM) -> None:
    """`model.save_pretrained(path)` without HF's progress bars."""
    from transformers.utils import logging as hf_logging

    path.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_checkpoint(path: Path, model: NAtSLForCausalLM, optimizer, scheduler, state: dict) -> None:
    """The non-FSDP checkpoint (rank 0): the HF model plus `trainer_state.pt` with the optimizer state."""
    save_hf_model(path, model)
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               path / TRAINER_STATE)


def train_model(name: str, config: NAtSLConfig, task: Task, settings: TrainSettings, out_dir: Path | None,
                eval_set: list[TaskBatch], log=None) -> ModelResult:
    """Train one model on `task` and evaluate it on `eval_set`.

    Under a process group (torchrun) the model is wrapped in `DistributedDataParallel`, or, with `settings.fsdp`,
    sharded with FSDP2 (`natsl.train.fsdp`): then every process evaluates (the sharded forward is a collective) and
    writes its shards of each checkpoint; otherwise rank 0 alone evaluates and checkpoints.

    Args:
        name (str): the model's kind (see `MODEL_KINDS`), also its folder under `out_dir`.
        config (NAtSLConfig): the model.
        task (Task): the training task.
        settings (TrainSettings): optimisation and run settings.
        out_dir (Path, Optional): run folder; the checkpoint goes to `out_dir / name / "checkpoint"`.
        eval_set (list[TaskBatch]): held-out batches (the same for every model of a comparison).
        log (callable, Optional): where progress messages go (rank 0 only). Default: `None` (nowhere).

    Returns:
        ModelResult.

    Raises:
        ValueError: a checkpoint to resume that does not match the settings (config, `steps`, FSDP or not), or
            `settings.fsdp` without a process group.
    """
    t_wall = time.perf_counter()
    rank, world, _ = dist_info()
    device = torch.device(settings.device)
    fsdp = settings.fsdp
    if fsdp and not ddp_active():
        raise ValueError("--fsdp needs a process group: launch with torchrun (torchrun --nproc_per_node N -m "
                         "natsl.train ... --fsdp)")
    # under FSDP every rank runs the forward passes (evaluations) and the checkpoint saves; else rank 0 alone
    leader = rank == 0 or fsdp
    ckpt = None if out_dir is None else Path(out_dir) / name / "checkpoint"
    trainer_state: dict = {}
    if settings.resume and ckpt is not None and (ckpt / TRAINER_STATE).is_file():
        saved = NAtSLConfig.from_pretrained(ckpt)
        diff = _same_config(saved, config)
        if diff:
            raise ValueError(f"cannot resume {name} from {ckpt}: its config differs in {diff}")
        trainer_state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
        if trainer_state.get("steps") != settings.steps:
            raise ValueError(f"cannot resume {name}: the checkpoint was made for --steps {trainer_state.get('steps')}"
                             f", not {settings.steps} (the LR schedule depends on it)")
        if ("fsdp" in trainer_state) != fsdp:
            raise ValueError(f"cannot resume {name} from {ckpt}: it is "
                             + ("a sharded --fsdp checkpoint; resume it with --fsdp" if not fsdp else
                                "a non-FSDP checkpoint (DDP or one process); resume it without --fsdp"))
        if fsdp:
            torch.manual_seed(settings.seed)  # the weights come from the sharded checkpoint below
            model = NAtSLForCausalLM(config)
        else:
            model = NAtSLForCausalLM.from_pretrained(ckpt)
    else:
        torch.manual_seed(settings.seed)
        model = NAtSLForCausalLM(config)
    model.to(device=device, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    peak = PeakMemory(device)

    if fsdp:
        from natsl.train import fsdp as fsdp_lib

        no_decay = no_decay_names(model)
        fsdp_lib.shard_model(model, device)
        groups = param_groups(model, settings.weight_decay, no_decay)
    else:
        groups = param_groups(model, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.steps, settings.warmup, settings.min_lr_ratio))
    start = 0
    history: list[dict] = []
    train_s, train_tokens = 0.0, 0
    if trainer_state:
        if fsdp:
            fsdp_lib.load_fsdp_checkpoint(ckpt, model, optimizer, scheduler, trainer_state)
        else:
            optimizer.load_state_dict(trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
            set_rng_state(trainer_state["rng"])
        start, history = trainer_state["step"], trainer_state["history"]
        train_s, train_tokens = trainer_state["train_s"], trainer_state["train_tokens"]
        if rank == 0 and log is not None:
            log(f"{name}: resumed from {ckpt} at step {start}")
            saved_world = trainer_state["fsdp"]["world_size"] if fsdp else None
            if saved_world is not None and saved_world != world:
                log(f"{name}: the checkpoint was written by {saved_world} processes, this run has {world}: the "
                    "sharded state is resharded, but the data stream (one batch per rank) differs from the "
                    "uninterrupted run")

    train_model_ = model
    if ddp_active() and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_model_ = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int):
        if fsdp:
            return fsdp_lib.save_fsdp_checkpoint(ckpt, model, optimizer, scheduler, state(step), config)
        save_checkpoint(ckpt, model, optimizer, scheduler, state(step))
        return None

    end = settings.steps if settings.stop_at is None else min(settings.steps, settings.stop_at)
    eval_every = settings.eval_every

    def state(step: int) -> dict:
        return {"step": step, "steps": settings.steps, "history": history, "train_s": train_s,
                "train_tokens": train_tokens, "running": (loss_acc, aux_acc, n_acc), "settings": asdict(settings)}

    bar = None
    if settings.progress and rank == 0 and end > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc=f"{name:>12}", dynamic_ncols=True, leave=True)
    model.train()
    loss_acc, aux_acc, n_acc = trainer_state.get("running", (0.0, 0.0, 0))
    last_eval = None
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = task.sample(settings.batch_size, train_batch_generator(settings.seed, step, rank)).to(device)
        with _autocast(device):
            out = train_model_(input_ids=batch.input_ids, labels=batch.labels)
        out.loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lm = float(out.lm_loss.detach())  # syncs, so the step time below is real
        train_s += time.perf_counter() - t0
        train_tokens += batch.input_ids.numel() * world
        if not math.isfinite(lm):
            raise FloatingPointError(f"{name}: training loss became {lm} at step {step + 1}; try a lower --lr")
        loss_acc += lm
        aux_acc += 0.0 if out.router_aux_loss is None else float(out.router_aux_loss.detach())
        n_acc += 1
        done = step + 1
        if leader and ((eval_every and done % eval_every == 0) or done == settings.steps):
            ev = evaluate(model, eval_set, device)
            last_eval = ev
            history.append({"step": done, "lr": scheduler.get_last_lr()[0], "train_loss": loss_acc / n_acc,
                            "router_aux_loss": aux_acc / n_acc, "eval_loss": ev["eval_loss"], "eval_acc": ev["eval_acc"],
                            "eval_seq_acc": ev["eval_seq_acc"], "softmax_fraction_mean": ev["softmax_fraction_mean"],
                            "router_entropy_mean": ev["router_entropy_mean"], "heads_at_0": ev["heads_at_0"],
                            "heads_at_100": ev["heads_at_100"], "softmax_fraction": ev["softmax_fraction"],
                            "tokens_per_s": train_tokens / max(train_s, 1e-9)})
            loss_acc, aux_acc, n_acc = 0.0, 0.0, 0
        if bar is not None:
            post = {"loss": f"{lm:.3f}"}
            if last_eval is not None:
                post["acc"] = f"{last_eval['eval_acc']:.3f}"
                if last_eval["softmax_fraction_mean"] is not None:
                    post["softmax"] = f"{last_eval['softmax_fraction_mean']:.2f}"
                    post["H"] = f"{last_eval['router_entropy_mean']:.2f}"
                    post["heads0/100"] = f"{last_eval['heads_at_0']:.0%}/{last_eval['heads_at_100']:.0%}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if (ckpt is not None and leader and settings.save_every and done % settings.save_every == 0
                and done != end):
            save(done)
    if bar is not None:
        bar.close()
    if ddp_active():
        import torch.distributed as dist

        dist.barrier()

    step = max(end, start)
    full = None  # under FSDP: the consolidated model on rank 0 (None on the others), for the routing map
    saved_now = ckpt is not None and leader and end > start
    if saved_now:
        full = save(step)
    final = {}
    if leader:  # the model has not changed since an evaluation at the last step
        final = last_eval if last_eval is not None and history[-1]["step"] == step else evaluate(model, eval_set, device)
    last_train = loss_acc / n_acc if n_acc else (history[-1]["train_loss"] if history else float("nan"))
    if fsdp:
        if not saved_now:  # a collective: every rank gathers
            full = fsdp_lib.full_model(model, config)
        rmap = routing_map(full.to(device), eval_set[0], device) if rank == 0 else None
        del full
    else:
        rmap = routing_map(model, eval_set[0], device) if rank == 0 else None
    return ModelResult(
        name=name, kind=name, layer_layout=list(config.layer_layout), params=n_params, steps=step,
        train_loss=last_train, eval_loss=final.get("eval_loss", float("nan")),
        eval_acc=final.get("eval_acc", float("nan")), eval_seq_acc=final.get("eval_seq_acc", float("nan")),
        softmax_fraction_mean=final.get("softmax_fraction_mean"), softmax_fraction=final.get("softmax_fraction", {}),
        router_entropy=final.get("router_entropy", {}), heads_at_0=final.get("heads_at_0"),
        heads_at_100=final.get("heads_at_100"),
        tokens_per_s=train_tokens / max(train_s, 1e-9), peak_memory_mb=peak.peak_mb(), peak_memory_kind=peak.kind,
        train_s=train_s, wall_s=time.perf_counter() - t_wall, history=history, routing_map=rmap,
        checkpoint=None if ckpt is None else str(ckpt))
