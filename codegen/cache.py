"""The per-user cache of generated modules: `compile()` writes a module here and imports it from its source.

Directory: $RECURRENCE_DSL_CACHE/modules, else $XDG_CACHE_HOME/recurrence_dsl/modules, else
~/.cache/recurrence_dsl/modules; created with mode 0700, and used only when it is owned by the current user
and not writable by anyone else (else the next candidate, ending with a per-user directory under the system
temporary directory, checked the same way). A module's file name is a hash of its source, which holds the
project version, so a stale file is never read for a newer compiler. Modules are executed from the source
text just written or verified on disk, never from a `.pyc` (no bytecode is written or read), and registered
in `sys.modules` under that file's name so tracebacks, `inspect` and Triton's JIT find the real file.

Generating a module takes seconds (sympy, the printers), so a second directory, "module-index" (a sibling of
"modules"), maps what a module is generated from to the file holding it: `load_indexed(key)` imports that file
without generating, where `key` hashes everything the text depends on (the spec text and file name, and the
generator: `codegen.load.generator_fingerprint`). An index entry is only a file name; the module file it names
is read and its hash checked against the name before it runs, as a fresh generation's would be.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import threading
import types
from pathlib import Path

from .tuning import tuning_cache_roots


class CacheError(OSError):
    """No cache directory could be used safely."""


def _candidates() -> list[Path]:
    """The "modules" folder in each per-user cache folder (`codegen.tuning.tuning_cache_roots`, which the tuning
    store's rule reads too), first choice first; absolute: a module's __file__ must survive a chdir."""
    return [Path(root) / "modules" for root in tuning_cache_roots()]


def _check_owner(path: Path, info: os.stat_result, own: bool) -> None:
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and info.st_uid != uid and (own or info.st_uid != 0):
        raise CacheError(f"{path} is owned by uid {info.st_uid}, not by this user ({uid})")
    sticky = info.st_mode & stat.S_ISVTX and not own  # like /tmp: others may add, not replace, entries
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
        raise CacheError(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")


def _safe_directory(path: Path) -> None:
    """Create `path` (mode 0700) if needed; raise CacheError unless it is ours and no one else can write to it
    or to the directory holding it (who can write there can swap `path` for a directory of their own)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"{path} is not a directory")
    _check_owner(path, info, own=True)
    _check_owner(path.parent, path.parent.stat(), own=False)


def cache_directory(kind: str | None = "modules") -> Path:
    """The first usable cache directory for `kind` (see the module docstring): "modules" for generated modules,
    "kernel-figures" (a sibling of "modules") for the tuner's compile-only kernel figures (autotune/figures.py),
    None for the cache folder itself (the default tuning store's, autotune/store.py). Raises CacheError naming
    every refusal."""
    if kind is not None and not kind.replace("-", "").isalnum():
        raise ValueError(f"cache kind must be a plain directory name, got {kind!r}")
    refusals = []
    for path in (p if kind == "modules" else p.parent if kind is None else p.parent / kind for p in _candidates()):
        try:
            _safe_directory(path)
            return path
        except OSError as err:
            refusals.append(f"{path}: {err}")
    what = "generated modules" if kind == "modules" else "the tuning store" if kind is None else kind
    raise CacheError(f"no usable cache directory for {what}: " + "; ".join(refusals))


def write_atomically(path: Path, text: str, private: bool = True) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename: a reader sees the
    old file or the new one, never half of one. private: mode 0600 (the cache's files); else the mode of the file
    it replaces, or for a new file the mode a plain `open(path, "w")` gives under the process's umask (a module or
    graph the user asked for, to share)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if not private:
            try:
                mode = stat.S_IMODE(path.stat().st_mode)  # (a file replaced keeps its mode: 640 stays 640)
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX has no query; Linux's /proc has)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_LOCK = threading.Lock()  # one import at a time: another thread must not see a half-executed module


def _digest(source: str) -> str:
    """The hash a module's file name ends with: its source's (so a name, once imported, is that source)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def load_source(source: str, stem: str) -> types.ModuleType:
    """Import generated `source` as the module `<stem>_<hash>` from a file in the cache directory.

    The file is (re)written unless it already holds exactly `source`; the code executed is `source` itself,
    compiled with the file's path as its filename."""
    name = f"recdsl_{stem}_{_digest(source)}"
    with _LOCK:
        if name in sys.modules:  # the name holds the source's hash: once imported, the module is this source
            return sys.modules[name]
        return _import(source, name)


def _write_source(path: Path, source: str) -> None:
    """Write `source` to `path` unless the file already holds exactly it (a symlink there is replaced)."""
    try:
        current = path.read_text() if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError):
        current = None
    if current != source:
        write_atomically(path, source)


def _import(source: str, name: str) -> types.ModuleType:
    path = cache_directory() / f"{name}.py"
    _write_source(path, source)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _index_path(key: str) -> Path:
    if not key.isalnum():
        raise ValueError(f"an index key is a hex digest, got {key!r}")
    return cache_directory("module-index") / key


def _indexed(key: str) -> tuple[str, str] | None:
    """The module name the index holds under `key` and that module's source; None when there is no entry, the
    file is gone, or it no longer holds the source its name hashes."""
    try:
        name = _index_path(key).read_text().strip()
        if not name.startswith("recdsl_") or not name.replace("_", "").isalnum():
            return None
        path = cache_directory() / f"{name}.py"
        if path.is_symlink():
            return None
        source = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return (name, source) if _digest(source) == name.rsplit("_", 1)[-1] else None


def load_indexed(key: str) -> types.ModuleType | None:
    """The module `remember` stored under `key`, imported from its cache file; None when there is no entry,
    the file is gone, or it no longer holds the source its name hashes (then the caller generates it again)."""
    found = _indexed(key)
    if found is None:
        return None
    name, source = found
    with _LOCK:
        return sys.modules[name] if name in sys.modules else _import(source, name)


def indexed_source(key: str) -> str | None:
    """The source text indexed under `key` (by `remember` or `remember_source`), not imported; None as for
    `load_indexed`."""
    found = _indexed(key)
    return None if found is None else found[1]


def remember(key: str, module: types.ModuleType) -> None:
    """Index `module` (one `load_source` imported) under `key`, for `load_indexed` in later processes. Best
    effort: a cache directory that cannot be written only costs the next process a generation."""
    try:
        write_atomically(_index_path(key), module.__name__ + "\n")
    except OSError:
        pass


def remember_source(key: str, source: str, stem: str) -> None:
    """Write generated `source` to the cache (as `load_source` would, without importing it) and index it under
    `key`, for `indexed_source` in later processes. Best effort, as `remember`."""
    name = f"recdsl_{stem}_{_digest(source)}"
    try:
        _write_source(cache_directory() / f"{name}.py", source)
        write_atomically(_index_path(key), name + "\n")
    except OSError:
        pass


__all__ = ["CacheError", "cache_directory", "indexed_source", "load_indexed", "load_source", "remember",
           "remember_source", "write_atomically"]
