"""The access log: one line per client request, through ``twisted.logger``.

Lines go wherever twistd sends its log (``--logfile``, stdout under ``-n``/systemd,
``--syslog``), so twistd's own rotation applies. Each event has the namespace
``yugongd.access`` and carries the record as the ``access`` field too, for a structured
observer.

Two formats (config ``access_log.format``):

- ``text``: logfmt, ``name=value`` pairs; a value with a space, a quote, an ``=`` or a
  control character is written as a JSON string, so a client-supplied model name cannot
  forge a second line;
- ``json``: the record as one JSON object.

What a line holds is :func:`access_record`: never a key (pool keys appear as their
``id``, account keys not at all — the account's *name* is logged) and never a body.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger, LogLevel

from yugongd.logtime import LINE_FORMAT

if TYPE_CHECKING:
    from yugongd.model import Call, Outcome

log = Logger(namespace="yugongd.access")

#: values longer than this (client-supplied model names, paths) are cut
MAX_VALUE = 200

_BARE = re.compile(r"[A-Za-z0-9._:/@+*,\-]+\Z")


def _clip(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_VALUE:
        return value
    return value[:MAX_VALUE] + "…"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def access_record(call: Call, outcome: Outcome) -> dict[str, Any]:
    """What the access log says about one request, in order.

    ``added_ms`` is yugongd's own time: the whole latency less the time spent in
    upstream attempts (for a request refused before any attempt, all of it).
    """
    usage = outcome.usage
    account = call.account
    return {
        "request_id": call.request_id,
        "client": call.client_ip or None,
        "account": account.name if account is not None else None,
        "model": _clip(call.model),
        "method": call.method,
        "endpoint": _clip(call.endpoint),
        "stream": call.stream,
        "status": outcome.status,
        "code": _clip(outcome.code),
        "attempts": outcome.attempts,
        "key": outcome.key_id,
        "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
        "completion_tokens": usage.completion_tokens if usage is not None else 0,
        "estimated": usage.estimated if usage is not None else False,
        "cost_usd": round(usage.cost_usd, 10) if usage is not None else 0.0,
        "latency_ms": _ms(outcome.latency),
        "added_ms": _ms(max(0.0, outcome.latency - outcome.upstream_latency)),
        "bytes_out": outcome.bytes_out,
        "client_gone": outcome.client_gone,
    }


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        text = f"{value:.10f}".rstrip("0").rstrip(".")
        return text or "0"
    text = str(value)
    if _BARE.match(text):
        return text
    return json.dumps(text)


#: fields whose few distinct values repeat from line to line: their text is kept
_REPEATED = frozenset(("client", "account", "model", "method", "endpoint", "key", "code"))
_seen: dict[str, str] = {}


def format_text(record: dict[str, Any]) -> str:
    """``name=value`` pairs (logfmt)."""
    parts = []
    for name, value in record.items():
        # the common values first, without a regex (a line per request)
        if value is None:
            text = "-"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif type(value) is int:
            text = str(value)
        elif type(value) is str and name in _REPEATED:
            known = _seen.get(value)
            if known is None:
                if len(_seen) >= 4096:
                    _seen.clear()
                known = _seen[value] = _text_value(value)
            text = known
        else:
            text = _text_value(value)
        parts.append(name + "=" + text)
    return " ".join(parts)


def format_json(record: dict[str, Any]) -> str:
    """One JSON object, on one line."""
    return json.dumps(record, separators=(",", ":"))


def emit(call: Call, outcome: Outcome, fmt: str = "text") -> str:
    """Log the access line of one request; returns the line (for tests)."""
    record = access_record(call, outcome)
    line = format_json(record) if fmt == "json" else format_text(record)
    # the line is a field, never the format string: braces in it are not interpreted.
    # The event is what log.info(LINE_FORMAT, access_line=line, access=record) makes,
    # without Logger.emit's per-call check of the level against a freshly sorted list of
    # all levels
    log.observer(
        {
            "access_line": line,
            "access": record,
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": LINE_FORMAT,
            "log_time": time.time(),
        }
    )
    return line
