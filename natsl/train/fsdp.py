"""FSDP2 for `natsl train --fsdp` (under torchrun): sharding, mixed precision and sharded checkpoints.

What `--fsdp` does:

* **Sharding.** `torch.distributed.fsdp.fully_shard` (FSDP2, DTensor parameters sharded on dim 0 over a 1-d mesh of
  all processes) is applied to every transformer block (`model.model.layers[i]`, an `NAtSLBlock`) and then to the
  root `NAtSLForCausalLM`, which holds the rest (embeddings, final norm, LM head). Each block's parameters are
  all-gathered for its forward and backward and freed afterwards; gradients are reduce-scattered, so every process
  keeps 1/N of the parameters, gradients and AdamW state. The math is data parallel, as with DDP: each process
  trains on its own batch (`train_batch_generator(seed, step, rank)`) and the gradients are averaged.
* **Precision.** On CUDA: `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`: the sharded (master)
  parameters and the AdamW state stay float32, the all-gathered compute copies are bfloat16, gradients are reduced
  in float32 (the loop's bf16 autocast stays on as well). On CPU (gloo) the parameters are not cast
  (`param_dtype=None`, float32 compute, float32 reduction): bf16 matmuls on CPU are slow and some CPU ops lack bf16
  kernels, and float32 keeps the CPU path comparable to the DDP one.
* **Checkpoints** (`save_fsdp_checkpoint`): the folder `<out>/<model>/checkpoint` holds
  `dcp-stepNNNNNNNN/` (the sharded model and optimizer state written by every process with
  `torch.distributed.checkpoint.save`, from `get_state_dict`), `trainer_state.pt` (rank 0: step, history, LR
  scheduler, per-rank RNG states, which `dcp-step…` folder belongs to it; no optimizer tensors), and, gathered on
  rank 0, the consolidated HF model (`config.json` + `model.safetensors`, loadable with
  `NAtSLForCausalLM.from_pretrained` like a non-FSDP checkpoint). The DCP folder is written first and
  `trainer_state.pt` is replaced atomically afterwards, so an interrupted save leaves the previous checkpoint usable.
* **Resume** (`load_fsdp_checkpoint`): every process builds the model, shards it, and loads its shards of the model
  and optimizer with `torch.distributed.checkpoint.load` + `set_state_dict`; the scheduler, step, history and RNG
  come from `trainer_state.pt`. With the same number of processes a stopped and resumed run reproduces the
  uninterrupted one; DCP can also reshard to another number of processes, but then the data stream (seeded per rank)
  differs. A non-FSDP checkpoint cannot be resumed with `--fsdp` nor the other way round (`ValueError`).

The DCP folders must be on a file system every process sees (one node: any local folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from natsl.models import NAtSLConfig, NAtSLForCausalLM

DCP_PREFIX = "dcp-step"


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--fsdp needs a process group: launch with torchrun (torchrun --nproc_per_node N -m "
                         "natsl.train ... --fsdp)")
    return dist


def mixed_precision(device: torch.device):
    """The FSDP2 `MixedPrecisionPolicy`: bf16 parameters / fp32 reduction on CUDA; no cast on CPU (see the module
    docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def shard_model(model: NAtSLForCausalLM, device: torch.device) -> NAtSLForCausalLM:
    """`fully_shard` every `NAtSLBlock` of `model` and then `model` itself (in place; returns `model`), over a 1-d
    mesh of all processes, with `mixed_precision(device)`. `model` must already be on `device`."""
    dist = _dist()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = mixed_precision(device)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_model(model: NAtSLForCausalLM, config: NAtSLConfig) -> NAtSLForCausalLM | None:
    """The consolidated (unsharded, float32, CPU) copy of a sharded `model`: a collective every process must call;
    rank 0 gets the model, the others `None`. The global RNG is left untouched."""
    dist = _dist()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.random.fork_rng(devices=[]):
        plain = NAtSLForCausalLM(config)
    plain.load_state_dict(sd)
    return plain.float().eval()


def save_fsdp_checkpoint(path: Path, model: NAtSLForCausalLM, optimizer, scheduler, state: dict,
                         config: NAtSLConfig) -> NAtSLForCausalLM | None:
    """Write the sharded checkpoint of step `state["step"]` to `path` (see the module docstring). A collective:
    every process calls it. Returns the consolidated model on rank 0 (for the routing map), `None` elsewhere."""
    dist = _dist()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from natsl.train.loop import TRAINER_STATE, rng_state, save_hf_model

    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(path)
    name = f"{DCP_PREFIX}{state['step']:08d}"
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path / name, ignore_errors=True)  # a leftover of an interrupted save of the same step
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / name))
    rngs: list = [None] * world
    dist.all_gather_object(rngs, rng_state())
    plain = full_model(model, config)
    if rank == 0:
        save_hf_model(path, plain)
        trainer_state = {**state, "scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_per_rank": rngs,
                         "fsdp": {"dcp": name, "world_size": world, "format": "torch.distributed.checkpoint",
                                  "torch": torch.__version__}}
        tmp = path / (TRAINER_STATE + ".tmp")
        torch.save(trainer_state, tmp)
        os.replace(tmp, path / TRAINER_STATE)
        for old in path.glob(DCP_PREFIX + "*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return plain


def load_fsdp_checkpoint(path: Path, model: NAtSLForCausalLM, optimizer, scheduler, trainer_state: dict) -> None:
    """Load the sharded model and optimizer state named by `trainer_state` (read from `path / TRAINER_STATE`) into
    the sharded `model` and its `optimizer`, and the scheduler and this rank's RNG state. A collective."""
    dist = _dist()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from natsl.train.loop import set_rng_state

    info = trainer_state["fsdp"]
    where = Path(path) / info["dcp"]
    if not (where / ".metadata").is_file():
        raise ValueError(f"cannot resume from {path}: its sharded state {where} is missing or incomplete")
    msd, osd = get_state_dict(model, optimizer)  # the optimizer state is initialised (zero-LR step) to load into
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    rank, world = dist.get_rank(), dist.get_world_size()
    rngs = trainer_state.get("rng_per_rank")
    set_rng_state(rngs[rank] if rngs is not None and len(rngs) == world else trainer_state["rng"])
