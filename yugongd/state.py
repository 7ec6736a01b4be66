"""Durable state behind one narrow interface.

The hot path never waits on this: accounts and keys are loaded once at start into memory
(:class:`yugongd.accounts.AccountStore`, :class:`yugongd.pool.KeyPool`), changes made
through the admin API are written behind, and ledger rows are appended to a queue that
the store drains in batches. :class:`MemoryState` keeps everything in process memory
(``state: "memory"``); the SQLite store implements the same :class:`StateStore`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed

from yugongd.model import Account

if TYPE_CHECKING:
    from yugongd.config import KeyConfig


@frozen
class LedgerRow:
    """One request, as the ledger keeps it."""

    time: float
    request_id: str
    account_id: str
    model: str | None
    key_id: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    estimated: bool
    latency: float
    attempts: int
    endpoint: str = ""


@frozen
class StoredKey:
    """A key added through the admin API (config keys live in the config file)."""

    upstream: str
    id: str
    key: str = field(repr=False)
    organization: str | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ("*",)

    def key_config(self) -> KeyConfig:
        """The key as the pool takes it (``KeyPool.add_key``)."""
        from yugongd.config import KeyConfig

        return KeyConfig(
            id=self.id,
            key=self.key,
            organization=self.organization,
            weight=self.weight,
            rpm=self.rpm,
            tpm=self.tpm,
            models=self.models,
        )


@define
class AccountTotals:
    """Running totals of one account, restored at start and kept in memory after."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, row: LedgerRow) -> None:
        self.requests += 1
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cost_usd += row.cost_usd


@frozen
class UsageLine:
    """Totals of one account and model (and day, when asked by day) over a period.

    :param day: unix time of the UTC day's start, or ``None`` when not grouped by day.
    """

    account_id: str
    model: str | None
    day: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    estimated: int


@frozen
class Snapshot:
    """What a store hands back when it opens."""

    accounts: tuple[Account, ...] = ()
    keys: tuple[StoredKey, ...] = ()
    totals: dict[str, AccountTotals] = field(factory=dict)


class StateStore(Protocol):
    """Where accounts, runtime keys and the ledger are kept.

    Writes (``save_*``, ``delete_*``, ``append``) return at once and are made durable
    behind the hot path; ``flush`` fires when everything written so far is durable.
    """

    def open(self) -> Deferred[Snapshot]: ...

    def save_account(self, account: Account) -> None: ...

    def delete_account(self, account_id: str) -> None: ...

    def save_key(self, key: StoredKey) -> None: ...

    def delete_key(self, key_id: str) -> None: ...

    def append(self, row: LedgerRow) -> None: ...

    def query(
        self, account_id: str | None, since: float | None, until: float | None
    ) -> Deferred[list[LedgerRow]]: ...

    def summarize(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> Deferred[list[UsageLine]]:
        """Ledger totals per account and model (and UTC day when ``by_day``)."""
        ...

    def pending(self) -> int:
        """Rows appended but not yet durable."""
        ...

    def flush(self) -> Deferred[None]: ...

    def close(self) -> Deferred[None]: ...


class MemoryState:
    """``state: "memory"``: everything in this process, nothing survives a restart."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.keys: dict[str, StoredKey] = {}
        self.rows: list[LedgerRow] = []

    def open(self) -> Deferred[Snapshot]:
        totals: dict[str, AccountTotals] = {}
        for row in self.rows:
            totals.setdefault(row.account_id, AccountTotals()).add(row)
        return succeed(Snapshot(tuple(self.accounts.values()), tuple(self.keys.values()), totals))

    def save_account(self, account: Account) -> None:
        self.accounts[account.id] = account

    def delete_account(self, account_id: str) -> None:
        self.accounts.pop(account_id, None)

    def save_key(self, key: StoredKey) -> None:
        self.keys[key.id] = key

    def delete_key(self, key_id: str) -> None:
        self.keys.pop(key_id, None)

    def append(self, row: LedgerRow) -> None:
        self.rows.append(row)

    def query(
        self, account_id: str | None, since: float | None, until: float | None
    ) -> Deferred[list[LedgerRow]]:
        return succeed(list(_select(self.rows, account_id, since, until)))

    def summarize(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> Deferred[list[UsageLine]]:
        return succeed(summarize_rows(_select(self.rows, account_id, since, until), by_day))

    def pending(self) -> int:
        return 0

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


def _select(
    rows: Iterable[LedgerRow], account_id: str | None, since: float | None, until: float | None
) -> Iterable[LedgerRow]:
    for row in rows:
        if account_id is not None and row.account_id != account_id:
            continue
        if since is not None and row.time < since:
            continue
        if until is not None and row.time >= until:
            continue
        yield row


def summarize_rows(rows: Iterable[LedgerRow], by_day: bool) -> list[UsageLine]:
    """Totals per account, model (and UTC day), sorted by day, account and model."""
    groups: dict[tuple[str, str | None, int | None], list[float]] = {}
    for row in rows:
        day = int(row.time // 86400 * 86400) if by_day else None
        t = groups.get((row.account_id, row.model, day))
        if t is None:
            t = groups[(row.account_id, row.model, day)] = [0, 0, 0, 0.0, 0]
        t[0] += 1
        t[1] += row.prompt_tokens
        t[2] += row.completion_tokens
        t[3] += row.cost_usd
        t[4] += int(row.estimated)
    lines = [
        UsageLine(a, m, d, int(t[0]), int(t[1]), int(t[2]), t[3], int(t[4]))
        for (a, m, d), t in groups.items()
    ]
    lines.sort(key=lambda u: (u.day or 0, u.account_id, u.model or ""))
    return lines
