"""Tuned configs at call time: which store a call reads, the key it reads, and a read that never waits or fails.

Copied verbatim into generated modules (after codegen/layer.py), so `recurrence_dsl.compile()` layers and a
generated module's layers read the same store the same way; `autotune.store` (which writes it) and
`autotune.lookup` take the key and the rule from here. Standard library and torch only, imported inside the
functions, so `autotune.store` stays free of torch.

Which store (one rule for compile(), generated modules and `recdsl tune`):

  1. $RECURRENCE_DSL_TUNING_STORE, a path to the SQLite file, when set;
  2. else tuning.sqlite in the per-user cache folder the generated modules' cache uses too (`tuning_cache_roots`,
     which codegen/cache.py takes its folders from): $RECURRENCE_DSL_CACHE when set, else
     $XDG_CACHE_HOME/recurrence_dsl (~/.cache/recurrence_dsl when XDG_CACHE_HOME is unset), else, where that folder
     cannot be used (a read-only HOME), recurrence_dsl-UID in the system's temporary folder. A call reads the
     first of these that holds a store (the fallback only in a folder this user owns); `recdsl tune` writes to the
     one holding a store, else to the first folder it can create and use (`autotune.store.default_path`).

`recdsl tune --store PATH` and `compile(..., tuning=PATH)` name another store for that run or that layer only.
RECURRENCE_DSL_TUNING=0 switches off lookups in the rule's store (an explicitly named store is still read).

Which config a call runs (the first that applies):

  1. `config=` or `chunk_size=` given to the call;
  2. `chunk_size=` given to `compile()` (or `Layer.options`);
  3. the store's choice for the call's key (spec hash, device, dtype, shape bucket, form, backend) and mode:
     "fwdbwd" when the call records a graph for a backward (grad mode on and an input or param requires
     grad), "fwd" otherwise; `recdsl tune` stores a choice only when a config beat the default beyond the
     timing noise (it stores "default kept" otherwise);
  4. the defaults: chunk_size 64 and each Triton kernel's own block sizes.

While torch.compile traces a call the store is not read (file access cannot be traced): a compiled model runs
its explicit chunk_size or the defaults; pass `chunk_size=` (e.g. from `layer.config_for(...)`) to compile a
tuned config in.

A call never waits on the store and never fails because of it: the file is opened read-only with a
TUNING_READ_TIMEOUT_S busy timeout; a missing file means defaults; a locked, corrupt or unreadable store, or a
stored config that is not a JSON object of known keys, means defaults and one RuntimeWarning per store and
process. Answers are memoised per process (`tuning_clear_cache()` forgets them); a store that could not be read
is tried again after TUNING_RETRY_S.
"""

from __future__ import annotations

import os

TUNING_READ_TIMEOUT_S = 0.05  # a forward call waits at most this long for a store another process holds locked
TUNING_RETRY_S = 30.0  # a store that could not be read (locked, say) is tried again after this long
TUNING_MODES = ("fwd", "fwdbwd")
TUNING_INTERPRETER = "cpu-interpreter"  # Triton run by its CPU interpreter: timings never looked up

_tuning_memo: dict[tuple, tuple] = {}
_tuning_warned: set[str] = set()
_tuning_cpu: list[str] = []  # the CPU model, read once per process


def tuning_cache_roots() -> list[str]:
    """The per-user cache folders, first choice first (absolute paths): [$RECURRENCE_DSL_CACHE] when set, else
    [$XDG_CACHE_HOME/recurrence_dsl (or ~/.cache/recurrence_dsl), TMPDIR/recurrence_dsl-UID]. The generated modules'
    cache (codegen/cache.py, which checks each folder's owner and mode) and the tuning store live in them."""
    cache = os.environ.get("RECURRENCE_DSL_CACHE")
    if cache:
        return [os.path.abspath(cache)]
    import tempfile

    xdg = os.environ.get("XDG_CACHE_HOME")
    home = os.path.abspath(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [os.path.join(home, "recurrence_dsl"), os.path.join(tempfile.gettempdir(), f"recurrence_dsl-{uid}")]


def tuning_store_path() -> str:
    """The store the rule above names for reading: $RECURRENCE_DSL_TUNING_STORE, else the first cache folder's
    tuning.sqlite that exists (a fallback folder's only when this user owns that folder), else the first's."""
    explicit = os.environ.get("RECURRENCE_DSL_TUNING_STORE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    stores = [os.path.join(root, "tuning.sqlite") for root in tuning_cache_roots()]
    for n, path in enumerate(stores):
        try:
            if os.path.isfile(path) and (n == 0 or not hasattr(os, "getuid")
                                         or os.stat(os.path.dirname(path)).st_uid == os.getuid()):
                return path
        except OSError:
            continue
    return stores[0]


def tuning_lookups_enabled() -> bool:
    """False when RECURRENCE_DSL_TUNING is 0/off/false/no (calls then skip the rule's store)."""
    return os.environ.get("RECURRENCE_DSL_TUNING", "1").strip().lower() not in ("0", "off", "false", "no")


def tuning_shape_bucket(batch: int, heads: int, length: int, sizes: dict) -> str:
    """The shape key of a call, e.g. "BH=8,T=1024,K=64,V=64": B*H to the nearest power of two in log scale
    (it only sets how many programs run side by side), T rounded up to a power of two (it sets the number of
    chunks and the padding of the last one), every spec size exact, sorted by name."""
    import math

    bh = int(batch) * int(heads)
    bh = 1 if bh <= 1 else 1 << round(math.log2(bh) + 1e-9)
    t = 1 << max(int(length) - 1, 0).bit_length()
    return ",".join([f"BH={bh}", f"T={t}"] + [f"{k}={int(sizes[k])}" for k in sorted(sizes)])


def tuning_cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one; read once)."""
    import platform

    if _tuning_cpu:
        return _tuning_cpu[0]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    _tuning_cpu.append(" ".join(line.split(":", 1)[1].split()))
                    return _tuning_cpu[0]
    except OSError:
        pass
    _tuning_cpu.append(platform.processor() or platform.machine() or "unknown")
    return _tuning_cpu[0]


def tuning_device_name(device, backend: str) -> str:
    """The store's device column: the GPU's name; "cpu-interpreter" for Triton on a CPU; "cpu (MODEL, N
    threads)" for the torch backend on a CPU (the thread count changes the timings)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if backend == "triton":
        return TUNING_INTERPRETER
    return f"{device.type} ({tuning_cpu_model()}, {torch.get_num_threads()} threads)"


def tuning_call_mode(call) -> str:
    """"fwdbwd" when the bound call records a graph for a backward (grad mode on and one of its inputs,
    params or initial states requires grad), else "fwd"."""
    import torch

    if not torch.is_grad_enabled():
        return "fwd"
    tensors = list(call.inputs.values()) + list(call.params.values()) + list((call.initial_state or {}).values())
    return "fwdbwd" if any(t.requires_grad for t in tensors) else "fwd"


def _tuning_warn(path: str, why: str) -> None:
    if path not in _tuning_warned:
        import warnings

        _tuning_warned.add(path)
        warnings.warn(f"tuning store {path}: {why}; calls run the default configs (this warning is shown once)",
                      RuntimeWarning, stacklevel=7)  # the frame that called the layer


def tuning_read(path: str, action, timeout_s: float = TUNING_READ_TIMEOUT_S):
    """`action(conn)` on a read-only connection to the SQLite file at `path`, waiting at most `timeout_s` for a
    lock. A WAL database read read-only needs its -shm file, which SQLite cannot create in a read-only
    directory; then the file is opened again as immutable (nobody can be writing a store in a directory that
    cannot be written). sqlite3 errors propagate."""
    import sqlite3
    import urllib.parse

    base = "file:" + urllib.parse.quote(os.path.abspath(path))
    for query in ("?mode=ro", "?mode=ro&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(base + query, uri=True, timeout=timeout_s, isolation_level=None)
            return action(conn)
        except sqlite3.OperationalError as err:
            text = str(err).lower()
            if query.endswith("immutable=1") or not ("unable to open" in text or "readonly" in text):
                raise
        finally:
            if conn is not None:
                conn.close()


def tuning_read_choice(path: str, key: tuple, config_keys: tuple) -> tuple[dict | None, str]:
    """(config or None, why) for `key` = (spec_hash, device, dtype, bucket, form, backend, mode) in the store
    at `path`, read-only, waiting at most TUNING_READ_TIMEOUT_S. Never raises: a missing store, key or choice is
    (None, why); an unusable store or config is (None, why) plus one RuntimeWarning per store. `config_keys`:
    the keys a config for this form and backend must have (codegen.layer.CONFIG_KEYS)."""
    import json
    import sqlite3

    if not os.path.isfile(path):
        return None, f"no tuning store at {path}"
    try:
        row = tuning_read(path, lambda conn: conn.execute(
            "SELECT config, tuned, reason FROM choices WHERE spec_hash = ? AND device = ? AND dtype = ? AND "
            "bucket = ? AND form = ? AND backend = ? AND mode = ?", key).fetchone())
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):  # a store written before choices were kept: nothing chosen
            return None, f"the store at {path} holds no tuning choices"
        _tuning_warn(path, f"cannot be read now ({err})")
        return None, f"the store at {path} cannot be read ({err})"
    except sqlite3.Error as err:
        _tuning_warn(path, f"is not a usable SQLite store ({err})")
        return None, f"the store at {path} is not usable ({err})"
    what = f"{key[4]}/{key[5]} {key[6]} {key[2]} {key[3]} on {key[1]}"
    if row is None:
        return None, f"nothing tuned for {what} in {path}"
    text, tuned, reason = row
    try:
        config = json.loads(text)
    except (TypeError, ValueError):
        config = None
    if not (isinstance(config, dict) and set(config) == set(config_keys)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in config.values())):
        _tuning_warn(path, f"holds a config for {what} that is not a JSON object of {', '.join(config_keys)}")
        return None, f"the stored config for {what} in {path} is unusable"
    if not tuned:
        return None, f"tuned in {path}: default kept for {what} ({reason})"
    return config, f"tuned in {path} for {what} ({reason})"


def tuning_lookup(layer, call, form: str, backend: str, config_keys: tuple | None,
                  store=None) -> tuple[dict | None, str]:
    """(config or None, why) the store gives a bound call of `layer` running `form` on `backend`.

    config_keys: the keys a config of (form, backend) has (`CONFIG_KEYS`), None when nothing is tunable there;
    store: None (the rule's store, unless RECURRENCE_DSL_TUNING=0) or a path. Packed sequences (cu_seqlens)
    look up one sequence of the longest length."""
    if store is None and not tuning_lookups_enabled():
        return None, "tuning lookups are off (RECURRENCE_DSL_TUNING=0)"
    keys = config_keys
    if keys is None:
        return None, f"nothing to tune for {form}/{backend}"
    path = tuning_store_path() if store is None else os.path.abspath(os.fspath(store))
    device = tuning_device_name(call.device, backend)
    if device == TUNING_INTERPRETER:
        return None, "Triton's interpreter: its timings are never looked up"
    if call.cu_seqlens is None:
        batch, length = call.batch, call.length
    else:
        bounds = call.cu_seqlens.tolist()
        batch, length = 1, max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    key = (layer.recurrence.spec_hash, device, str(call.dtype).removeprefix("torch."),
           tuning_shape_bucket(batch, call.heads, length, call.sizes), form, backend, tuning_call_mode(call))
    import time

    memo = (path,) + key
    now = time.monotonic()
    if memo not in _tuning_memo or _tuning_memo[memo][2] < now:
        config, why = tuning_read_choice(path, key, keys)
        # "cannot be read" is transient (a lock): try again later; every other answer holds until cleared
        _tuning_memo[memo] = (config, why, now + TUNING_RETRY_S if "cannot be read" in why else float("inf"))
    config, why, _ = _tuning_memo[memo]
    return (dict(config) if config is not None else None), why


def tuning_clear_cache() -> None:
    """Forget memoised lookups and warnings (after new choices were stored)."""
    _tuning_memo.clear()
    _tuning_warned.clear()
