"""The ledger as the hot path sees it: per-account totals in memory, rows written behind."""

from __future__ import annotations

from yugongd.state import AccountTotals, LedgerRow, StateStore


class Ledger:
    """Keeps every account's running totals and hands each row to the store.

    :meth:`record` never blocks: the store queues the row and makes it durable in its
    own time (the SQLite store within a second, off the reactor thread).
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.totals: dict[str, AccountTotals] = {}

    def restore(self, totals: dict[str, AccountTotals]) -> None:
        self.totals = dict(totals)

    def record(self, row: LedgerRow) -> None:
        totals = self.totals.get(row.account_id)
        if totals is None:
            totals = self.totals[row.account_id] = AccountTotals()
        totals.add(row)
        self.state.append(row)

    def used_usd(self, account_id: str) -> float:
        totals = self.totals.get(account_id)
        return totals.cost_usd if totals is not None else 0.0
