"""The GPU's rules, checked on every Triton source the project writes or ships."""

from pathlib import Path

import pytest

import recurrence_dsl
from codegen.kernel_rules import KernelRuleError, check_dot_blocks, check_kernel_source
from codegen.module import module_source
from codegen.triton_recurrent import triton_recurrent_source
from recurrence_dsl.analysis import analyse

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.rec"))


@pytest.mark.parametrize("name", ["triton_runtime", "triton_parallel"])
def test_shipped_triton_runtime_keeps_the_rules(name):
    check_kernel_source((ROOT / "codegen" / f"{name}.py").read_text())


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_generated_kernels_and_modules_keep_the_rules(path):
    recs = recurrence_dsl.load(path)
    analyses = [analyse(r.checked) for r in recs.values()]
    for a in analyses:
        check_kernel_source(triton_recurrent_source(a))
    check_kernel_source(module_source(analyses, str(path)))


BAD = {
    "make_block_ptr": ("p = tl.make_block_ptr(x, (n,), (1,), (0,), (16,), (0,))", "make_block_ptr"),
    "unmasked block store": ("tl.store(x + o, 1.0)", "tl.store without mask="),
    "unmasked block load": ("y = tl.load(x + o * 2)", "tl.load without mask="),
    "to on loop variable": ("y = i.to(tl.int64)", ".to() on the loop variable 'i'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_rule_is_enforced(name):
    line, message = BAD[name]
    source = f'''
import triton
import triton.language as tl


@triton.jit
def kernel(x, n):
    o = tl.arange(0, 16)
    for i in range(n):
        {line}
'''
    with pytest.raises(KernelRuleError, match="kernel, line 10") as err:
        check_kernel_source(source)
    assert message in str(err.value)


def test_scalar_loads_need_no_mask_and_plain_python_is_ignored():
    check_kernel_source('''
import triton
import triton.language as tl


@triton.jit
def kernel(x, h):
    o = tl.arange(0, 16)
    b = tl.load(x + h)
    tl.store(x + o, b, mask=o < 4)


def not_a_kernel(i):
    return i.to("cpu")
''')


@pytest.mark.parametrize("value,ok", [(16, True), (64, True), (8, False), (48, False)])
def test_dot_blocks_are_powers_of_two_at_least_16(value, ok):
    if ok:
        check_dot_blocks(BT=value)
    else:
        with pytest.raises(ValueError, match=f"BT must be a power of two >= 16 .* got {value}"):
            check_dot_blocks(BT=value)
