"""Token-bucket state shared by the processes of one machine through a SQLite file.

One row per endpoint family, read and written in `BEGIN IMMEDIATE` transactions (WAL journal), so
the bucket arithmetic that `SharedRateLimiter` applies to it sees every other process's updates. The
daily quota (`DailyQuota`) counts a family's requests of the current quota day in `daily_quota`.
Time stamps are `time.time()`: every process reads the same clock.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOCK_TIMEOUT_S", "BucketState", "SqliteBucketStore", "is_locked", "retry_locked"]

# Bound on how long a SQLite call may block the event loop waiting for another process's write lock;
# beyond it we give the loop back (asyncio.sleep) and try again.
LOCK_TIMEOUT_S = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_buckets (
    family TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated_at REAL NOT NULL,
    paused_until REAL NOT NULL DEFAULT 0,
    usage REAL NOT NULL DEFAULT 0,
    usage_at REAL NOT NULL DEFAULT 0
)
"""
_DAILY_SCHEMA = """
CREATE TABLE IF NOT EXISTS daily_quota (
    family TEXT PRIMARY KEY,
    day INTEGER NOT NULL,
    used INTEGER NOT NULL
)
"""


@dataclass
class BucketState:
    """One family's bucket: a row of `rate_buckets`, or the bucket of a limiter without a store."""

    tokens: float
    updated_at: float
    paused_until: float = 0.0
    usage: float = 0.0
    usage_at: float = 0.0


class SqliteBucketStore:
    """The bucket of `family` in the SQLite file `path`; a new row starts full (`burst` tokens)."""

    def __init__(self, path: Path, family: str, burst: int) -> None:
        self.path, self.family, self.burst = path, family, burst
        self._thread_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid: int | None = None
        self._connection()  # fail at construction, with the path in the message, if unusable

    def update(self, change: Callable[[BucketState], None], write: bool = True) -> None:
        """Apply `change` to the stored bucket in one transaction (written back when `write`)."""
        with self._thread_lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                bucket = self._load(conn)
                change(bucket)
                if write:
                    conn.execute(
                        "UPDATE rate_buckets SET tokens=?, updated_at=?, paused_until=?, usage=?, usage_at=? "
                        "WHERE family=?",
                        (
                            bucket.tokens,
                            bucket.updated_at,
                            bucket.paused_until,
                            bucket.usage,
                            bucket.usage_at,
                            self.family,
                        ),
                    )
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

    def take_daily(self, day: int, limit: int, take: bool = True) -> tuple[bool, int]:
        """Count one request on quota day `day` (the day's index) when `take` and fewer than `limit`
        are counted: (whether it was counted, the day's count). One transaction, so processes sharing
        the file never overshoot together."""
        with self._thread_lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT day, used FROM daily_quota WHERE family=?", (self.family,)
                ).fetchone()
                used = row[1] if row is not None and row[0] == day else 0
                taken = take and used < limit
                if taken:
                    used += 1
                    conn.execute(
                        "INSERT INTO daily_quota (family, day, used) VALUES (?, ?, ?) "
                        "ON CONFLICT(family) DO UPDATE SET day=excluded.day, used=excluded.used",
                        (self.family, day, used),
                    )
                conn.execute("COMMIT")
                return taken, used
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise

    def _load(self, conn: sqlite3.Connection) -> BucketState:
        row = conn.execute(
            "SELECT tokens, updated_at, paused_until, usage, usage_at FROM rate_buckets WHERE family=?",
            (self.family,),
        ).fetchone()
        if row is None:
            bucket = BucketState(tokens=float(self.burst), updated_at=time.time())
            conn.execute(
                "INSERT INTO rate_buckets (family, tokens, updated_at, paused_until, usage, usage_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.family, bucket.tokens, bucket.updated_at, 0.0, 0.0, 0.0),
            )
            return bucket
        return BucketState(*row)

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork: reopen it in a child process.
        if self._conn is not None and self._conn_pid == os.getpid():
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            retry_locked(lambda: conn.execute(_SCHEMA))
            retry_locked(lambda: conn.execute(_DAILY_SCHEMA))
        except sqlite3.Error as exc:
            raise RuntimeError(
                f"rate limit store {self.path} is not usable ({exc}): point MAPILLARY_RATE_LIMIT_STORE "
                "at a writable file on a local disk"
            ) from None
        self._conn, self._conn_pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._thread_lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_conn=None, _conn_pid=None, _thread_lock=None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def retry_locked(action, attempts: int = 200):
    for _ in range(attempts - 1):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
            time.sleep(LOCK_TIMEOUT_S * random.uniform(0.2, 1.0))
    return action()
