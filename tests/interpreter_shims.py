"""Two small shims of Triton-interpreter internals that fla's kernels need on CPU (spec §6).

Verified on triton 3.9.0 (pinned by the `ci` extra). Test-only: never applied by `import natsl`.

1. The autotuner must not benchmark under the interpreter (there is no device to time on): keep the
   first config of every autotuned kernel.
2. Loop variables of plain `range` loops inside kernels are Python ints under the interpreter, but fla
   calls `.to(tl.int64)` on them: give them a `.to` that returns the value unchanged.
"""

from __future__ import annotations

import ast

_APPLIED = False


class _LoopInt(int):
    def to(self, *args, **kwargs):
        return self


def _natsl_loop(iterable):
    for x in iterable:
        yield _LoopInt(x) if type(x) is int else x


def apply_interpreter_shims() -> None:
    """Patch triton's autotuner and interpreter (idempotent). Call after `TRITON_INTERPRET=1` is set."""
    global _APPLIED
    if _APPLIED:
        return
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    prune = autotuner.Autotuner.prune_configs

    def first_config_only(self, kwargs):
        return prune(self, kwargs)[:1]

    autotuner.Autotuner.prune_configs = first_config_only

    # `FunctionRewriter._compile_and_exec` copies the interpreter module's globals into the kernel's globals.
    interpreter._natsl_loop = _natsl_loop

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = ast.Call(func=ast.Name(id="_natsl_loop", ctx=ast.Load()), args=[node.iter], keywords=[])
        return node

    interpreter.ASTTransformer.visit_For = visit_For
    _APPLIED = True
