"""Per-account rate limits (``rpm``/``tpm``) and credit reservations.

Both live in memory on the reactor thread and cost a few dict operations per request.

A :class:`RollingWindow` counts what was spent over the last minute in one-second
buckets: a request admitted at second *s* counts until ``s + 60``. ``Retry-After`` is
the time until enough of the oldest buckets have expired for the refused request to
fit. A request larger than the whole limit (``max_tokens`` above ``tpm``) is admitted
when the window is empty, so that it waits for a quiet minute instead of being refused
forever.

A :class:`CreditBook` holds the cost of the requests in flight per account: a request
is admitted while ``used + reserved < credit``, so concurrent requests cannot spend
more than the credit plus one request each (the last admitted ones) — see
:meth:`CreditBook.reserve`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from attrs import frozen

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from yugongd.model import Account

#: the rolling window of ``rpm`` and ``tpm``, seconds
WINDOW = 60


class RollingWindow:
    """What was spent over the last :data:`WINDOW` seconds, in one-second buckets.

    :param span: the window's length in seconds.
    """

    __slots__ = ("span", "total", "_buckets")

    def __init__(self, span: int = WINDOW) -> None:
        self.span = span
        self.total = 0
        #: ``[second, amount]`` oldest first; at most ``span`` of them
        self._buckets: deque[list[int]] = deque()

    def _expire(self, now: float) -> None:
        horizon = int(now) - self.span
        buckets = self._buckets
        while buckets and buckets[0][0] <= horizon:
            self.total -= buckets.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self.total

    def wait(self, amount: int, limit: int, now: float) -> float:
        """Seconds until ``amount`` more fits under ``limit``; ``0.0`` when it fits now.

        ``amount`` above ``limit`` is treated as ``limit``: it fits in an empty window.
        """
        self._expire(now)
        need = min(amount, limit)
        if self.total + need <= limit:
            return 0.0
        freed = 0
        for second, spent in self._buckets:
            freed += spent
            if self.total - freed + need <= limit:
                return max(0.0, second + self.span - now)
        return max(0.0, self._buckets[-1][0] + self.span - now) if self._buckets else 0.0

    def add(self, amount: int, now: float) -> int:
        """Count ``amount`` at ``now``; returns the second it was counted in (for :meth:`adjust`)."""
        self._expire(now)
        second = int(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += amount
        else:
            buckets.append([second, amount])
        self.total += amount
        return second

    def adjust(self, second: int, delta: int, now: float) -> None:
        """Correct what was counted in ``second`` by ``delta`` (e.g. the real token count
        against the admission estimate), if that second is still in the window."""
        self._expire(now)
        for bucket in reversed(self._buckets):
            if bucket[0] == second:
                delta = max(delta, -bucket[1])
                bucket[1] += delta
                self.total += delta
                return
            if bucket[0] < second:
                return

    def reset_in(self, now: float) -> float:
        """Seconds until everything counted now has expired (OpenAI's ``x-ratelimit-reset-*``)."""
        self._expire(now)
        for second, spent in reversed(self._buckets):
            if spent > 0:
                return max(0.0, second + self.span - now)
        return 0.0


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


@frozen
class RateCheck:
    """The answer of :meth:`AccountLimiter.check`.

    :param retry_after: ``None`` when the request may go, else seconds to wait.
    :param which: ``"requests"`` or ``"tokens"``: the limit that refused.
    """

    retry_after: float | None
    which: str = ""


class AccountLimiter:
    """The rolling ``rpm``/``tpm`` windows of every account with limits.

    The limits are read from the :class:`~yugongd.model.Account` at each check, so a
    change through the admin API or a reload applies to the next request; the windows
    themselves survive such changes (they are kept by account id).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.requests: dict[str, RollingWindow] = {}
        self.tokens: dict[str, RollingWindow] = {}

    def _window(self, table: dict[str, RollingWindow], account_id: str) -> RollingWindow:
        window = table.get(account_id)
        if window is None:
            window = table[account_id] = RollingWindow()
        return window

    def check(self, account: Account, tokens: int) -> RateCheck:
        """Whether one more request of ``tokens`` expected tokens fits; counts nothing."""
        now = self.clock.seconds()
        if account.rpm > 0:
            wait = self._window(self.requests, account.id).wait(1, account.rpm, now)
            if wait > 0:
                return RateCheck(wait, "requests")
        if account.tpm > 0:
            wait = self._window(self.tokens, account.id).wait(tokens, account.tpm, now)
            if wait > 0:
                return RateCheck(wait, "tokens")
        return RateCheck(None)

    def admit(self, account: Account, tokens: int) -> int | None:
        """Count one request of ``tokens`` expected tokens; returns the second the tokens
        were counted in (to settle them later with :meth:`settle`), or ``None`` when the
        account has no ``tpm``."""
        now = self.clock.seconds()
        if account.rpm > 0:
            self._window(self.requests, account.id).add(1, now)
        if account.tpm > 0:
            return self._window(self.tokens, account.id).add(tokens, now)
        return None

    def settle(self, account_id: str, second: int, delta: int) -> None:
        """Correct the tokens counted at admission by ``delta`` (real minus expected)."""
        window = self.tokens.get(account_id)
        if window is not None and delta:
            window.adjust(second, delta, self.clock.seconds())

    def headers(self, account: Account) -> dict[bytes, bytes]:
        """OpenAI-style ``x-ratelimit-*`` headers describing the account's own limits."""
        now = self.clock.seconds()
        out: dict[bytes, bytes] = {}
        for limit, table, name in (
            (account.rpm, self.requests, b"requests"),
            (account.tpm, self.tokens, b"tokens"),
        ):
            if limit <= 0:
                continue
            window = self._window(table, account.id)
            out[b"x-ratelimit-limit-" + name] = str(limit).encode()
            out[b"x-ratelimit-remaining-" + name] = str(max(0, limit - window.used(now))).encode()
            out[b"x-ratelimit-reset-" + name] = format_duration(window.reset_in(now)).encode()
        return out

    def forget(self, account_id: str) -> None:
        self.requests.pop(account_id, None)
        self.tokens.pop(account_id, None)


class CreditBook:
    """The cost of the requests in flight, per account, reserved against its credit."""

    def __init__(self) -> None:
        #: account id -> [USD reserved, requests holding a reservation]
        self._held: dict[str, list[float]] = {}

    def reserve(self, account_id: str, used: float, credit: float, cost: float) -> bool:
        """Reserve ``cost`` when ``used`` plus what is already reserved is below
        ``credit``; false (nothing reserved) when the credit is spent.

        The check does not include ``cost`` itself: a request is refused only once the
        credit is used up, so the last request admitted may overspend by its own cost,
        and concurrent requests cannot overspend by more than that.
        """
        entry = self._held.get(account_id)
        held = entry[0] if entry is not None else 0.0
        if used + held >= credit:
            return False
        if entry is None:
            self._held[account_id] = [cost, 1]
        else:
            entry[0] += cost
            entry[1] += 1
        return True

    def release(self, account_id: str, cost: float) -> None:
        """Give back one reservation made by :meth:`reserve`."""
        entry = self._held.get(account_id)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            # the last one out: no float residue accumulates over millions of requests
            del self._held[account_id]
        else:
            entry[0] = max(0.0, entry[0] - cost)

    def held(self, account_id: str) -> float:
        """USD reserved by the account's requests in flight."""
        entry = self._held.get(account_id)
        return entry[0] if entry is not None else 0.0

    def inflight(self, account_id: str) -> int:
        entry = self._held.get(account_id)
        return int(entry[1]) if entry is not None else 0
