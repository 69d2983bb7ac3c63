"""`benchmarks/router_logits.py`: the router margin's split into a sequence-shared and a per-block part adds up to the
router's own logit margin, and the script reads a `natsl train` run folder."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from router_logits import margins, table  # noqa: E402

from natsl import NAtSLConfig, NAtSLForCausalLM  # noqa: E402
from natsl.layers.routing import SOFTMAX  # noqa: E402
from natsl.train.loop import natsl_layer_inputs  # noqa: E402
from natsl.train.tasks import MQARTask  # noqa: E402


def test_split_adds_up_to_the_routers_margin():
    torch.manual_seed(0)
    cfg = NAtSLConfig.preset("tiny", "natsl", vocab_size=64, block_size=16)
    model = NAtSLForCausalLM(cfg).eval()
    for n, p in model.named_parameters():  # routers away from their near-zero init: margins of order one
        if ".router." in n:
            p.data.normal_(0, 1.0)
    task = MQARTask(128, 8, 64, None, "random")
    batch = task.sample(3, torch.Generator().manual_seed(0), split="eval")
    inputs = natsl_layer_inputs(model, batch.input_ids)
    split = margins(model, batch.input_ids)
    assert set(split) == set(range(cfg.num_hidden_layers))
    for i, (shared, own) in split.items():
        router = model.model.layers[i].attn.router
        _, p = router(inputs[i])  # [B, N, Hr, 2] softmax probabilities at temperature 1
        want = (p[..., SOFTMAX].log() - p[..., 1 - SOFTMAX].log()).double()
        torch.testing.assert_close((shared + own).double(), want, rtol=1e-4, atol=1e-4)
        assert torch.allclose(own.mean(1), torch.zeros_like(own.mean(1)), atol=1e-5)  # own part: zero mean per sequence
    rows = table(model, batch)
    assert len(rows) == cfg.num_hidden_layers * cfg.num_router_heads
    assert all(0.0 <= float(r["softmax"].rstrip("%")) <= 100.0 for r in rows)


def test_cli_reads_a_run_folder(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-c", "import sys; from natsl.train.cli import train_main; "
                    "sys.exit(train_main(sys.argv[1:]))", "--task", "mqar", "--seq-len", "64", "--num-kv-pairs", "4",
                    "--vocab", "32", "--block-size", "16", "--models", "natsl", "--steps", "2", "--batch-size", "2",
                    "--eval-every", "2", "--eval-examples", "4", "--device", "cpu", "--threads", "1", "--out",
                    str(run), "--no-progress", "--no-plots"], check=True, cwd=ROOT, capture_output=True)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_logits.py"), str(run), "--examples", "4"],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "## natsl" in out and "|shared| / spread" in out
    assert out.count("\n| 1 |") == NAtSLConfig.preset("tiny", "natsl").num_router_heads
