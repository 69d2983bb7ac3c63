"""The README's Python example runs as written (the public API it shows exists and works on CPU)."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    o_s, o_l, state = scope["o_s"], scope["o_l"], scope["state"]
    assert o_s.shape == (1, 256, 12, 128) and o_l.shape == (1, 256, 6, 256) and state.shape == (1, 6, 128, 256)
    assert torch.isfinite(o_s).all() and torch.isfinite(o_l).all()
    assert scope["o"].shape == (1, 40, 64)


def test_public_op_is_exported():
    import natsl
    from natsl.ops import natsl_attention

    assert natsl.natsl_attention is natsl_attention and "natsl_attention" in natsl.__all__
