"""`natsl train --fsdp` on CPU: FSDP2 (`fully_shard` per block + root) with 2 gloo processes under torchrun.

Two torchrun launches (each runs several command lines through `fsdp_driver.py`, to pay the launch cost twice only):
the first trains an FSDP run, the same run with DDP, and an FSDP run stopped at step 5; the second resumes that run
in fresh processes. Checked: the FSDP run trains and writes its reports and a sharded checkpoint with a consolidated
HF model; its losses equal DDP's (same data: each rank draws its own batch from `train_batch_generator(seed, step,
rank)`, so 2 x b under FSDP is compared with 2 x b under DDP, not with one process of 2b, whose batch of a step is a
different draw); the resumed run reproduces the uninterrupted one; bad combinations give clear errors.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from natsl.models import NAtSLForCausalLM
from natsl.train.cli import main
from natsl.train.loop import TrainSettings, build_config, evaluate, make_eval_set, train_model
from natsl.train.tasks import make_task

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "fsdp_driver.py"
TINY = ["--hidden-size", "32", "--heads", "2", "--head-dim", "8", "--softmax-heads", "2", "--router-heads", "2",
        "--attention-heads", "2", "--intermediate-size", "64", "--block-size", "8", "--batch-size", "4",
        "--eval-examples", "8", "--threads", "1", "--no-progress"]
TASK = ["--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24"]
# gumbel routing draws from the global RNG every step, so resuming must restore each rank's RNG state
ARGS = [*TASK, "--steps", "8", "--eval-every", "2", "--warmup", "2", "--models", "natsl", "--router-sample", "gumbel",
        "--no-plots", "--device", "cpu", *TINY]
FSDP = ["--fsdp", "--save-every", "3"]


def torchrun(tmp: Path, tag: str, jobs: list[list[str]]) -> tuple[list, subprocess.CompletedProcess]:
    (tmp / f"{tag}.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
           str(tmp / f"{tag}.json"), str(tmp / f"{tag}_rc.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((tmp / f"{tag}_rc.json").read_text()), res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {k: tmp / k for k in ("full", "ddp", "split")}
    rcs1, first = torchrun(tmp, "first", [
        [*ARGS, *FSDP, "--out", str(out["full"])],
        [*ARGS, "--out", str(out["ddp"])],
        [*ARGS, *FSDP, "--stop-at", "5", "--out", str(out["split"])],
    ])
    ckpt = out["split"] / "natsl" / "checkpoint"
    stopped = {"metrics": json.loads((out["split"] / "metrics.json").read_text()),
               "dcp": sorted(p.name for p in ckpt.glob("dcp-step*")),
               "state": torch.load(ckpt / "trainer_state.pt", weights_only=False)}
    rcs2, second = torchrun(tmp, "second", [
        [*ARGS, *FSDP, "--resume", "--out", str(out["split"])],
        [*ARGS, "--resume", "--out", str(out["split"])],  # an FSDP checkpoint without --fsdp: refused
        [*ARGS, *FSDP, "--resume", "--out", str(out["full"])],  # a finished run: only re-evaluated
    ])
    return {"out": out, "rcs": rcs1 + rcs2, "first": first, "second": second, "stopped": stopped}


def metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_fsdp_run_trains_and_writes_a_sharded_checkpoint(runs):
    assert runs["rcs"][:3] == [0, 0, 0]
    assert "8 steps x 4 x 2 process(es) (FSDP) on cpu" in runs["first"].stdout
    m = metrics(runs["out"]["full"])
    assert m["run"]["fsdp"] and not m["run"]["ddp"] and m["run"]["world_size"] == 2
    (r,) = m["models"]
    assert r["steps"] == 8 and [h["step"] for h in r["history"]] == [2, 4, 6, 8]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["eval_loss"]) for h in r["history"])
    assert 0 <= r["eval_acc"] <= 1 and r["tokens_per_s"] > 0
    assert set(r["softmax_fraction"]) == {"0", "1"} and r["routing_map"] is not None
    assert (runs["out"]["full"] / "summary.txt").is_file()

    ckpt = runs["out"]["full"] / "natsl" / "checkpoint"
    dcp_dirs = sorted(p.name for p in ckpt.glob("dcp-step*"))
    assert dcp_dirs == ["dcp-step00000008"]  # the saves at steps 3 and 6 were replaced
    assert (ckpt / dcp_dirs[0] / ".metadata").is_file() and len(list((ckpt / dcp_dirs[0]).glob("*.distcp"))) == 2
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 8 and state["fsdp"]["dcp"] == dcp_dirs[0] and state["fsdp"]["world_size"] == 2
    assert "optimizer" not in state and len(state["rng_per_rank"]) == 2
    # the consolidated HF model reproduces the run's final (sharded, float32 on CPU) evaluation
    model = NAtSLForCausalLM.from_pretrained(ckpt).float()
    task = make_task("mqar", seq_len=32, num_kv_pairs=4, vocab_size=24)
    ev = evaluate(model, make_eval_set(task, 8, 4, 0), torch.device("cpu"))
    assert ev["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-5)


def test_fsdp_losses_equal_ddp_with_the_same_data(runs):
    fsdp, ddp = metrics(runs["out"]["full"])["models"][0], metrics(runs["out"]["ddp"])["models"][0]
    assert not (runs["out"]["ddp"] / "natsl" / "checkpoint" / "dcp-step00000008").exists()
    for hf, hd in zip(fsdp["history"], ddp["history"], strict=True):
        for key in ("train_loss", "eval_loss", "lr"):
            assert hf[key] == pytest.approx(hd[key], rel=1e-4), (hf["step"], key)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=1e-4)


def test_fsdp_resume_equals_uninterrupted_run(runs):
    stopped = runs["stopped"]
    assert stopped["dcp"] == ["dcp-step00000005"] and stopped["state"]["step"] == 5
    assert [h["step"] for h in stopped["metrics"]["models"][0]["history"]] == [2, 4]
    assert runs["rcs"][3] == 0 and "natsl: resumed from" in runs["second"].stderr
    full, split = metrics(runs["out"]["full"])["models"][0], metrics(runs["out"]["split"])["models"][0]
    assert split["steps"] == 8 and [h["step"] for h in split["history"]] == [2, 4, 6, 8]
    for ha, hb in zip(full["history"], split["history"], strict=True):
        for key in ("train_loss", "eval_loss", "eval_acc", "lr", "router_aux_loss"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-5, abs=1e-6), (ha["step"], key)
    assert split["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    assert split["softmax_fraction"] == full["softmax_fraction"]
    # without --fsdp the sharded checkpoint is refused; resuming the finished run only re-evaluates it
    assert runs["rcs"][4] == 1 and "a sharded --fsdp checkpoint; resume it with --fsdp" in runs["second"].stderr
    assert runs["rcs"][5] == 0
    assert metrics(runs["out"]["full"])["models"][0]["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--fsdp", "--out", str(tmp_path / "x"), *TASK, "--steps", "2", *TINY])
    assert e.value.code == 2
    assert "--fsdp needs torchrun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    task = make_task("mqar", seq_len=32, num_kv_pairs=4, vocab_size=24)
    with pytest.raises(ValueError, match="--fsdp needs a process group"):
        train_model("natsl", build_config("natsl", vocab_size=24), task, TrainSettings(steps=2, fsdp=True), None, [])


def test_help_describes_fsdp(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--fsdp" in out and "FSDP2" in out and "torch.distributed.checkpoint" in out


@pytest.mark.gpu
def test_fsdp_on_cuda_trains_and_resumes(tmp_path):
    """The CUDA path (NCCL, bf16 compute copies, fp32 reduction, fused AdamW on DTensors) on every visible GPU:
    trains, and a stopped + resumed run follows the uninterrupted one (loosely: CUDA kernels need not be
    bitwise deterministic)."""
    nproc = torch.cuda.device_count()
    args = [*TASK, "--steps", "8", "--eval-every", "2", "--warmup", "2", "--models", "natsl,linear", "--no-plots",
            "--device", "cuda", *TINY, *FSDP]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # set by conftest unless NATSL_TEST_DEVICE=cuda: real kernels here
    for tag, jobs in [("a", [[*args, "--out", str(tmp_path / "full")], [*args, "--stop-at", "5", "--out",
                                                                          str(tmp_path / "split")]]),
                      ("b", [[*args, "--resume", "--out", str(tmp_path / "split")]])]:
        (tmp_path / f"{tag}.json").write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(DRIVER), str(tmp_path / f"{tag}.json"), str(tmp_path / f"{tag}_rc.json")]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        assert all(rc == 0 for rc in json.loads((tmp_path / f"{tag}_rc.json").read_text())), res.stderr[-4000:]
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert full["run"]["fsdp"] and full["run"]["world_size"] == nproc
    for a, b in zip(full["models"], split["models"], strict=True):
        assert b["steps"] == 8 and a["peak_memory_kind"] == "cuda_max_allocated"
        for ha, hb in zip(a["history"], b["history"], strict=True):
            assert math.isfinite(ha["train_loss"]) and hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-2)
        assert NAtSLForCausalLM.from_pretrained(tmp_path / "full" / a["name"] / "checkpoint").config.vocab_size == 24
