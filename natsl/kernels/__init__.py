"""natsl-owned Triton kernels: gather / scatter of rows and routed tokens (spec §3), and their index metadata."""

from natsl.kernels.gather_scatter import gather_rows, gather_tokens, scatter_add_rows, scatter_rows, scatter_tokens

__all__ = ["gather_rows", "gather_tokens", "scatter_add_rows", "scatter_rows", "scatter_tokens"]
