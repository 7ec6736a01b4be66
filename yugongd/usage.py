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


def usage_from_json(body: bytes) -> tuple[int, int] | None:
    """The usage of a JSON answer (chat, completions, embeddings, responses …)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    found = usage_numbers(doc.get("usage"))
    if found is None and isinstance(doc.get("response"), dict):
        found = usage_numbers(doc["response"].get("usage"))
    return found


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_TEXT_FIELD = re.compile(rb'"(?:content|text|delta|arguments)":\s*"((?:[^"\\]|\\.)*)"')
_NULL_USAGE = re.compile(rb'"usage":\s*null')


#: an event longer than this is relayed without being scanned (a usage chunk is < 1 kB;
#: without a bound, an upstream that never ends an event would grow memory without limit)
MAX_EVENT = 4 << 20


class SSEUsageScanner:
    """Follows a server-sent event stream as it is relayed.

    :meth:`feed` takes the upstream's bytes as they arrive and returns what the client
    should get. When ``strip_usage`` is false it returns the input unchanged (the scan
    works on the side); when true, it returns whole events only, leaving out the usage
    chunk that yugongd asked for on the client's behalf. Events split across reads at
    any byte are handled. The bytes of an unfinished event are kept as a list and joined
    once the event ends, so a long event costs linear time; past ``max_event`` bytes it is
    passed through unscanned up to its end.
    """

    __slots__ = ("strip_usage", "usage", "text_chars", "_parts", "_size", "_skipping", "_tail")

    max_event = MAX_EVENT

    def __init__(self, strip_usage: bool = False) -> None:
        self.strip_usage = strip_usage
        self.usage: tuple[int, int] | None = None
        self.text_chars = 0
        #: the unfinished event so far
        self._parts: list[bytes] = []
        self._size = 0
        #: inside an oversized event: pass bytes through until it ends
        self._skipping = False
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._skipping:
            probe = self._tail + data
            match = _EVENT_END.search(probe)
            if match is None:
                self._tail = probe[-3:]
                return data
            cut = match.end() - len(self._tail)
            self._skipping = False
            self._tail = b""
            rest = self.feed(data[cut:])
            return data[:cut] + rest if self.strip_usage else data
        if self._parts:
            # an event end can only be in the new bytes, or straddle the boundary
            if _EVENT_END.search(b"".join(self._parts[-3:])[-3:] + data) is None:
                self._parts.append(data)
                self._size += len(data)
                if self._size > self.max_event:
                    held = self._overflow()
                    return held if self.strip_usage else data
                return b"" if self.strip_usage else data
            buf = b"".join(self._parts) + data
            self._parts = []
            self._size = 0
        else:
            buf = data
        last = 0
        out: list[bytes] = []
        for match in _EVENT_END.finditer(buf):
            end = match.end()
            event = buf[last:end]
            last = end
            if self._scan(event) and self.strip_usage:
                continue
            if self.strip_usage:
                out.append(event)
        if last < len(buf):
            self._parts = [buf[last:]]
            self._size = len(buf) - last
            if self._size > self.max_event:
                held = self._overflow()
                return b"".join(out) + held if self.strip_usage else data
        if not self.strip_usage:
            return data
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

    def finish(self) -> bytes:
        """The bytes held back at the end of the stream (an unterminated last event)."""
        rest = b"".join(self._parts)
        self._parts = []
        self._size = 0
        if rest:
            self._scan(rest)
        return rest if self.strip_usage else b""

    def _scan(self, event: bytes) -> bool:
        """Note what ``event`` tells; true when it is a usage-only chunk."""
        for match in _TEXT_FIELD.finditer(event):
            self.text_chars += len(match.group(1))
        if b'"usage"' not in event or _NULL_USAGE.search(event):
            return False
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                doc = json.loads(line[5:])
            except (ValueError, RecursionError):
                continue
            if not isinstance(doc, dict):
                continue
            found = usage_numbers(doc.get("usage"))
            if found is None and isinstance(doc.get("response"), dict):
                found = usage_numbers(doc["response"].get("usage"))
            if found is not None:
                self.usage = found
                return doc.get("choices") == []
        return False


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
