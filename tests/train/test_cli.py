"""`natsl train` end to end on CPU: short smoke runs of every task and model kind, the files a run writes,
checkpoints in HF format, resume equal to an uninterrupted run, and clear errors for bad arguments."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from natsl.models import NAtSLForCausalLM
from natsl.train.cli import main

ROOT = Path(__file__).resolve().parents[2]
# tiny dims and short sequences: a 20-step run of one model takes about a second
TINY = ["--hidden-size", "32", "--heads", "2", "--head-dim", "8", "--softmax-heads", "2", "--router-heads", "2",
        "--attention-heads", "2", "--intermediate-size", "64", "--block-size", "8", "--batch-size", "4",
        "--eval-examples", "8", "--threads", "1", "--no-progress"]


def run(tmp_path, *args, out="run"):
    return main(["train", "--out", str(tmp_path / out), *TINY, *args])


def metrics(tmp_path, out="run"):
    return json.loads((tmp_path / out / "metrics.json").read_text())


def test_compare_all_model_kinds_writes_reports(tmp_path, capsys):
    kinds = ["natsl", "hybrid", "linear", "softmax", "layer_hybrid"]
    assert run(tmp_path, "--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24", "--steps", "20",
               "--eval-every", "10", "--models", ",".join(kinds)) == 0
    printed = capsys.readouterr().out
    for kind in kinds:
        assert f"\n{kind} " in printed
    assert "softmax fraction per natsl layer" in printed and "routing of one held-out example, natsl" in printed
    out = tmp_path / "run"
    for name in ["metrics.json", "summary.csv", "history.csv", "summary.txt", "curves.png", "routing_natsl.png",
                 "routing_hybrid.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "routing_linear.png").exists()
    m = metrics(tmp_path)
    by_name = {r["name"]: r for r in m["models"]}
    assert list(by_name) == kinds
    assert by_name["natsl"]["layer_layout"] == ["natsl", "natsl"]
    assert by_name["hybrid"]["layer_layout"] == ["linear", "natsl"]
    assert by_name["layer_hybrid"]["layer_layout"] == ["linear", "softmax"]
    for r in m["models"]:
        assert r["steps"] == 20 and [h["step"] for h in r["history"]] == [10, 20]
        assert 0 <= r["eval_acc"] <= 1 and r["eval_loss"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["peak_memory_kind"].startswith("cpu_peak_rss")
    natsl = by_name["natsl"]
    assert set(natsl["softmax_fraction"]) == {"0", "1"} and all(len(f) == 2 for f in natsl["softmax_fraction"].values())
    assert 0 <= natsl["softmax_fraction_mean"] <= 1
    # per-head routing statistics: entropies in [0, ln 2], the 0% / 100% head shares consistent with the fractions
    ents = [e for v in natsl["router_entropy"].values() for e in v]
    fracs = [f for v in natsl["softmax_fraction"].values() for f in v]
    assert set(natsl["router_entropy"]) == {"0", "1"} and all(0 <= e <= 0.6932 for e in ents)
    assert natsl["heads_at_0"] == sum(f == 0 for f in fracs) / 4 and natsl["heads_at_100"] == sum(f == 1 for f in fracs) / 4
    assert all(set(h["softmax_fraction"]) == {"0", "1"} and 0 <= h["router_entropy_mean"] <= 0.6932
               for h in natsl["history"])
    assert "router entropy (nats" in printed and "heads at 0% softmax" in printed
    assert by_name["linear"]["heads_at_0"] is None and by_name["linear"]["router_entropy"] == {}
    rmap = natsl["routing_map"]
    assert len(rmap["relevant_blocks"]) == 4 and rmap["relevant_blocks"][0] == 1.0  # 4 pairs = the first block
    assert all(len(heads) == 2 and all(len(row) == 4 for row in heads) for heads in rmap["layers"].values())
    assert by_name["linear"]["softmax_fraction"] == {} and by_name["linear"]["routing_map"] is None
    with open(out / "summary.csv") as f:
        assert [row["model"] for row in csv.DictReader(f)] == kinds
    with open(out / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(kinds)

    # the checkpoint is a HF model that reproduces the run's final evaluation
    ckpt = out / "natsl" / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "trainer_state.pt").is_file()
    model = NAtSLForCausalLM.from_pretrained(ckpt).float().eval()
    assert model.config.layer_layout == ["natsl", "natsl"] and model.config.vocab_size == 24
    ids = torch.randint(0, 24, (2, 32))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("task_args", [
    ["--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24"],
    ["--task", "needle", "--seq-len", "40", "--num-kv-pairs", "3", "--vocab", "24"],
    ["--task", "copy", "--seq-len", "32", "--num-kv-pairs", "6", "--vocab", "12"],
    ["--task", "text", "--seq-len", "32"],
], ids=["mqar", "needle", "copy", "text"])
def test_smoke_run_of_each_task(tmp_path, capsys, task_args):
    if task_args[1] == "text":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("natsl routes blocks of tokens to softmax attention or a linear state. " * 30)
        task_args = [*task_args, "--data", str(corpus)]
    assert run(tmp_path, *task_args, "--steps", "20", "--models", "natsl,linear", "--no-plots") == 0
    m = metrics(tmp_path)
    assert [r["name"] for r in m["models"]] == ["natsl", "linear"]
    assert all(r["steps"] == 20 and r["history"] for r in m["models"])
    if task_args[1] == "text":
        assert m["run"]["configs"]["natsl"]["vocab_size"] == 256
    # 20 steps of a tiny model on text are enough to beat uniform guessing
    first, last = m["models"][0]["history"][0], m["models"][0]["history"][-1]
    assert last["step"] == 20 and last["train_loss"] < first["train_loss"] or task_args[1] != "text"
    assert "eval_acc" in capsys.readouterr().out


def test_resume_equals_uninterrupted_run(tmp_path, capsys):
    args = ["--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24", "--steps", "20",
            "--eval-every", "5", "--warmup", "4", "--models", "natsl,linear", "--no-plots"]
    assert run(tmp_path, *args, out="full") == 0
    assert run(tmp_path, *args, "--stop-at", "12", out="split") == 0
    half = metrics(tmp_path, "split")
    assert all(r["steps"] == 12 and [h["step"] for h in r["history"]] == [5, 10] for r in half["models"])
    state = torch.load(tmp_path / "split" / "natsl" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 12
    assert run(tmp_path, *args, "--resume", out="split") == 0
    assert "resumed from" in capsys.readouterr().err
    full, split = metrics(tmp_path, "full"), metrics(tmp_path, "split")
    for a, b in zip(full["models"], split["models"]):
        assert b["steps"] == 20
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [5, 10, 15, 20]
        for ha, hb in zip(a["history"], b["history"]):
            for key in ("train_loss", "eval_loss", "eval_acc", "lr"):
                assert hb[key] == pytest.approx(ha[key], rel=1e-5, abs=1e-6), (a["name"], ha["step"], key)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["softmax_fraction"] == a["softmax_fraction"]
    # resuming a finished run only re-evaluates it
    assert run(tmp_path, *args, "--resume", out="split") == 0
    assert metrics(tmp_path, "split")["models"][0]["eval_loss"] == pytest.approx(full["models"][0]["eval_loss"],
                                                                                 rel=1e-5)


def test_resume_refuses_a_different_model(tmp_path, capsys):
    args = ["--task", "copy", "--seq-len", "24", "--num-kv-pairs", "4", "--vocab", "12", "--models", "natsl",
            "--no-plots"]
    assert run(tmp_path, *args, "--steps", "4", "--stop-at", "2") == 0
    assert run(tmp_path, *args, "--steps", "4", "--resume", "--layers", "3") == 1
    assert "config differs" in capsys.readouterr().err
    assert run(tmp_path, *args, "--steps", "8", "--resume") == 1
    assert "--steps 4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--models", "natsl,transformer"], "unknown model kind(s) transformer"),
    (["--models", "natsl,natsl"], "lists a kind twice"),
    (["--steps", "0"], "expected a positive integer, got 0"),
    (["--lr", "-1"], "expected a positive number"),
    (["--router-budget", "1.5"], "expected a number in [0, 1]"),
    (["--task", "sort"], "invalid choice: 'sort'"),
    (["--seq-len", "16", "--num-kv-pairs", "8"], "needs seq_len >= 32"),
    (["--vocab", "8", "--num-kv-pairs", "8"], "needs vocab_size >= 17"),
    (["--task", "text"], "needs --data"),
    (["--task", "text", "--data", "/nonexistent/file.txt"], "not found"),
    (["--device", "tpu"], "--device must be cpu, cuda"),
    (["--stop-at", "50", "--steps", "10"], "beyond --steps"),
    (["--heads", "3"], "must both be multiples of num_router_heads"),
    (["--router-temperature", "0"], "expected a positive number"),
    (["--router-grad", "all"], "invalid choice: 'all'"),
    (["--fla-configs", "/nonexistent/folder"], "--fla-configs: path must be a folder"),
    (["--device", "cpu", "--precompile", "auto"], "--precompile needs a CUDA device"),
], ids=["kind", "twice", "steps", "lr", "budget", "task", "seq-len", "vocab", "text-data", "text-missing", "device",
        "stop-at", "heads", "temperature", "router-grad", "fla-configs",
        "precompile-cpu"])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "natsl train: error:" in err and message in err
    assert not (tmp_path / "x").exists()


def test_router_flags_reach_the_model(tmp_path):
    assert run(tmp_path, "--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24", "--steps", "2",
               "--models", "natsl", "--router-grad", "both", "--router-temperature", "0.5") == 0
    model = NAtSLForCausalLM.from_pretrained(tmp_path / "run" / "natsl" / "checkpoint")
    assert (model.config.router_grad, model.config.router_temperature) == ("both", 0.5)
    layer = model.model.layers[0].attn
    assert (layer.router_grad, layer.router.temperature) == ("both", 0.5)


def test_fla_configs_flag_points_fla_at_the_folder(tmp_path, monkeypatch):
    """`--fla-configs DIR` sets fla's config folder (and, where fla is not imported yet, its lookup mode) before the
    run; with fla already imported and no mode in the environment it is a clear error."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR")}
    monkeypatch.setattr(os, "environ", env)
    import fla.ops.utils.cache  # noqa: F401

    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--fla-configs", str(tmp_path)])
    env["FLA_CACHE_MODE"] = "strict"
    assert run(tmp_path, "--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24", "--steps", "1",
               "--models", "linear", "--fla-configs", str(tmp_path)) == 0
    assert env["FLA_CONFIG_DIR"] == str(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda", "--out", str(tmp_path / "x")])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--num-kv-pairs" in out and "--router-budget" in out


def test_module_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "natsl.train", "--models", "nope"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "unknown model kind(s) nope" in res.stderr


@pytest.mark.parametrize("nproc", [2, 1])
def test_ddp_on_cpu_with_torchrun(tmp_path, nproc):
    """gloo processes under torchrun (one process too: it must still take the DDP path): rank 0 alone writes the
    reports; tokens/s counts every process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "natsl.train", "--task", "mqar", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab", "24", "--steps", "6",
           "--models", "natsl", "--no-plots", "--device", "cpu", "--out", str(tmp_path / "ddp"), *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["run"]["world_size"] == nproc and m["run"]["ddp"] and m["models"][0]["steps"] == 6
    assert f"{nproc} process(es) (DDP)" in res.stdout
    assert res.stdout.count("softmax fraction per natsl layer") == 1
