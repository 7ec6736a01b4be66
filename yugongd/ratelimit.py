"""What the pool knows of each organisation's rate limits, and OpenAI's rate-limit headers.

OpenAI reports, on every response, the organisation's limit, what remains and when it
is fully replenished, for requests and for tokens::

    x-ratelimit-limit-requests: 10000      x-ratelimit-limit-tokens: 2000000
    x-ratelimit-remaining-requests: 9998   x-ratelimit-remaining-tokens: 1999200
    x-ratelimit-reset-requests: 8.64ms     x-ratelimit-reset-tokens: 24ms

A :class:`Budget` models each of the two as a bucket that refills continuously (the
upstream's limits replenish over the minute): :meth:`Bucket.sync` sets its level and
refill rate from the headers, :meth:`Bucket.take` spends from it as requests are sent,
and :meth:`Bucket.level` interpolates between. Before any header arrives, a configured
``rpm``/``tpm`` sets the capacity and the refill rate is a minute's worth; with neither,
the bucket is unlimited. Keys of the same organisation share one budget.
"""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | bytes | None) -> float | None:
    """Seconds in an OpenAI reset duration: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``,
    or a bare number of seconds. ``None`` when it cannot be read."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        value = float(match.group(1))
        unit = match.group(2)
        total += value * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return total


def parse_retry_after(text: str | bytes | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_int(text: str | bytes | None) -> int | None:
    if text is None:
        return None
    try:
        return max(0, int(float(text)))
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e999"
        return None


class Bucket:
    """A continuously refilling allowance (requests or tokens of one organisation)."""

    __slots__ = ("capacity", "_level", "rate", "_at", "learned", "spent")

    def __init__(self, capacity: float | None = None) -> None:
        #: ``None``: no limit known
        self.capacity = capacity
        self._level = capacity or 0.0
        #: units per second
        self.rate = (capacity / 60.0) if capacity else 0.0
        self._at = 0.0
        #: whether the upstream's headers have set it (then they win over the config)
        self.learned = False
        #: everything ever taken (give-backs excluded): a request notes it when it is sent,
        #: and :meth:`sync` subtracts what was taken after it
        self.spent = 0.0

    def level(self, now: float) -> float:
        if self.capacity is None:
            return float("inf")
        return min(self.capacity, self._level + self.rate * max(0.0, now - self._at))

    def take(self, amount: float, now: float) -> None:
        self.spent += amount
        if self.capacity is None:
            return
        self._level = self.level(now) - amount
        self._at = now

    def give_back(self, amount: float, now: float) -> None:
        if self.capacity is None:
            return
        self._level = self.level(now) + amount
        self._at = now

    def sync(
        self,
        limit: int | None,
        remaining: int,
        reset: float | None,
        now: float,
        spent_at_send: float | None = None,
    ) -> None:
        """Take the upstream's word: ``remaining`` now, full again in ``reset`` seconds.

        The headers describe the bucket when the upstream admitted the responding request,
        so requests sent after that one (``spent - spent_at_send``) are still to be counted
        by the upstream and are subtracted; without this, every response would hand back
        the allowance of the requests in flight and the pool would overshoot the limit.
        """
        if limit is not None and limit > 0:
            self.capacity = float(limit)
        elif self.capacity is None or remaining > self.capacity:
            self.capacity = float(max(remaining, 1))
        later = 0.0
        if spent_at_send is not None:
            later = max(0.0, self.spent - spent_at_send)
        self._level = float(remaining) - later
        self._at = now
        deficit = self.capacity - remaining
        if reset is not None and reset > 0 and deficit > 0:
            self.rate = deficit / reset
        else:
            self.rate = self.capacity / 60.0
        self.learned = True

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0 if it is; inf if it never will be)."""
        if self.capacity is None:
            return 0.0
        have = self.level(now)
        if have >= amount:
            return 0.0
        if amount > self.capacity:
            # more than the whole allowance: admissible only when the bucket is full
            amount = self.capacity
            if have >= amount:
                return 0.0
        if self.rate <= 0:
            return float("inf")
        return (amount - have) / self.rate

    def fraction(self, now: float) -> float:
        """How full the bucket is, 0..1 (1 when unlimited)."""
        if self.capacity is None or self.capacity <= 0:
            return 1.0
        return max(0.0, self.level(now) / self.capacity)


class Budget:
    """The requests and tokens one organisation (or one key without an organisation) has."""

    __slots__ = ("name", "requests", "tokens")

    def __init__(self, name: str, rpm: int | None = None, tpm: int | None = None) -> None:
        self.name = name
        self.requests = Bucket(float(rpm) if rpm else None)
        self.tokens = Bucket(float(tpm) if tpm else None)

    def configure(self, rpm: int | None, tpm: int | None) -> None:
        """Configured limits apply until the upstream's headers say otherwise."""
        if rpm and not self.requests.learned:
            self.requests = Bucket(float(rpm))
        if tpm and not self.tokens.learned:
            self.tokens = Bucket(float(tpm))

    def admits(self, tokens: int, now: float) -> bool:
        return self.wait_for(tokens, now) == 0.0

    def wait_for(self, tokens: int, now: float) -> float:
        return max(self.requests.wait_for(1, now), self.tokens.wait_for(tokens, now))

    def take(self, tokens: int, now: float) -> None:
        self.requests.take(1, now)
        self.tokens.take(tokens, now)

    def headroom(self, now: float) -> float:
        return min(self.requests.fraction(now), self.tokens.fraction(now))
