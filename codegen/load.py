"""Load a recurrence's layer: generate its module, write it to the per-user cache, import it from its source.

This is the one path from an analysis to something callable; `recurrence_dsl.compile` adds the tuning
lookup on top, and the tuner times layers loaded here.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
from pathlib import Path

from recurrence_dsl.analysis import Analysis
from recurrence_dsl.api import spec_hash

from .cache import indexed_source, load_indexed, load_source, remember, remember_source
from .interpreter import vectorise_interpreter_scans
from .module import module_source


def triton_import_error() -> str | None:
    """Why triton does not import here ("ModuleNotFoundError: No module named 'numpy'"), or None when it does."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure of the import is the answer
        return f"{type(err).__name__}: {err}"
    return None


def triton_available() -> bool:
    """True when triton imports (its kernels then run on CUDA tensors, or in its CPU interpreter)."""
    return triton_import_error() is None


_MODULES: dict[tuple[str, str], object] = {}
# One generation at a time: threads asking for the same module wait for it rather than each printing it, and
# CPython 3.11's ast constructors are not safe to run from several threads at once ("AST constructor recursion
# depth mismatch").
_GENERATING = threading.RLock()


def load_module(analysis: Analysis):
    """The generated module of one recurrence, imported from the cache (see `codegen.cache`); generated once
    per process for the same spec text and file name."""
    rec = analysis.recurrence
    key = (rec.text, rec.source.filename)
    vectorise_interpreter_scans()  # no-op unless Triton runs in its interpreter (TRITON_INTERPRET=1)
    with _GENERATING:
        if key not in _MODULES:
            index = _index_key(rec.text, rec.source.filename)
            module = load_indexed(index) if index else None
            if module is None:
                module = load_source(module_source([analysis], rec.source.filename), rec.name)
                if index:
                    remember(index, module)
            _MODULES[key] = module
        _ANALYSES.setdefault(spec_hash(rec), analysis)
        return _MODULES[key]


# The analysis behind every layer loaded in this process, by the spec hash its layer carries
# (`layer.recurrence.spec_hash`): what `analysis_of` answers for tools that take a layer, such as
# `recurrence_dsl.distributed.context_parallel`, which needs each state's transition class.
_ANALYSES: dict[str, Analysis] = {}


def analysis_of(layer) -> Analysis | None:
    """The analysis a layer loaded by `load_layer` (or `recurrence_dsl.compile`) in this process was generated
    from, found by its spec hash; None for a layer this process did not generate (a module imported as a file)."""
    return _ANALYSES.get(getattr(getattr(layer, "recurrence", None), "spec_hash", None))


@functools.lru_cache(maxsize=1)
def generator_fingerprint() -> str | None:
    """A hash of everything a generated module's text depends on besides its spec: the source files of the
    packages that parse, analyse and print it (recurrence_dsl, codegen, grammar), and the Python and sympy
    versions (ast.unparse and sympy's printers shape the text). None when a package's files cannot be read
    (then nothing is indexed and every process generates)."""
    import sympy

    import grammar
    import recurrence_dsl.analysis  # (its folder: the package itself is the facade, above this layer)

    digest = hashlib.sha256(f"{sys.version_info[:2]} sympy {sympy.__version__}".encode())
    try:
        for module_file in (recurrence_dsl.analysis.__file__, __file__, grammar.__file__):
            root = Path(module_file).parent
            for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".lark") and p.is_file()):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    except (OSError, TypeError):
        return None
    return digest.hexdigest()


def _index_key(text: str, filename: str) -> str | None:
    """The module index's key (codegen/cache.py `load_indexed`) of a recurrence's text and file name."""
    fingerprint = generator_fingerprint()
    if fingerprint is None:
        return None
    return hashlib.sha256("\0".join((fingerprint, filename, text)).encode()).hexdigest()[:32]


def module_text(analyses: list[Analysis], filename: str, name: str | None = None) -> str:
    """`module_source(analyses, filename, name)`, read from the module index when a process generated the same text
    before (`recdsl compile`; a module of one recurrence, without `name`, shares its entry with `load_module`'s)."""
    index = _index_key("\0\0".join(a.recurrence.text for a in analyses), filename + (f"\0{name}" if name else ""))
    source = indexed_source(index) if index else None
    if source is None:
        source = module_source(analyses, filename, name)
        if index:
            remember_source(index, source, analyses[0].recurrence.name)
    return source


def load_layer(analysis: Analysis):
    """The recurrence's layer in its generated module (a `codegen.layer.Layer`, defaults form="auto",
    backend="auto", chunk_size=64, no tuning lookup)."""
    return getattr(load_module(analysis), analysis.recurrence.name)


__all__ = ["analysis_of", "generator_fingerprint", "load_layer", "load_module", "module_text", "triton_available",
           "triton_import_error"]
