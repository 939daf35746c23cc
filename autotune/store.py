"""The tuning store: every trial the tuner times, in one SQLite file (stdlib only; imports neither torch nor optuna).

One row per trial, keyed by (spec_hash, device, dtype, bucket, form, backend):

  spec_hash   `Recurrence.spec_hash` (sha256 of the spec text, 16 hex digits)
  device      `torch.cuda.get_device_name()` on a GPU; "cpu-interpreter" for Triton run by its interpreter
              (timings that mean nothing for a GPU, so never looked up for one); "cpu (MODEL, N threads)" for
              the torch backend on a CPU
  dtype       "float32", "float16", "bfloat16", "float64"
  bucket      `shape_bucket(...)`: "BH=8,T=1024,K=64,V=64"; B*H rounded to the nearest power of two, T rounded
              up to one, the spec's sizes exact (sorted by name)
  form        "chunked", "recurrent", ...
  backend     "torch", "triton"
  config      the keyword arguments, as canonical JSON (sorted keys)
  median_ms   the median of the timed runs, NULL when the trial failed
  error       why it failed ("OutOfResources: ..."), NULL when it ran
  created     ISO-8601 UTC timestamp
  versions    JSON {python, recurrence_dsl, torch, triton, optuna}
  study       an id shared by the trials of one `tune()` call

Default path: $RECURRENCE_DSL_CACHE/tuning.sqlite, else ~/.cache/recurrence_dsl/tuning.sqlite.

Concurrency: the database runs in WAL mode (readers never block the writer); every write is one
`BEGIN IMMEDIATE` transaction on its own short-lived connection with a generous busy timeout, so several
processes (parallel tuning jobs, or a tuner beside a training job that reads configs) can share one file.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import sqlite3
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec_hash TEXT NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    bucket TEXT NOT NULL,
    form TEXT NOT NULL,
    backend TEXT NOT NULL,
    config TEXT NOT NULL,
    median_ms REAL,
    error TEXT,
    created TEXT NOT NULL,
    versions TEXT NOT NULL,
    study TEXT,
    CHECK ((median_ms IS NULL) <> (error IS NULL))
);
CREATE INDEX IF NOT EXISTS trials_by_key ON trials (spec_hash, device, dtype, bucket, form, backend, median_ms);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_KEY = ("spec_hash", "device", "dtype", "bucket", "form", "backend")


def default_path() -> Path:
    """$RECURRENCE_DSL_CACHE/tuning.sqlite, else ~/.cache/recurrence_dsl/tuning.sqlite."""
    env = os.environ.get("RECURRENCE_DSL_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "recurrence_dsl"
    return base / "tuning.sqlite"


def dtype_name(dtype) -> str:
    """torch.float16 / "torch.float16" / "float16" -> "float16" (without importing torch)."""
    return str(dtype).removeprefix("torch.")


def _pow2_ceil(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _pow2_nearest(n: int) -> int:
    """The power of two nearest to n in log scale (ties round up): 3 -> 4, 5 -> 4, 6 -> 8, 12 -> 16."""
    if n <= 1:
        return 1
    return 1 << round(math.log2(n) + 1e-9)


def shape_bucket(batch: int, heads: int, length: int, sizes: dict[str, int]) -> str:
    """The shape key of a call: B*H to the nearest power of two, T up to one, every size exact.

    T sets the number of chunks and the padding of the last one, so it is rounded up; B*H only sets how many
    programs run side by side, so the nearest power of two is close enough."""
    bh = _pow2_nearest(int(batch) * int(heads))
    parts = [f"BH={bh}", f"T={_pow2_ceil(length)}"] + [f"{k}={int(sizes[k])}" for k in sorted(sizes)]
    return ",".join(parts)


def parse_bucket(bucket: str) -> dict[str, int]:
    """"BH=8,T=128,K=64" -> {"BH": 8, "T": 128, "K": 64}."""
    return {k: int(v) for k, v in (p.split("=") for p in bucket.split(","))}


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions of what a timing depends on (read from package metadata: nothing is imported)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    package = sys.modules.get("recurrence_dsl")
    return {
        "python": platform.python_version(),
        "recurrence_dsl": version("recurrence-dsl") or getattr(package, "__version__", None),
        "torch": version("torch"),
        "triton": version("triton"),
        "optuna": version("optuna"),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Trial:
    """One stored trial."""

    id: int
    spec_hash: str
    device: str
    dtype: str
    bucket: str
    form: str
    backend: str
    config: dict
    median_ms: float | None
    error: str | None
    created: str
    versions: dict
    study: str | None

    @property
    def ok(self) -> bool:
        return self.median_ms is not None


_COLUMNS = ("id",) + _KEY + ("config", "median_ms", "error", "created", "versions", "study")


def _trial(row) -> Trial:
    values = dict(zip(_COLUMNS, row))
    values["config"] = json.loads(values["config"])
    values["versions"] = json.loads(values["versions"])
    return Trial(**values)


class TuningStore:
    """An SQLite file of tuning trials; every method opens, uses and closes its own connection."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._ready = False

    def __repr__(self) -> str:
        return f"TuningStore({str(self.path)!r})"

    # -- connections ----------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        try:
            if not self._ready:
                _retry_while_locked(lambda: self._create_schema(conn))
                self._ready = True
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
        with _transaction(conn):  # (executescript would commit early: one statement at a time)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    # -- writing ---------------------------------------------------------------------------------------

    def record(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str, config: dict,
               median_ms: float | None = None, error: str | None = None, *, study: str | None = None,
               versions: dict | None = None, created: str | None = None) -> int:
        """Store one trial (exactly one of `median_ms`, `error`); returns its row id."""
        if (median_ms is None) == (error is None):
            raise ValueError("a trial has either a median_ms (it ran) or an error (it failed), not both or neither")
        if median_ms is not None and not (math.isfinite(median_ms) and median_ms >= 0):
            raise ValueError(f"median_ms must be a finite time >= 0, got {median_ms!r}")
        row = (spec_hash, device, dtype_name(dtype), bucket, form, backend, _canonical(config),
               None if median_ms is None else float(median_ms), error, created or _now(),
               json.dumps(versions if versions is not None else library_versions(), sort_keys=True), study)
        with closing(self._connect()) as conn, _transaction(conn):
            cur = conn.execute(f"INSERT INTO trials ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * 12)})",
                               row)
            return int(cur.lastrowid)

    # -- reading ---------------------------------------------------------------------------------------

    def best_trial(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str) -> Trial | None:
        """The fastest successful trial for the key (the latest among equal medians), or None."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE spec_hash = ? AND device = ? AND dtype = ? "
                "AND bucket = ? AND form = ? AND backend = ? AND median_ms IS NOT NULL "
                "ORDER BY median_ms ASC, id DESC LIMIT 1",
                (spec_hash, device, dtype_name(dtype), bucket, form, backend)).fetchone()
        return None if row is None else _trial(row)

    def best(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str) -> dict | None:
        """The config of the fastest successful trial for the key, or None."""
        trial = self.best_trial(spec_hash, device, dtype, bucket, form, backend)
        return None if trial is None else dict(trial.config)

    def trials(self, **where) -> list[Trial]:
        """Every stored trial matching the given key columns (and/or `study`), oldest first."""
        unknown = set(where) - set(_KEY) - {"study"}
        if unknown:
            raise TypeError(f"unknown filter {sorted(unknown)}; filter on {', '.join(_KEY + ('study',))}")
        if "dtype" in where:
            where["dtype"] = dtype_name(where["dtype"])
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        with closing(self._connect()) as conn:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM trials WHERE {clause} ORDER BY id",
                                tuple(where.values())).fetchall()
        return [_trial(r) for r in rows]

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0])

    def integrity_check(self) -> str:
        """SQLite's own check of the file: "ok" when sound."""
        with closing(self._connect()) as conn:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def _retry_while_locked(action):
    """Run `action`, retrying while SQLite reports the file locked, for up to the busy timeout.

    SQLite does not call its busy handler where waiting could deadlock, and switching a fresh file to
    WAL while another process creates it is such a case: the losing side gets "database is locked" at
    once. Backing off and trying again is the documented remedy.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as error:
            message = str(error).lower()
            if ("locked" not in message and "busy" not in message) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


@contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE (takes the write lock up front, waiting up to the busy timeout) ... COMMIT / ROLLBACK."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_store(store=None) -> TuningStore:
    """A `TuningStore` from a store, a path, or None (the default path)."""
    if isinstance(store, TuningStore):
        return store
    return TuningStore(store)


__all__ = ["Trial", "TuningStore", "default_path", "dtype_name", "library_versions", "open_store", "parse_bucket",
           "shape_bucket"]
