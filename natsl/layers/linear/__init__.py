"""Linear branch (spec §1.4): recurrence backends. `TORCH_LINEAR_OPS` holds the pure-PyTorch (CPU) twins of fla's ops."""

from natsl.layers.linear.torch_ops import torch_deltanet, torch_gdn, torch_gla, torch_linear_attn, torch_mamba2

TORCH_LINEAR_OPS = {
    'gdn': torch_gdn,
    'deltanet': torch_deltanet,
    'gla': torch_gla,
    'mamba2': torch_mamba2,
    'linear_attn': torch_linear_attn,
}

__all__ = ['TORCH_LINEAR_OPS', 'torch_deltanet', 'torch_gdn', 'torch_gla', 'torch_linear_attn', 'torch_mamba2']
