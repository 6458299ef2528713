"""DuckDB storage of submissions, suites, runs and results.

A run and its result rows are written in one transaction: a run is complete or
absent. Connections are short-lived and retried while another fbh process holds the
file's lock, so two `fbh submit` processes can share one database.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS submissions (
    name VARCHAR PRIMARY KEY,
    method VARCHAR NOT NULL,
    description VARCHAR,
    authors VARCHAR,
    url VARCHAR,
    spec JSON NOT NULL,
    source_path VARCHAR,
    spec_hash VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS suites (
    name VARCHAR PRIMARY KEY,
    title VARCHAR,
    description VARCHAR,
    spec JSON NOT NULL,
    spec_hash VARCHAR NOT NULL,
    task_names JSON NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    fingerprint VARCHAR,              -- what the latest submit computed on (harness.identity)
    expected_fingerprint VARCHAR,     -- what the suite file pins, when it pins every input
    inputs JSON                       -- reference -> content identity, for that fingerprint
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    run_key VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- submission | reference | published
    label VARCHAR NOT NULL,           -- submission name, or pretrained / STL / MTL / published label
    submission VARCHAR,
    suite VARCHAR NOT NULL,
    setting VARCHAR NOT NULL,         -- 'all' or a generalization split name
    method VARCHAR,
    status VARCHAR NOT NULL,          -- ok | failed
    error VARCHAR,
    params JSON,                      -- the hyperparameters used (chosen grid values included)
    grid JSON,                        -- validation scores of every grid point, if a grid was searched
    data_access VARCHAR,
    output_kind VARCHAR,
    n_parameters BIGINT,
    seed INTEGER,
    device VARCHAR,
    code_version VARCHAR,
    git_commit VARCHAR,
    packages JSON,
    source VARCHAR,                   -- for published rows: where the numbers come from
    tolerance DOUBLE,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    fusion_seconds DOUBLE,
    eval_seconds DOUBLE,
    peak_memory_bytes BIGINT,
    fingerprint VARCHAR,              -- the suite fingerprint the run was computed on
    inputs JSON,                      -- reference -> content identity (zoo digest, hub commit, file digest)
    job JSON,                         -- the planned job, so `fbh reproduce` can run it again
    superseded BOOLEAN DEFAULT false, -- a later run of the same entry replaced it on the leaderboard
    data_access_verified BOOLEAN,     -- false: the fused result came back as code, so the data it read is unproven
    example_limit INTEGER             -- a smoke run (fbh submit --limit): scored on this many examples per task
);
CREATE TABLE IF NOT EXISTS results (
    run_id VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    task_split VARCHAR NOT NULL,      -- seen | unseen
    condition VARCHAR NOT NULL,       -- clean | corruption name
    severity INTEGER,
    metric VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    n INTEGER,
    ci_low DOUBLE,
    ci_high DOUBLE,
    replicates FLOAT[]                -- the value on each bootstrap resample (harness.evaluate): paired across entries
);
CREATE INDEX IF NOT EXISTS runs_key ON runs (run_key);
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
"""

RUN_COLUMNS = ["run_id", "run_key", "kind", "label", "submission", "suite", "setting", "method", "status",
               "error", "params", "grid", "data_access", "output_kind", "n_parameters", "seed", "device",
               "code_version", "git_commit", "packages", "source", "tolerance", "started_at", "finished_at",
               "fusion_seconds", "eval_seconds", "peak_memory_bytes", "fingerprint", "inputs", "job",
               "superseded", "data_access_verified", "example_limit"]
RESULT_COLUMNS = ["task", "task_split", "condition", "severity", "metric", "value", "n", "ci_low", "ci_high",
                  "replicates"]
# What a reader of result rows wants, without the replicates' thousand floats a row.
ROW_COLUMNS = ", ".join(["run_id", *RESULT_COLUMNS[:-1]])
JSON_COLUMNS = {"params", "grid", "packages", "inputs", "job"}
# Columns each schema version added, so an older database is brought up to date in place.
MIGRATIONS = {2: ["ALTER TABLE suites ADD COLUMN fingerprint VARCHAR",
                  "ALTER TABLE suites ADD COLUMN expected_fingerprint VARCHAR",
                  "ALTER TABLE suites ADD COLUMN inputs JSON",
                  "ALTER TABLE runs ADD COLUMN fingerprint VARCHAR",
                  "ALTER TABLE runs ADD COLUMN inputs JSON",
                  "ALTER TABLE runs ADD COLUMN job JSON",
                  "ALTER TABLE runs ADD COLUMN superseded BOOLEAN DEFAULT false"],
              3: ["ALTER TABLE runs ADD COLUMN data_access_verified BOOLEAN",
                  "ALTER TABLE runs ADD COLUMN example_limit INTEGER",
                  "ALTER TABLE results ADD COLUMN replicates FLOAT[]"]}


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class Run:
    run_key: str
    kind: str
    label: str
    suite: str
    setting: str = "all"
    submission: str | None = None
    method: str | None = None
    status: str = "ok"
    error: str | None = None
    params: dict | None = None
    grid: list | None = None
    data_access: str | None = None
    output_kind: str | None = None
    n_parameters: int | None = None
    seed: int | None = None
    device: str | None = None
    code_version: str | None = None
    git_commit: str | None = None
    packages: dict | None = None
    source: str | None = None
    tolerance: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    fusion_seconds: float | None = None
    eval_seconds: float | None = None
    peak_memory_bytes: int | None = None
    fingerprint: str | None = None
    inputs: dict | None = None
    job: dict | None = None
    superseded: bool = False
    data_access_verified: bool | None = None  # None: no method ran (references, published rows)
    example_limit: int | None = None
    run_id: str = field(default_factory=lambda: f"r{int(time.time() * 1e6):x}{random.getrandbits(32):08x}")

    def values(self) -> list[Any]:
        out = []
        for col in RUN_COLUMNS:
            v = getattr(self, col)
            out.append(json.dumps(v, sort_keys=True) if col in JSON_COLUMNS and v is not None else v)
        return out


# DuckDB's words when another process holds the file (Linux / macOS, and Windows); nothing else is retried.
LOCK_MESSAGES = ("Could not set lock on file", "being used by another process")
# No extension is ever downloaded or loaded behind our back (a SQLite file makes DuckDB reach for one).
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
DB_FIX = "pass --db with a path to an fbh results database (a new path creates one); nothing was written"


def _is_lock_error(exc: Exception) -> bool:
    return any(m in str(exc) for m in LOCK_MESSAGES)


def database_error(path: Path, exc: BaseException) -> Exception:
    """One message naming the file and the fix for what DuckDB or the OS said about a database file."""
    from harness.errors import FbhError
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == 28 or "No space left" in str(exc):
        return FbhError(f"the disk is full: {first}", file=str(path), fix="free space and run again; runs already "
                        "stored are complete, and the one being written was not")
    if path.is_dir():
        return FbhError("the results database path is a folder", file=str(path), fix=DB_FIX)
    if isinstance(exc, PermissionError) or "Permission denied" in str(exc) or "read-only" in str(exc).lower():
        return FbhError(f"cannot write the results database: {first}", file=str(path),
                        fix="make the file and its folder writable, or pass another --db")
    return FbhError(f"not a readable fbh results database: {first}", file=str(path), fix=DB_FIX)


def commit_error(path: Path, exc: duckdb.Error) -> Exception:
    """A COMMIT DuckDB refused: the disk or the file's permissions when its message says so, else the write
    itself; either way nothing of the transaction was stored."""
    from harness.errors import FbhError
    text = str(exc)
    if "No space left" in text or "Permission denied" in text or "read-only" in text.lower():
        return database_error(path, exc)
    return FbhError(f"the results database refused the write: {text.splitlines()[0]}", file=str(path),
                    fix="nothing of it was stored: run the command again, and report it if it repeats")


class Store:
    """One DuckDB file. Every public method opens, uses and closes its own connection."""

    def __init__(self, path: Path | str, *, lock_timeout: float = 600.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._held: duckdb.DuckDBPyConnection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            special = self.path.exists() and not self.path.is_file() and not self.path.is_dir()
        except OSError as exc:
            raise database_error(self.path, exc) from None
        if special:  # a FIFO or a device: DuckDB would wait on it for ever
            from harness.errors import FbhError
            raise FbhError("the results database path is not a regular file (a pipe or a device)",
                           file=str(self.path), fix=DB_FIX)
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return  # an up-to-date database is not written to by merely opening it
        if version is not None and version > SCHEMA_VERSION:
            from harness.errors import FbhError
            raise FbhError(f"the database has schema version {version}, newer than this fbh's {SCHEMA_VERSION}",
                           file=str(self.path), fix="upgrade fbh (git pull; pip install -e .), or use another --db")
        with self.transaction() as con:
            if version is None:
                con.execute(SCHEMA)
            else:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[v]:
                        con.execute(statement)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    def _schema_version(self) -> int | None:
        if not self.path.exists():
            return None
        with self.connect(read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "meta" not in tables:
                if tables:  # another program's DuckDB file: never written into
                    from harness.errors import FbhError
                    raise FbhError(f"a DuckDB file, but not an fbh results database (tables: {sorted(tables)[:5]})",
                                   file=str(self.path), fix=DB_FIX)
                return None
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row is not None else None

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection, retried while another fbh process holds the file's lock (saying so once);
        any other DuckDB or OS error is one message naming the file and the fix."""
        started = time.monotonic()
        deadline = started + self.lock_timeout
        delay, waiting = 0.05, False
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists(), config=NO_EXTENSIONS)
                break
            except (duckdb.Error, OSError) as exc:
                if not _is_lock_error(exc):
                    raise database_error(self.path, exc) from None
                if time.monotonic() > deadline:
                    from harness.errors import FbhError
                    raise FbhError(f"another process held the database's lock for {self.lock_timeout:g} s",
                                   file=str(self.path), fix="wait for it to finish, or pass another --db") from None
                if not waiting and time.monotonic() - started > 1.0:  # a brief wait is not worth a word
                    waiting = True
                    sys.stderr.write(f"waiting for {self.path}: another process holds its lock\n")
                time.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 1.0)
        try:
            yield con
        except (duckdb.IOException, duckdb.PermissionException) as exc:  # DuckDB's own I/O: the file's fault
            raise database_error(self.path, exc) from None
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction, committed or rolled back whole. ROLLBACK runs only while the transaction is
        active (the body failed); DuckDB itself ends a transaction whose COMMIT failed (a full disk), and
        that failure is reported as the database's, with the file and the fix."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # the body's error is the one to report
                raise
            try:
                con.execute("COMMIT")
            except duckdb.Error as exc:
                raise commit_error(self.path, exc) from None

    # -- writes ------------------------------------------------------------------
    def submission_source(self, name: str) -> str | None:
        """The file a submission name was last submitted from."""
        rows = self.query("SELECT source_path FROM submissions WHERE name = ?", [name])
        return rows[0]["source_path"] if rows else None

    def upsert_submission(self, spec: dict[str, Any], spec_hash: str, source_path: str | None) -> None:
        """Store a submission's spec; an unchanged one is not written (a cached re-submit writes nothing)."""
        if self.query("SELECT 1 FROM submissions WHERE name = ? AND spec_hash = ? AND source_path IS NOT DISTINCT "
                      "FROM ?", [spec["name"], spec_hash, source_path]):
            return
        with self.transaction() as con:
            con.execute("DELETE FROM submissions WHERE name = ?", [spec["name"]])
            con.execute("INSERT INTO submissions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [spec["name"], spec["method"], spec.get("description", ""), spec.get("authors", ""),
                         spec.get("url"), json.dumps(spec, sort_keys=True), source_path, spec_hash, now()])

    def upsert_suite(self, spec: dict[str, Any], spec_hash: str, fingerprint: str | None = None,
                     expected_fingerprint: str | None = None, inputs: dict | None = None) -> None:
        """Store a suite's spec and what it is computed on; an unchanged one is not written."""
        if self.query("SELECT 1 FROM suites WHERE name = ? AND spec_hash = ? AND fingerprint IS NOT DISTINCT FROM ? "
                      "AND expected_fingerprint IS NOT DISTINCT FROM ?",
                      [spec["name"], spec_hash, fingerprint, expected_fingerprint]):
            return
        with self.transaction() as con:
            con.execute("DELETE FROM suites WHERE name = ?", [spec["name"]])
            con.execute("INSERT INTO suites (name, title, description, spec, spec_hash, task_names, updated_at, "
                        "fingerprint, expected_fingerprint, inputs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [spec["name"], spec.get("title"), spec.get("description", ""),
                         json.dumps(spec, sort_keys=True), spec_hash,
                         json.dumps([t["name"] for t in spec["tasks"]]), now(), fingerprint, expected_fingerprint,
                         json.dumps(inputs, sort_keys=True) if inputs is not None else None])

    def write_run(self, run: Run, rows: list[dict[str, Any]], replace_key: bool = True) -> None:
        """Insert a run and its results atomically. An earlier run with the same key is replaced, except
        that a failed run never deletes a completed one: it is kept, marked superseded. A submission's or
        reference's run supersedes the earlier runs of the same entry (suite, setting, fingerprint, example limit) under
        other keys, e.g. of the submission before it changed: they stay stored, off the leaderboard."""
        with self.transaction() as con:
            if replace_key:
                status = "" if run.status == "ok" else "AND status != 'ok'"
                old = [r[0] for r in con.execute(f"SELECT run_id FROM runs WHERE run_key = ? {status}",
                                                 [run.run_key]).fetchall()]
                for rid in old:
                    con.execute("DELETE FROM results WHERE run_id = ?", [rid])
                    con.execute("DELETE FROM runs WHERE run_id = ?", [rid])
                con.execute("UPDATE runs SET superseded = true WHERE run_key = ?", [run.run_key])
            if run.kind in ("submission", "reference"):
                con.execute("UPDATE runs SET superseded = true WHERE kind = ? AND label = ? AND suite = ? "
                            "AND setting = ? AND fingerprint IS NOT DISTINCT FROM ? "
                            "AND example_limit IS NOT DISTINCT FROM ? AND seed IS NOT DISTINCT FROM ?",
                            [run.kind, run.label, run.suite, run.setting, run.fingerprint, run.example_limit,
                             run.seed])
            con.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                        run.values())
            if rows:
                con.executemany(
                    f"INSERT INTO results (run_id, {', '.join(RESULT_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * (len(RESULT_COLUMNS) + 1))})",
                    [[run.run_id] + [r.get(c) for c in RESULT_COLUMNS] for r in rows])

    def supersede_other_seeds(self, submission: str, suite: str, fingerprint: str | None, limit: int | None,
                              seeds: list[int]) -> None:
        """A submission's runs of seeds it no longer lists leave the leaderboard (kept, marked superseded);
        nothing is written when there are none, so a cached re-submit stays read-only."""
        where = ("kind = 'submission' AND label = ? AND suite = ? AND fingerprint IS NOT DISTINCT FROM ? "
                 "AND example_limit IS NOT DISTINCT FROM ? AND NOT coalesce(superseded, false) "
                 "AND seed NOT IN (SELECT unnest(?::INTEGER[]))")
        params = [submission, suite, fingerprint, limit, seeds]
        if self.query(f"SELECT 1 FROM runs WHERE {where} LIMIT 1", params):
            with self.transaction() as con:
                con.execute(f"UPDATE runs SET superseded = true WHERE {where}", params)

    # -- reads -------------------------------------------------------------------
    def completed_run(self, run_key: str) -> dict[str, Any] | None:
        with self.connect(read_only=True) as con:
            cur = con.execute("SELECT * FROM runs WHERE run_key = ? AND status = 'ok' AND NOT superseded "
                              "ORDER BY finished_at DESC LIMIT 1", [run_key])
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([d[0] for d in cur.description], row))

    def completed_keys(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT DISTINCT run_key FROM runs WHERE status = 'ok' AND NOT superseded AND run_key IN "
                               "(SELECT unnest(?::VARCHAR[]))", [keys]).fetchall()
        return {r[0] for r in rows}

    @contextlib.contextmanager
    def reading(self) -> Iterator["Store"]:
        """Serve every query() inside from one read-only connection: opening the file costs
        tens of ms, and a site build makes hundreds of queries."""
        with self.connect(read_only=True) as con:
            self._held = con
            try:
                yield self
            finally:
                self._held = None

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with contextlib.nullcontext(self._held) if self._held is not None else self.connect(read_only=True) as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        with self.connect(read_only=True) as con:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("submissions", "suites", "runs", "results")}
