"""Counting what a request consumed, from the upstream's own numbers, and pricing it.

:class:`SSEUsageScanner` watches a relayed event stream for the final usage chunk (and
can remove it from what the client receives); :func:`usage_from_json` reads the
``usage`` object of a JSON answer. Both accept chat/completions names
(``prompt_tokens``/``completion_tokens``) and Responses API names
(``input_tokens``/``output_tokens``).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from yugongd.model import Usage

if TYPE_CHECKING:
    from yugongd.config import Price

#: USD per 1M tokens (``input``/``output``) or per call (``request``), for OpenAI's
#: current models; ``prices`` in the config overrides or extends these entries.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-5": {"input": 1.25, "output": 10.0},
    "gpt-5-mini": {"input": 0.25, "output": 2.0},
    "gpt-5-nano": {"input": 0.05, "output": 0.40},
    "gpt-4.1": {"input": 2.0, "output": 8.0},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-4o": {"input": 2.50, "output": 10.0},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4-turbo": {"input": 10.0, "output": 30.0},
    "gpt-4": {"input": 30.0, "output": 60.0},
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
    "o1": {"input": 15.0, "output": 60.0},
    "o3": {"input": 2.0, "output": 8.0},
    "o3-mini": {"input": 1.10, "output": 4.40},
    "o4-mini": {"input": 1.10, "output": 4.40},
    "text-embedding-3-small": {"input": 0.02},
    "text-embedding-3-large": {"input": 0.13},
    "text-embedding-ada-002": {"input": 0.10},
    "omni-moderation-latest": {"request": 0.0},
    "whisper-1": {"request": 0.006},
    "tts-1": {"request": 0.015},
    "tts-1-hd": {"request": 0.030},
    "dall-e-3": {"request": 0.040},
    "dall-e-2": {"request": 0.020},
    "gpt-image-1": {"request": 0.042},
}

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class PriceTable:
    """Looks up a model's price: exact name, then the model without a ``-YYYY-MM-DD``
    suffix, then the longest glob that matches. Answers are cached per model name."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._exact: dict[str, tuple[float, float, float]] = {}
        for name, p in DEFAULT_PRICES.items():
            self._exact[name] = (p.get("input", 0.0), p.get("output", 0.0), p.get("request", 0.0))
        self._globs: list[tuple[str, tuple[float, float, float]]] = []
        for name, price in prices.items():
            triple = (price.input or 0.0, price.output or 0.0, price.request or 0.0)
            if any(c in name for c in "*?["):
                self._globs.append((name, triple))
            else:
                self._exact[name] = triple
        self._globs.sort(key=lambda item: -len(item[0]))
        self._cache: dict[str, tuple[float, float, float] | None] = {}

    def lookup(self, model: str | None) -> tuple[float, float, float] | None:
        if model is None:
            return None
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._exact.get(model)
        if found is None:
            found = self._exact.get(_DATE_SUFFIX.sub("", model))
        if found is None:
            for pattern, triple in self._globs:
                if fnmatch.fnmatchcase(model, pattern):
                    found = triple
                    break
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[model] = found
        return found

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.lookup(model)
        if price is None:
            return 0.0
        inp, out, req = price
        return (prompt_tokens * inp + completion_tokens * out) / 1_000_000 + req


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_numbers(usage: Any) -> tuple[int, int] | None:
    """``(prompt, completion)`` tokens from an OpenAI ``usage`` object, or ``None``."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return _as_int(usage.get("prompt_tokens")), _as_int(usage.get("completion_tokens"))
    if "input_tokens" in usage or "output_tokens" in usage:
        return _as_int(usage.get("input_tokens")), _as_int(usage.get("output_tokens"))
    if "total_tokens" in usage:
        return _as_int(usage.get("total_tokens")), 0
    return None


def usage_of_doc(doc: Any) -> tuple[int, int] | None:
    """The usage in a parsed JSON answer or chunk: its ``usage``, or its ``response``'s
    (the Responses API)."""
    if not isinstance(doc, dict):
        return None
    found = usage_numbers(doc.get("usage"))
    if found is None and isinstance(doc.get("response"), dict):
        found = usage_numbers(doc["response"].get("usage"))
    return found


def usage_from_json(body: bytes) -> tuple[int, int] | None:
    """The usage of a JSON answer (chat, completions, embeddings, responses …)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return usage_of_doc(doc)


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb'"usage":\s*null')
#: the text fields' string values, counted for the token estimate of a stream that gives no
#: usage. A match never spans a line end (a JSON string holds none), so any run of whole
#: lines can be counted on its own: the stream is counted in batches, not event by event.
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|delta|arguments)":[ \t]*"([^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*)"'
)


#: an event (or line) longer than this is relayed without being scanned (a usage chunk is
#: < 1 kB; without a bound, an upstream that never ends one would grow memory without limit)
MAX_EVENT = 4 << 20

#: bytes gathered before they are scanned in one go (per-event calls cost more than the scan
#: itself); the text count waits until it is asked for, up to this many bytes
BATCH = 16 << 10


def _has_event_end(data: bytes) -> bool:
    if b"\r" not in data:
        return b"\n\n" in data
    return _EVENT_END.search(data) is not None


def _event_ends(buf: bytes) -> list[int]:
    """Where each complete event in ``buf`` ends (just past its blank line)."""
    if b"\r" in buf:
        return [match.end() for match in _EVENT_END.finditer(buf)]
    # the usual case (no CR at all): C-speed searches instead of the regex
    ends = []
    at = buf.find(b"\n\n")
    while at != -1:
        at += 2
        ends.append(at)
        at = buf.find(b"\n\n", at)
    return ends


def _line_end(data: bytes, start: int = 0) -> int:
    """The index of the first CR or LF at or after ``start``; -1 if there is none."""
    lf = data.find(b"\n", start)
    cr = data.find(b"\r", start, lf if lf != -1 else len(data))
    return cr if cr != -1 else lf


def _line_start(data: bytes, at: int) -> int:
    return max(data.rfind(b"\n", 0, at), data.rfind(b"\r", 0, at)) + 1


def text_chars(block: bytes) -> int:
    """Characters in the string values of the text fields in ``block``."""
    total = 0
    for match in _TEXT_FIELD.finditer(block):
        total += match.end(1) - match.start(1)
    return total


class SSEUsageScanner:
    """Follows a server-sent event stream as it is relayed.

    :meth:`feed` takes the upstream's bytes as they arrive and returns what the client
    should get. When ``strip_usage`` is false it returns the input unchanged and the scan
    works on the side, :data:`BATCH` bytes at a time; when true, it returns whole events
    only, leaving out the usage chunk that yugongd asked for on the client's behalf. Events
    split across reads at any byte are handled. Unfinished input is kept as a list and
    joined once it is scanned, so a long event costs linear time; past ``max_event`` bytes
    it is passed through unscanned up to its end. :attr:`usage` is final after
    :meth:`finish`, and so is :attr:`text_chars` (counted only when it is read).
    """

    __slots__ = (
        "strip_usage",
        "usage",
        "_text",
        "_uncounted",
        "_uncounted_size",
        "_pending",
        "_pending_size",
        "_carry",
        "_carry_size",
        "_skip_line",
        "_parts",
        "_size",
        "_skipping",
        "_tail",
    )

    max_event = MAX_EVENT
    batch = BATCH

    def __init__(self, strip_usage: bool = False) -> None:
        self.strip_usage = strip_usage
        self.usage: tuple[int, int] | None = None
        #: text characters counted so far, and whole lines not counted yet
        self._text = 0
        self._uncounted: list[bytes] = []
        self._uncounted_size = 0
        # not stripping: raw input not scanned yet, and the unfinished line before it
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._carry: list[bytes] = []
        self._carry_size = 0
        #: inside an oversized line: not scanned up to its end
        self._skip_line = False
        # stripping: the unfinished event so far
        self._parts: list[bytes] = []
        self._size = 0
        #: inside an oversized event: pass bytes through until it ends
        self._skipping = False
        self._tail = b""

    @property
    def text_chars(self) -> int:
        """Characters of text (message content, tool arguments …) relayed so far."""
        if self._uncounted:
            self._count()
        return self._text

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self.strip_usage:
            return self._consume(data)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.batch:
            self._scan_pending(final=False)
        return data

    def finish(self) -> bytes:
        """The bytes held back at the end of the stream (an unterminated last event)."""
        if not self.strip_usage:
            self._scan_pending(final=True)
            return b""
        rest = b"".join(self._parts)
        self._parts = []
        self._size = 0
        if rest:
            self._scan_usage(rest)
            self._note_text(rest)
        return rest

    # -- not stripping: whole lines, a batch at a time ----------------------------------------

    def _scan_pending(self, final: bool) -> None:
        pending = self._pending
        data = b"".join(pending) if len(pending) != 1 else pending[0]
        self._pending = []
        self._pending_size = 0
        if self._skip_line:
            cut = _line_end(data)
            if cut == -1:
                return
            self._skip_line = False
            data = data[cut:]
        if final:
            block = b"".join(self._carry) + data if self._carry else data
            self._carry = []
            self._carry_size = 0
        else:
            cut = _line_start(data, len(data))
            if cut == 0:
                self._carry.append(data)
                self._carry_size += len(data)
                if self._carry_size > self.max_event:
                    self._carry = []
                    self._carry_size = 0
                    self._skip_line = True
                return
            block = b"".join(self._carry) + data[:cut] if self._carry else data[:cut]
            self._carry = [data[cut:]] if cut < len(data) else []
            self._carry_size = len(data) - cut
        if b'"usage"' in block:
            at = block.find(b'"usage"')
            while at != -1:
                end = _line_end(block, at)
                if end == -1:
                    end = len(block)
                line = block[_line_start(block, at) : end]
                if line.startswith(b"data:") and _NULL_USAGE.search(line) is None:
                    self._usage_of_line(line)
                at = block.find(b'"usage"', end)
        self._note_text(block)

    def _note_text(self, block: bytes) -> None:
        self._uncounted.append(block)
        self._uncounted_size += len(block)
        if self._uncounted_size >= self.batch:
            self._count()

    def _count(self) -> None:
        for block in self._uncounted:
            self._text += text_chars(block)
        self._uncounted = []
        self._uncounted_size = 0

    # -- stripping: event by event ----------------------------------------------------------

    def _consume(self, data: bytes) -> bytes:
        """Split ``data`` into events and scan them; what the client gets."""
        if self._skipping:
            probe = self._tail + data
            match = _EVENT_END.search(probe)
            if match is None:
                self._tail = probe[-3:]
                return data
            cut = match.end() - len(self._tail)
            self._skipping = False
            self._tail = b""
            return data[:cut] + (self._consume(data[cut:]) if cut < len(data) else b"")
        if self._parts:
            # an event end can only be in the new bytes, or straddle the boundary
            if not _has_event_end(b"".join(self._parts[-3:])[-3:] + data):
                self._parts.append(data)
                self._size += len(data)
                if self._size > self.max_event:
                    return self._overflow()
                return b""
            buf = b"".join(self._parts) + data
            self._parts = []
            self._size = 0
        else:
            buf = data
        last = 0
        out: list[bytes] = []
        for end in _event_ends(buf):
            event = buf[last:end]
            last = end
            if b'"usage"' in event and self._scan_usage(event):
                continue
            out.append(event)
        if last:
            self._note_text(buf[:last])
        if last < len(buf):
            self._parts = [buf[last:]]
            self._size = len(buf) - last
            if self._size > self.max_event:
                return b"".join(out) + self._overflow()
        return b"".join(out) if len(out) != 1 else out[0]

    def _overflow(self) -> bytes:
        """The unfinished event is too long to hold: it goes through unscanned (this
        returns what was held of it) up to its end."""
        held = b"".join(self._parts)
        self._parts = []
        self._size = 0
        self._skipping = True
        self._tail = held[-3:]
        return held

    def _scan_usage(self, event: bytes) -> bool:
        """Note the usage ``event`` gives; true when it is a usage-only chunk."""
        if b'"usage"' not in event or _NULL_USAGE.search(event):
            return False
        for line in event.splitlines():
            if line.startswith(b"data:"):
                only = self._usage_of_line(line)
                if only is not None:
                    return only
        return False

    def _usage_of_line(self, line: bytes) -> bool | None:
        """Note the usage of a ``data:`` line; whether it is a usage-only chunk, or None
        when the line gives no usage."""
        try:
            doc = json.loads(line[5:])
        except (ValueError, RecursionError):
            return None
        found = usage_of_doc(doc)
        if found is None:
            return None
        self.usage = found
        return bool(doc.get("choices") == [])


def make_usage(
    prices: PriceTable,
    model: str | None,
    counted: tuple[int, int] | None,
    estimate: tuple[int, int],
) -> Usage:
    """Price the upstream's numbers, or the estimate when it gave none."""
    if counted is not None:
        prompt, completion = counted
        estimated = False
    else:
        prompt, completion = estimate
        estimated = True
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost_usd=prices.cost(model, prompt, completion),
        estimated=estimated,
    )
