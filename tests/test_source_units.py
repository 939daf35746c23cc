"""A module's source split into top-level statements (codegen/source_units.py): the split gives the text back
exactly, and a second module in a process parses only its own printed parts, not the runtime again."""

from __future__ import annotations

import pytest

from codegen import source_units
from codegen.module import module_source
from codegen.source_units import joined, units_of
from recurrence_dsl.analysis import analyse
from recurrence_dsl.api import load

from .conftest import SPECS_DIR

SOURCE = '''# a comment before anything

import math
a = 1; b = 2


@decorator
@other(
    1)
def f(x):
    """doc"""

    return x  # trailing


class C:
    pass
# the end, no newline'''


def test_units_give_the_text_back_and_each_statement_with_its_decorators():
    units = units_of(SOURCE)
    assert joined(units) == SOURCE
    kinds = [(u.defines, len(u.nodes)) for u in units]
    assert kinds == [((), 0), ((), 1), (("a", "b"), 2), ((), 0), (("f",), 1), ((), 0), (("C",), 1), ((), 0)]
    f = units[4]
    assert f.text.startswith("@decorator\n") and f.text.endswith("# trailing\n")
    assert f.function is not None and f.function.lineno == 4  # counted from the unit's first line
    assert f.reads >= {"decorator", "other", "x"} and "math" not in f.reads
    assert units[2].function is None and units[-1].text == "# the end, no newline"


def test_units_of_bad_source_raise_syntax_error():
    with pytest.raises(SyntaxError):
        units_of("def f(:\n")


def test_a_second_module_parses_its_own_parts_not_the_runtime(monkeypatch):
    first, second = (analyse(load(SPECS_DIR / f"{name}.rec")[name].checked) for name in ("retention", "gla"))
    source_units.split_units.cache_clear()  # an earlier test in this process may have built gla's module already
    module_source([first], "retention.rec")
    parsed = []
    real = source_units.units_of  # what `split_units` parses on a miss (module.py parses a module's own parts)
    monkeypatch.setattr(source_units, "units_of", lambda text: parsed.append(len(text)) or real(text))
    text = module_source([second], "gla.rec")
    # only the header and docstring (gla's spec) are new among the parts the runtime is cached with
    assert 0 < sum(parsed) < 0.05 * len(text), (parsed, len(text))
