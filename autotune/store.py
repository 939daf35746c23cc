"""The tuning store: every trial the tuner times, and the config it chose, in one SQLite file (stdlib only).

Table `trials`, one row per timed config, keyed by (spec_hash, device, dtype, bucket, form, backend, mode):

  spec_hash   `Recurrence.spec_hash` (sha256 of the spec text, 16 hex digits)
  device      `torch.cuda.get_device_name()` on a GPU; "cpu-interpreter" for Triton run by its interpreter
              (timings that mean nothing for a GPU, so never looked up for one); "cpu (MODEL, N threads)" for
              the torch backend on a CPU
  dtype       "float32", "float16", "bfloat16", "float64"
  bucket      `shape_bucket(...)`: "BH=8,T=1024,K=64,V=64"; B*H rounded to the nearest power of two, T rounded
              up to one, the spec's sizes exact (sorted by name)
  form        "chunked", "recurrent", ...
  backend     "torch", "triton"
  mode        "fwd" (forward only, no graph) or "fwdbwd" (forward and backward, what a training step runs)
  config      the keyword arguments, as canonical JSON (sorted keys)
  median_ms   the median of the timed runs, NULL when the trial failed; iqr_ms their interquartile range
  error       why it failed ("OutOfResources: ..."), NULL when it ran
  created     ISO-8601 UTC timestamp
  versions    JSON {python, recurrence_dsl, torch, triton, optuna, threads: the CPU thread settings}
  study       an id shared by the trials of one `tune()` call

Table `choices`, one row per key: the config `tune()` declared (`tuned` 1) or "default kept" (`tuned` 0, when
no config beat the default beyond the noise), with the reason in words. A study's choice replaces the one stored for
its key and mode only when it timed at least as many configs as that choice's study did (`save_study(replace=)`
overrides; the caller is told which choice stayed or was replaced). Calls read only this table
(`codegen/tuning.py`, read-only, never waiting): a raw fastest median is not a choice.

Which file: `default_path()`, the rule of codegen/tuning.py ($RECURRENCE_DSL_TUNING_STORE, else
$RECURRENCE_DSL_CACHE/tuning.sqlite, else ~/.cache/recurrence_dsl/tuning.sqlite), whose folders are created when
it is first written; a store given by path (`--store PATH`, `tune(store=PATH)`, `TuningStore(PATH)`) must be in
a folder that exists (`StoreError` naming the missing folder otherwise: a typo creates no tree).

Concurrency: the database runs in WAL mode (readers never block the writer); every write is one
`BEGIN IMMEDIATE` transaction on its own short-lived connection with a generous busy timeout, so several
processes (parallel tuning jobs, or a tuner beside a training job that reads configs) can share one file.
Readers (`trials`, `best`, `choice`) open the file read-only and never create it, so they work on a
read-only store. `save_study` writes a whole study at once, waits for a lock up to a limit while reporting
progress, and otherwise saves the study to a side file it names (`StoreLocked`), so no measured trial is lost;
`merge_side_file` (or `python -m autotune.store merge SIDE.json [--store PATH]`) writes it later.
`check_writable` turns every bad path (a directory, a corrupt file, a read-only file or filesystem) into one
`StoreError` with a clear message.
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

from codegen.cache import cache_directory
from codegen.tuning import TUNING_MODES, tuning_read, tuning_shape_bucket, tuning_store_path

SCHEMA_VERSION = 2  # 2: trials.mode, trials.iqr_ms and the choices table
BUSY_TIMEOUT_S = 60.0
LOCK_WAIT_S = 60.0  # how long `save_study` waits for another process's lock before saving to a side file
LOCK_POLL_S = 0.5  # one busy-timeout slice of that wait: progress is reported between slices
EMPTY_WAIT_S = 2.0  # how long a 0-byte file at the store's path may stay empty (another process creating it)

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
CREATE TABLE IF NOT EXISTS choices (
    spec_hash TEXT NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    bucket TEXT NOT NULL,
    form TEXT NOT NULL,
    backend TEXT NOT NULL,
    mode TEXT NOT NULL,
    config TEXT NOT NULL,
    tuned INTEGER NOT NULL,
    reason TEXT NOT NULL,
    study TEXT,
    created TEXT NOT NULL,
    PRIMARY KEY (spec_hash, device, dtype, bucket, form, backend, mode)
)
"""
# Columns added to `trials` after schema version 1 (ALTER TABLE on an older file; read as these defaults).
_ADDED = {"mode": ("TEXT NOT NULL DEFAULT 'fwd'", "'fwd'"), "iqr_ms": ("REAL", "NULL")}

_KEY = ("spec_hash", "device", "dtype", "bucket", "form", "backend")


class StoreError(Exception):
    """A tuning store that cannot be used for writing: the message names the path and why."""


class StoreLocked(StoreError):
    """Another process held the store locked longer than the wait; `side_file` holds the unsaved study."""

    def __init__(self, message: str, side_file: Path | None):
        super().__init__(message)
        self.side_file = side_file


def default_path() -> Path:
    """The store of codegen/tuning.py's rule: $RECURRENCE_DSL_TUNING_STORE, else the cache folders' tuning.sqlite
    that calls read (`tuning_store_path`: one that exists), else tuning.sqlite in the first cache folder that can be
    created and used (`codegen.cache.cache_directory`, the generated modules' rule: $RECURRENCE_DSL_CACHE, else
    $XDG_CACHE_HOME/recurrence_dsl or ~/.cache/recurrence_dsl, else TMPDIR/recurrence_dsl-UID, e.g. with a
    read-only HOME). Creates that folder (mode 0700)."""
    read = Path(tuning_store_path())
    if os.environ.get("RECURRENCE_DSL_TUNING_STORE") or read.is_file():
        return read
    try:
        return cache_directory(None) / "tuning.sqlite"
    except OSError:  # no folder usable: the first one's path, whose write then says why
        return read


def store_source(store=None) -> str:
    """Where a store's path came from, for error messages: "--store" (given), else the variable that set it
    ("$RECURRENCE_DSL_TUNING_STORE", "$RECURRENCE_DSL_CACHE"), else "the default tuning store"."""
    if store is not None:
        return "--store"
    for variable in ("RECURRENCE_DSL_TUNING_STORE", "RECURRENCE_DSL_CACHE"):
        if os.environ.get(variable):
            return f"${variable}"
    return "the default tuning store"


def dtype_name(dtype) -> str:
    """torch.float16 / "torch.float16" / "float16" -> "float16" (without importing torch)."""
    return str(dtype).removeprefix("torch.")


def shape_bucket(batch: int, heads: int, length: int, sizes: dict[str, int]) -> str:
    """The shape key of a call: B*H to the nearest power of two, T up to one, every size exact.

    T sets the number of chunks and the padding of the last one, so it is rounded up; B*H only sets how many
    programs run side by side, so the nearest power of two is close enough."""
    return tuning_shape_bucket(batch, heads, length, sizes)


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
    mode: str = "fwd"
    iqr_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.median_ms is not None


_COLUMNS = ("id",) + _KEY + ("config", "median_ms", "error", "created", "versions", "study", "mode", "iqr_ms")


def _trial(row) -> Trial:
    values = dict(zip(_COLUMNS, row))
    values["config"] = json.loads(values["config"])
    values["versions"] = json.loads(values["versions"])
    return Trial(**values)


class TuningStore:
    """An SQLite file of tuning trials; every method opens, uses and closes its own connection.

    path: the file, or None for the rule's store (`default_path()`). create_folders: whether writing may create
    the file's missing folders; default True only for the rule's store (a cache folder), so a typo in an
    explicit path (`--store /tmp/tunnig/x.sqlite`) is a `StoreError` naming the missing folder, not a new tree."""

    def __init__(self, path: str | os.PathLike | None = None, *, create_folders: bool | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.create_folders = path is None if create_folders is None else bool(create_folders)
        self._ready = False

    def __repr__(self) -> str:
        return f"TuningStore({str(self.path)!r})"

    # -- connections ----------------------------------------------------------------------------------

    def _missing_folder(self) -> StoreError | None:
        """The error for a store whose folder does not exist and may not be created (None otherwise)."""
        if self.create_folders or self.path.parent.is_dir():
            return None
        first = next(p for p in reversed((self.path.parent, *self.path.parent.parents)) if not p.exists())
        also = "" if first == self.path.parent else f" (nor does {self.path.parent})"
        return StoreError(f"tuning store {self.path} cannot be created: the folder {first} does not exist{also}; "
                          "folders are not created for a store given by path: check it for a typo, or create "
                          "the folder first")

    def _connect(self, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
        missing = self._missing_folder()
        if missing is not None:
            raise missing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._ready:
            self._refuse_an_empty_file()
        conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        try:
            if not self._ready:
                _retry_while_locked(lambda: self._refuse_another_database(conn), busy_timeout_s)
                _retry_while_locked(lambda: self._create_schema(conn), busy_timeout_s)
                self._ready = True
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _read(self, action, default):
        """`action(conn)` on a read-only connection (`codegen.tuning.tuning_read`: works on a read-only file,
        directory or filesystem), or `default` when there is no file."""
        if not self.path.is_file():
            return default
        return tuning_read(str(self.path), action, BUSY_TIMEOUT_S)

    def _refuse_an_empty_file(self) -> None:
        """A file of 0 bytes at the path is refused (`StoreError`): an SQLite file is never empty once written, so
        it is something else's (a `mktemp`, a typo'd path onto a placeholder), not a store to turn into one. Another
        process creating the store leaves one for a moment: it is waited for (EMPTY_WAIT_S) before refusing."""
        deadline = time.monotonic() + EMPTY_WAIT_S
        while True:
            try:
                empty = self.path.is_file() and self.path.stat().st_size == 0
            except OSError:
                return  # (gone, or unreadable: the connection says why)
            if not empty:
                return
            if time.monotonic() >= deadline:
                raise StoreError(f"tuning store {self.path} is an empty file (0 bytes), not a tuning store; it is not "
                                 "made into one: remove it (a store is created where no file is), or give another "
                                 "path")
            time.sleep(0.05)

    def _refuse_another_database(self, conn: sqlite3.Connection) -> None:
        """An SQLite database with tables but no `meta` table holding the schema version is another program's:
        refused (`StoreError`), never given the store's tables."""
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                             "'sqlite_%' ORDER BY name")]
        if not tables:
            return  # a new database: the store's own
        version = None
        if "meta" in tables:
            try:
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError:  # a `meta` table of another shape
                version = None
        if version is None:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise StoreError(f"tuning store {self.path} is an SQLite database with other tables ({shown}) and no "
                             "`meta` table with a tuning store's schema version: not a tuning store, and not made "
                             "into one; give another path")

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
        with _transaction(conn):  # (executescript would commit early: one statement at a time)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            present = {row[1] for row in conn.execute("PRAGMA table_info(trials)")}
            for column, (declaration, _) in _ADDED.items():
                if column not in present:  # a store of schema version 1
                    conn.execute(f"ALTER TABLE trials ADD COLUMN {column} {declaration}")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    def check_writable(self) -> None:
        """Raise `StoreError` (naming the path and why) unless this store can be created or written now:
        a directory, a path under a regular file, a file that is not an SQLite database, a read-only file or
        filesystem, a folder that does not exist (unless `create_folders`). Creates the store (its schema, and
        with `create_folders` its folders) when it does not exist; writes no trial."""
        where = f"tuning store {self.path}"
        if self.path.is_dir():
            raise StoreError(f"{where} is a directory; give the path of a file (e.g. {self.path / 'tuning.sqlite'})")
        blocking = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise StoreError(f"{where} cannot be created: {blocking} is a file, not a directory")
        try:  # (`_connect` refuses a missing folder that may not be created)
            with closing(self._connect(busy_timeout_s=LOCK_POLL_S)) as conn:
                conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file at once
                conn.execute("ROLLBACK")
        except sqlite3.OperationalError as err:
            text = str(err).lower()
            if "locked" in text or "busy" in text:
                return  # writable, only busy now: save_study waits for the lock
            if "readonly" in text or "read-only" in text:
                raise StoreError(f"{where} is read-only ({err}); give a writable --store PATH") from None
            raise StoreError(f"{where} cannot be opened for writing ({err})") from None
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{where} is not an SQLite tuning store ({err}); move it away or give another "
                             "--store PATH") from None
        except OSError as err:
            raise StoreError(f"{where} cannot be created: {err.strerror or err}") from None

    # -- writing ---------------------------------------------------------------------------------------

    def record(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str, config: dict,
               median_ms: float | None = None, error: str | None = None, *, study: str | None = None,
               versions: dict | None = None, created: str | None = None, mode: str = "fwd",
               iqr_ms: float | None = None) -> int:
        """Store one trial (exactly one of `median_ms`, `error`); returns its row id."""
        row = _trial_row(spec_hash, device, dtype, bucket, form, backend, config, median_ms, error, study, versions,
                         created, mode, iqr_ms)
        with closing(self._connect()) as conn, _transaction(conn):
            return _insert(conn, row)

    def save_study(self, trials: list[dict], choice: dict | None = None, *, wait_s: float = LOCK_WAIT_S,
                   on_wait=None, replace: bool = False) -> dict | None:
        """Write a study's trials (dicts of `record`'s arguments) and its choice (dict of `choose`'s) in one
        transaction. The replacement rule: a choice stored for the same key and mode is replaced only when this
        study timed at least as many distinct configs (that ran, in that mode) as that choice's study did, or with
        `replace`; otherwise it stays and only the trials are written. Returns None when there was no earlier
        choice, else {"earlier": its `choice_details`, "replaced": whether this study's choice took its place}.
        While another process holds the store locked, wait in LOCK_POLL_S slices calling
        `on_wait(waited_s, wait_s)` after each, up to `wait_s`; then save everything to a side file beside the
        store (or in the working directory) and raise `StoreLocked` naming it. Other failures: `StoreError`."""
        rows = [_trial_row(**t) for t in trials]
        started = time.monotonic()
        while True:
            try:
                with closing(self._connect(busy_timeout_s=LOCK_POLL_S)) as conn, _transaction(conn):
                    outcome = None
                    if choice is not None:
                        earlier = _choice_details(conn, choice["spec_hash"], choice["device"],
                                                  dtype_name(choice["dtype"]), choice["bucket"], choice["form"],
                                                  choice["backend"], choice["mode"])
                        timed = len({_canonical(t["config"]) for t in trials
                                     if t.get("median_ms") is not None and t.get("mode", "fwd") == choice["mode"]})
                        wins = (replace or earlier is None or earlier["timed"] is None
                                or timed >= earlier["timed"])
                        outcome = None if earlier is None else {"earlier": earlier, "replaced": wins}
                    for row in rows:
                        _insert(conn, row)
                    if choice is not None and wins:
                        _upsert_choice(conn, **choice)
                return outcome
            except sqlite3.OperationalError as err:
                text = str(err).lower()
                waited = time.monotonic() - started
                if ("locked" not in text and "busy" not in text) or waited >= wait_s:
                    side = write_side_file(self.path, trials, choice)
                    why = (f"still locked by another process after {waited:.0f} s" if "lock" in text or "busy" in text
                           else f"cannot be written ({err})")
                    kept = (f"; the {len(trials)} measured trials are saved in {side}: write them later with "
                            f"`python -m autotune.store merge {side} --store {self.path}`" if side else
                            "; the trials could not be saved to a side file either")
                    raise StoreLocked(f"tuning store {self.path} {why}{kept}", side) from None
                if on_wait is not None:
                    on_wait(waited, wait_s)
            except sqlite3.DatabaseError as err:
                side = write_side_file(self.path, trials, choice)
                raise StoreLocked(f"tuning store {self.path} is not usable ({err}); the trials are saved in "
                                  f"{side}", side) from None

    def choose(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str, mode: str,
               config: dict, tuned: bool, reason: str, study: str | None = None) -> None:
        """Store the config calls of this key and mode run (`tuned` False: the default was kept)."""
        with closing(self._connect()) as conn, _transaction(conn):
            _upsert_choice(conn, spec_hash, device, dtype, bucket, form, backend, mode, config, tuned, reason, study)

    # -- reading ---------------------------------------------------------------------------------------

    def _select(self, where: str, values: tuple, tail: str = "") -> list:
        def select(conn):
            present = {row[1] for row in conn.execute("PRAGMA table_info(trials)")}
            if not present:
                return []
            columns = ", ".join(c if c in present or c not in _ADDED else f"{_ADDED[c][1]} AS {c}" for c in _COLUMNS)
            return conn.execute(f"SELECT {columns} FROM trials WHERE {where} {tail}", values).fetchall()

        return self._read(select, [])

    def best_trial(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str,
                   mode: str | None = None) -> Trial | None:
        """The fastest successful trial for the key (the latest among equal medians; of one mode when given),
        or None. A raw fastest median: calls run `choice()`, which the tuner declares beyond the noise."""
        where = ("spec_hash = ? AND device = ? AND dtype = ? AND bucket = ? AND form = ? AND backend = ? "
                 "AND median_ms IS NOT NULL")
        values = (spec_hash, device, dtype_name(dtype), bucket, form, backend)
        rows = self._select(where, values, "ORDER BY median_ms ASC, id DESC")
        rows = [r for r in map(_trial, rows) if mode is None or r.mode == mode]
        return rows[0] if rows else None

    def choice(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str,
               mode: str) -> dict | None:
        """The stored choice for the key and mode: {"config", "tuned", "reason", "study", "created"}, or None."""
        return self._read(lambda conn: _stored_choice(conn, spec_hash, device, dtype_name(dtype), bucket, form,
                                                      backend, mode), None)

    def choice_details(self, spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str,
                       mode: str) -> dict | None:
        """The stored choice for the key and mode (`choice`) with what its study measured: "timed", the number of
        distinct configs of its study that ran in that mode (None when the study's trials are not in the store),
        and "median_ms", the chosen config's median in that study (None when not found). None: no choice."""
        return self._read(lambda conn: _choice_details(conn, spec_hash, device, dtype_name(dtype), bucket, form,
                                                       backend, mode), None)

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
        return [_trial(r) for r in self._select(clause, tuple(where.values()), "ORDER BY id")]

    def count(self) -> int:
        """The number of stored trials (0 when there is no file)."""
        def count(conn):
            if not conn.execute("SELECT name FROM sqlite_master WHERE name = 'trials'").fetchone():
                return 0
            return int(conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0])

        return self._read(count, 0)

    def integrity_check(self) -> str:
        """SQLite's own check of the file: "ok" when sound."""
        return self._read(lambda conn: str(conn.execute("PRAGMA integrity_check").fetchone()[0]), "ok (no file)")


def _trial_row(spec_hash: str, device: str, dtype, bucket: str, form: str, backend: str, config: dict,
               median_ms: float | None = None, error: str | None = None, study: str | None = None,
               versions: dict | None = None, created: str | None = None, mode: str = "fwd",
               iqr_ms: float | None = None) -> tuple:
    if (median_ms is None) == (error is None):
        raise ValueError("a trial has either a median_ms (it ran) or an error (it failed), not both or neither")
    if median_ms is not None and not (math.isfinite(median_ms) and median_ms >= 0):
        raise ValueError(f"median_ms must be a finite time >= 0, got {median_ms!r}")
    if mode not in TUNING_MODES:
        raise ValueError(f"mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}")
    return (spec_hash, device, dtype_name(dtype), bucket, form, backend, _canonical(config),
            None if median_ms is None else float(median_ms), error, created or _now(),
            json.dumps(versions if versions is not None else library_versions(), sort_keys=True), study, mode,
            None if iqr_ms is None else float(iqr_ms))


def _insert(conn: sqlite3.Connection, row: tuple) -> int:
    cur = conn.execute(f"INSERT INTO trials ({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * len(row))})", row)
    return int(cur.lastrowid)


def _stored_choice(conn: sqlite3.Connection, spec_hash: str, device: str, dtype: str, bucket: str, form: str,
                   backend: str, mode: str) -> dict | None:
    """`TuningStore.choice` on an open connection (dtype by name)."""
    if not conn.execute("SELECT name FROM sqlite_master WHERE name = 'choices'").fetchone():
        return None  # a store of schema version 1, or one not created yet
    row = conn.execute("SELECT config, tuned, reason, study, created FROM choices WHERE spec_hash = ? AND device = ? "
                       "AND dtype = ? AND bucket = ? AND form = ? AND backend = ? AND mode = ?",
                       (spec_hash, device, dtype, bucket, form, backend, mode)).fetchone()
    if row is None:
        return None
    return {"config": json.loads(row[0]), "tuned": bool(row[1]), "reason": row[2], "study": row[3],
            "created": row[4]}


def _choice_details(conn: sqlite3.Connection, spec_hash: str, device: str, dtype: str, bucket: str, form: str,
                    backend: str, mode: str) -> dict | None:
    """`TuningStore.choice_details` on an open connection."""
    found = _stored_choice(conn, spec_hash, device, dtype, bucket, form, backend, mode)
    if found is None:
        return None
    found.update(timed=None, median_ms=None)
    if found["study"]:
        present = {r[1] for r in conn.execute("PRAGMA table_info(trials)")}
        mode_column = "mode" if "mode" in present else "'fwd'"
        ran = conn.execute(f"SELECT config, median_ms, {mode_column} FROM trials WHERE study = ? ORDER BY id",
                           (found["study"],)).fetchall()
        ran = [(json.loads(c), m) for c, m, md in ran if md == mode]
        if ran:
            ok = [(c, m) for c, m in ran if m is not None]
            found["timed"] = len({_canonical(c) for c, _ in ok})
            medians = [m for c, m in ok if c == found["config"]]
            found["median_ms"] = medians[-1] if medians else None
    return found


def _upsert_choice(conn: sqlite3.Connection, spec_hash: str, device: str, dtype, bucket: str, form: str,
                   backend: str, mode: str, config: dict, tuned: bool, reason: str, study: str | None = None) -> None:
    if mode not in TUNING_MODES:
        raise ValueError(f"mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}")
    conn.execute("INSERT OR REPLACE INTO choices (spec_hash, device, dtype, bucket, form, backend, mode, config, "
                 "tuned, reason, study, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (spec_hash, device, dtype_name(dtype), bucket, form, backend, mode, _canonical(config),
                  int(bool(tuned)), reason, study, _now()))


def write_side_file(store_path: Path, trials: list[dict], choice: dict | None) -> Path | None:
    """Save a study that could not be written to `store_path` as JSON beside it (else in the working directory,
    else the temporary directory); returns the file, or None when nowhere took it."""
    import tempfile

    study = next((t.get("study") for t in trials if t.get("study")), None) or (choice or {}).get("study") or "study"
    name = f"{Path(store_path).name}.pending-{study}.json"
    text = json.dumps({"store": str(store_path), "trials": trials, "choice": choice}, indent=1, sort_keys=True,
                      default=str)
    for folder in (Path(store_path).parent, Path.cwd(), Path(tempfile.gettempdir())):
        target = folder / name
        try:
            with open(target, "x") as f:
                f.write(text + "\n")
            return target
        except OSError:
            continue
    return None


def merge_side_file(side_file: str | os.PathLike, store=None) -> int:
    """Write the trials and choice a `StoreLocked` side file holds into `store` (default: the store it names);
    returns the number of trials written. The side file is removed once they are in."""
    data = json.loads(Path(side_file).read_text())
    target = open_store(store if store is not None else data["store"])
    target.save_study(data["trials"], data.get("choice"))
    Path(side_file).unlink()
    return len(data["trials"])


def _retry_while_locked(action, timeout_s: float = BUSY_TIMEOUT_S):
    """Run `action`, retrying while SQLite reports the file locked, for up to the busy timeout.

    SQLite does not call its busy handler where waiting could deadlock, and switching a fresh file to
    WAL while another process creates it is such a case: the losing side gets "database is locked" at
    once. Backing off and trying again is the documented remedy.
    """
    deadline = time.monotonic() + timeout_s
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
    """A `TuningStore` from a store, a path (its folder must exist), or None (the rule's path, whose folders
    are created when it is written)."""
    if isinstance(store, TuningStore):
        return store
    return TuningStore(store)


def main(argv: list[str] | None = None) -> int:
    """`python -m autotune.store merge SIDE.json [--store PATH]`: write a side file's trials into the store."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m autotune.store")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write the trials of a side file (left by a locked store) into the store")
    merge.add_argument("side_file")
    merge.add_argument("--store", help="the store to write (default: the one the side file names)")
    args = parser.parse_args(argv)
    try:
        count = merge_side_file(args.side_file, args.store)
    except (OSError, ValueError, KeyError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} trials")
    return 0


__all__ = ["StoreError", "StoreLocked", "Trial", "TuningStore", "default_path", "dtype_name", "library_versions",
           "merge_side_file", "open_store", "parse_bucket", "shape_bucket", "store_source", "write_side_file"]


if __name__ == "__main__":
    sys.exit(main())
