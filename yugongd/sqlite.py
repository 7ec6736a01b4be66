"""``state: "sqlite:<path>"``: the default durable store.

Everything is written off the reactor thread, by one dedicated thread, in batches: the
hot path only appends to an in-memory queue, and a timer hands the queue to the writer
every second (``flush_interval``). With WAL and ``synchronous=NORMAL`` a committed batch
survives a crash of the process, so a SIGKILL loses at most the last second of rows;
SIGTERM flushes everything before exit.

Account totals are kept in their own table, updated in the same transaction as the rows,
so restoring them at start does not scan the ledger.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import sqlite3
from typing import Any

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from yugongd.model import Account
from yugongd.state import AccountTotals, LedgerRow, Snapshot, StoredKey, UsageLine

log = Logger()

#: 1: the first schema; 2: ``accounts.config_hash`` (runtime overrides of config accounts)
SCHEMA_VERSION = 2

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS accounts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, models TEXT NOT NULL,
        rpm INTEGER NOT NULL, tpm INTEGER NOT NULL, credit_usd REAL, expires TEXT,
        ip_allow TEXT NOT NULL, enabled INTEGER NOT NULL, source TEXT NOT NULL,
        config_hash TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS keys (
        id TEXT PRIMARY KEY, upstream TEXT NOT NULL, key TEXT NOT NULL, organization TEXT,
        weight REAL NOT NULL, rpm INTEGER, tpm INTEGER, models TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger (
        id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL,
        account_id TEXT NOT NULL, model TEXT, key_id TEXT, status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL, estimated INTEGER NOT NULL, latency REAL NOT NULL,
        attempts INTEGER NOT NULL, endpoint TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ledger_account_time ON ledger (account_id, time)",
    "CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time)",
    """CREATE TABLE IF NOT EXISTS account_totals (
        account_id TEXT PRIMARY KEY, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL)""",
]

#: migrations from version N-1 to N, run in order on an older database
_MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE accounts ADD COLUMN config_hash TEXT NOT NULL DEFAULT ''"],
}

_ACCOUNT_COLUMNS = (
    "id, name, key_hash, models, rpm, tpm, credit_usd, expires, ip_allow, enabled, source, "
    "config_hash"
)

_ROW_COLUMNS = (
    "time, request_id, account_id, model, key_id, status, prompt_tokens, completion_tokens, "
    "cost_usd, estimated, latency, attempts, endpoint"
)


def _account_row(a: Account) -> tuple[Any, ...]:
    return (
        a.id,
        a.name,
        a.key_hash,
        json.dumps(list(a.models)),
        a.rpm,
        a.tpm,
        a.credit_usd,
        a.expires.isoformat() if a.expires else None,
        json.dumps([str(n) for n in a.ip_allow]),
        int(a.enabled),
        a.source,
        a.config_hash,
    )


def _account_from_row(r: tuple[Any, ...]) -> Account:
    return Account(
        id=r[0],
        name=r[1],
        key_hash=r[2],
        models=tuple(json.loads(r[3])),
        rpm=r[4],
        tpm=r[5],
        credit_usd=r[6],
        expires=datetime.datetime.fromisoformat(r[7]) if r[7] else None,
        ip_allow=tuple(ipaddress.ip_network(n, strict=False) for n in json.loads(r[8])),
        enabled=bool(r[9]),
        source=r[10],
        config_hash=r[11] or "",
    )


class SQLiteState:
    """A :class:`~yugongd.state.StateStore` in one SQLite file."""

    def __init__(self, path: str, reactor: Any, flush_interval: float = 1.0) -> None:
        self.path = path
        self.reactor = reactor
        self.flush_interval = flush_interval
        self._ops: list[tuple[str, Any]] = []
        self._rows = 0
        self._conn: sqlite3.Connection | None = None
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="yugongd-sqlite")
        self._loop: task.LoopingCall | None = None
        self._lock = defer.DeferredLock()

    # -- opening (at start, before listening) --------------------------------------------

    def open(self) -> defer.Deferred[Snapshot]:
        try:
            snapshot = self._open()
        except sqlite3.Error as e:
            return defer.fail(RuntimeError(f"{self.path}: cannot open the state database: {e}"))
        self._threads.start()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.flush_interval, now=False)
        return defer.succeed(snapshot)

    def _open(self) -> Snapshot:
        new = not os.path.exists(self.path)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if new:
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN")
        conn.execute(_SCHEMA[0])
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        else:
            version = int(row[0])
            if version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this yugongd understands "
                    f"({SCHEMA_VERSION})"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(step, []):
                    conn.execute(statement)
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
        conn.execute("COMMIT")
        self._conn = conn
        accounts = tuple(
            _account_from_row(r)
            for r in conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY rowid")
        )
        keys = tuple(
            StoredKey(
                id=r[0],
                upstream=r[1],
                key=r[2],
                organization=r[3],
                weight=r[4],
                rpm=r[5],
                tpm=r[6],
                models=tuple(json.loads(r[7])),
            )
            for r in conn.execute(
                "SELECT id, upstream, key, organization, weight, rpm, tpm, models FROM keys ORDER BY rowid"
            )
        )
        totals = {
            r[0]: AccountTotals(r[1], r[2], r[3], r[4])
            for r in conn.execute(
                "SELECT account_id, requests, prompt_tokens, completion_tokens, cost_usd FROM account_totals"
            )
        }
        return Snapshot(accounts, keys, totals)

    # -- writes: queued, made durable by the writer thread -----------------------------

    def save_account(self, account: Account) -> None:
        self._ops.append(("account", account))

    def delete_account(self, account_id: str) -> None:
        self._ops.append(("delete_account", account_id))

    def save_key(self, key: StoredKey) -> None:
        self._ops.append(("key", key))

    def delete_key(self, key_id: str) -> None:
        self._ops.append(("delete_key", key_id))

    def append(self, row: LedgerRow) -> None:
        self._ops.append(("row", row))
        self._rows += 1

    def pending(self) -> int:
        return self._rows

    def _tick(self) -> None:
        if self._ops and not self._lock.locked:
            self.flush().addErrback(lambda f: log.failure("ledger write failed; will retry", f))

    def flush(self) -> defer.Deferred[None]:
        """Write everything queued so far; fires when it is committed. Batches are
        written one at a time, in order."""
        return self._lock.run(self._flush_once)

    def _flush_once(self) -> defer.Deferred[None]:
        if not self._ops:
            return defer.succeed(None)
        ops, self._ops = self._ops, []
        rows, self._rows = self._rows, 0

        def failed(reason: Any) -> Any:
            # put the batch back in front, so that nothing is lost; the next tick retries
            self._ops[:0] = ops
            self._rows += rows
            return reason

        writing = deferToThreadPool(self.reactor, self._threads, self._write, ops)
        writing.addErrback(failed)
        return writing

    def _write(self, ops: list[tuple[str, Any]]) -> None:
        conn = self._conn
        assert conn is not None
        rows: list[tuple[Any, ...]] = []
        totals: dict[str, list[float]] = {}
        conn.execute("BEGIN")
        try:
            for kind, item in ops:
                if kind == "row":
                    r: LedgerRow = item
                    rows.append(
                        (
                            r.time,
                            r.request_id,
                            r.account_id,
                            r.model,
                            r.key_id,
                            r.status,
                            r.prompt_tokens,
                            r.completion_tokens,
                            r.cost_usd,
                            int(r.estimated),
                            r.latency,
                            r.attempts,
                            r.endpoint,
                        )
                    )
                    t = totals.setdefault(r.account_id, [0, 0, 0, 0.0])
                    t[0] += 1
                    t[1] += r.prompt_tokens
                    t[2] += r.completion_tokens
                    t[3] += r.cost_usd
                    continue
                if rows:
                    self._insert_rows(conn, rows)
                    rows = []
                if kind == "account":
                    conn.execute(
                        f"INSERT OR REPLACE INTO accounts ({_ACCOUNT_COLUMNS}) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        _account_row(item),
                    )
                elif kind == "delete_account":
                    conn.execute("DELETE FROM accounts WHERE id = ?", (item,))
                elif kind == "key":
                    k: StoredKey = item
                    conn.execute(
                        "INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?,?,?,?)",
                        (
                            k.id,
                            k.upstream,
                            k.key,
                            k.organization,
                            k.weight,
                            k.rpm,
                            k.tpm,
                            json.dumps(list(k.models)),
                        ),
                    )
                elif kind == "delete_key":
                    conn.execute("DELETE FROM keys WHERE id = ?", (item,))
            if rows:
                self._insert_rows(conn, rows)
            for account_id, (n, p, c, cost) in totals.items():
                conn.execute(
                    """INSERT INTO account_totals VALUES (?,?,?,?,?)
                       ON CONFLICT(account_id) DO UPDATE SET
                         requests = requests + excluded.requests,
                         prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                         completion_tokens = completion_tokens + excluded.completion_tokens,
                         cost_usd = cost_usd + excluded.cost_usd""",
                    (account_id, n, p, c, cost),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(
            f"INSERT INTO ledger ({_ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
        )

    # -- reads ---------------------------------------------------------------------------

    def query(
        self, account_id: str | None, since: float | None, until: float | None
    ) -> defer.Deferred[list[LedgerRow]]:
        """Ledger rows, read by the writer thread (after what is queued is written)."""

        def read(_: object) -> defer.Deferred[list[LedgerRow]]:
            return deferToThreadPool(
                self.reactor, self._threads, self._query, account_id, since, until
            )

        return self.flush().addCallback(read)

    def _query(
        self, account_id: str | None, since: float | None, until: float | None
    ) -> list[LedgerRow]:
        assert self._conn is not None
        where, args = _where(account_id, since, until)
        sql = f"SELECT {_ROW_COLUMNS} FROM ledger{where} ORDER BY id"
        return [
            LedgerRow(
                time=r[0],
                request_id=r[1],
                account_id=r[2],
                model=r[3],
                key_id=r[4],
                status=r[5],
                prompt_tokens=r[6],
                completion_tokens=r[7],
                cost_usd=r[8],
                estimated=bool(r[9]),
                latency=r[10],
                attempts=r[11],
                endpoint=r[12],
            )
            for r in self._conn.execute(sql, args)
        ]

    def summarize(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> defer.Deferred[list[UsageLine]]:
        """Ledger totals grouped in SQL, by the writer thread (after what is queued)."""

        def read(_: object) -> defer.Deferred[list[UsageLine]]:
            return deferToThreadPool(
                self.reactor, self._threads, self._summarize, account_id, since, until, by_day
            )

        return self.flush().addCallback(read)

    def _summarize(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> list[UsageLine]:
        assert self._conn is not None
        where, args = _where(account_id, since, until)
        day = "CAST(time / 86400 AS INTEGER) * 86400" if by_day else "NULL"
        sql = (
            f"SELECT account_id, model, {day} AS day, COUNT(*), SUM(prompt_tokens), "
            "SUM(completion_tokens), SUM(cost_usd), SUM(estimated) FROM ledger"
            f"{where} GROUP BY account_id, model, day ORDER BY day, account_id, model"
        )
        return [
            UsageLine(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
            for r in self._conn.execute(sql, args)
        ]

    # -- closing ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def close(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._conn is None:
            return
        yield self.flush()
        self._threads.stop()
        self._conn.close()
        self._conn = None


def _where(
    account_id: str | None, since: float | None, until: float | None
) -> tuple[str, list[Any]]:
    where = []
    args: list[Any] = []
    if account_id is not None:
        where.append("account_id = ?")
        args.append(account_id)
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    if until is not None:
        where.append("time < ?")
        args.append(until)
    return (" WHERE " + " AND ".join(where) if where else ""), args
