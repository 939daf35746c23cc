"""The GPU's rules for Triton source, checked on the source itself.

The Triton interpreter (how tests run without a GPU) accepts code that a GPU
compiler rejects or that misbehaves there. Every kernel this project writes or
ships is checked against these rules when it is generated (`check_kernel_source`)
and in the tests:

- no `tl.make_block_ptr` (removed in Triton 3.9): pointer arithmetic only;
- no `.to(...)` on a loop variable (a plain int in the interpreter, a tensor when compiled);
- every block `tl.load` and `tl.store` (its pointer built from `tl.arange`) is masked: the
  interpreter does not fault out of bounds; a scalar access such as a per-head param is exempt;
- every `tl.dot` block dimension is a power of two >= 16, which the launchers check before
  launching (`check_dot_blocks`), since block sizes are run-time choices.
"""

from __future__ import annotations

import ast


class KernelRuleError(AssertionError):
    """Generated Triton source breaks a GPU rule; the message names the kernel and line."""


def _is_triton_jit(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        text = ast.unparse(dec)
        if text.endswith("jit") or ".jit(" in text or text.startswith("triton.jit"):
            return True
    return False


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node)) or any(
        isinstance(n, ast.Call) and ast.unparse(n.func) == "tl.arange" for n in ast.walk(node))


def _block_names(fn: ast.FunctionDef) -> set[str]:
    """Names that hold blocks of offsets or pointers: assigned (transitively) from `tl.arange`."""
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if _mentions(node.value, names):
                    for t in targets:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name) and n.id not in names:
                                names.add(n.id)
                                changed = True
    return names


def check_kernel_source(source: str) -> None:
    """Raise `KernelRuleError` if any `@triton.jit` function in `source` breaks a rule above."""
    problems = [p for fn in ast.walk(ast.parse(source)) for p in function_problems(fn)]
    if problems:
        raise KernelRuleError("generated Triton source breaks the GPU's rules:\n  " + "\n  ".join(problems))


def function_problems(fn: ast.AST) -> list[str]:
    """The rules a `@triton.jit` function `fn` breaks, each as "name, line N: what" (N as `fn`'s line numbers
    count); nothing for any other node."""
    if not (isinstance(fn, ast.FunctionDef) and _is_triton_jit(fn)):
        return []
    problems: list[str] = []
    blocks = _block_names(fn)
    loop_vars = {t.id for loop in ast.walk(fn) if isinstance(loop, ast.For)
                 for t in ast.walk(loop.target) if isinstance(t, ast.Name)}
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        where = f"{fn.name}, line {node.lineno}"
        if func.endswith("make_block_ptr"):
            problems.append(f"{where}: tl.make_block_ptr is removed in Triton 3.9; use pointer arithmetic")
        if func in ("tl.load", "tl.store") and node.args and _mentions(node.args[0], blocks):
            if not any(k.arg == "mask" for k in node.keywords):
                problems.append(f"{where}: {func} without mask=")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            target = node.func.value
            if isinstance(target, ast.Name) and target.id in loop_vars:
                problems.append(f"{where}: .to() on the loop variable '{target.id}'")
    return problems


def check_dot_blocks(**blocks: int) -> None:
    """Every block that feeds `tl.dot` must be a power of two >= 16 (a GPU requirement)."""
    for name, value in blocks.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 for tl.dot on a GPU, got {value}")
