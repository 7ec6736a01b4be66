"""Log lines made cheaper: timestamps once a second, access lines without a formatter.

Every line twistd writes (``--logfile``, stdout under ``-n``) starts with a timestamp that
``twisted.logger.formatTime`` builds from scratch: a local-timezone offset and a
``strftime`` — about 40% of what a log line costs, and the access log writes a line per
request. twistd's default format (``%Y-%m-%dT%H:%M:%S%z``) has no field finer than a
second, so the text is the same for every line of one second: :func:`install` puts a
per-second memo in front of it for that format (and only that one; others go straight to
Twisted's function). The output is byte for byte what Twisted would write
(``tests/test_accesslog.py`` checks it against the original over two days of instants,
DST changes included). It also formats the access log's lines (an event that is one text
field) without ``string.Formatter``: :func:`classic_text`, same bytes as Twisted's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import _file
from twisted.logger._format import formatEventAsClassicLogText as twisted_classic_text
from twisted.logger._format import formatTime as twisted_format_time
from twisted.logger._format import timeFormatRFC3339

#: the ``log_format`` of an event whose whole text is one field (the access log's)
LINE_FORMAT = "{access_line}"


def memo_format_time() -> Callable[..., str]:
    """A ``formatTime`` with the same signature and results, memoised per whole second."""
    last: list[object] = [None, ""]

    def format_time(
        when: float | None, timeFormat: str | None = timeFormatRFC3339, default: str = "-"
    ) -> str:
        if when is None or timeFormat != timeFormatRFC3339:
            return twisted_format_time(when, timeFormat, default)
        second = int(when // 1)
        if last[0] != second:
            last[1] = twisted_format_time(float(second), timeFormat, default)
            last[0] = second
        return last[1]  # type: ignore[return-value]

    return format_time


def classic_text(
    event: dict[str, Any], formatTime: Callable[[float | None], str] = twisted_format_time
) -> str | None:
    """``formatEventAsClassicLogText`` with a short way for an access-log line.

    Twisted formats every event's ``log_format`` with ``string.Formatter`` (about half of
    what writing an access line costs); an event whose format is :data:`LINE_FORMAT` and
    that has nothing else to show (no failure, no ``log_system``, not flattened) is the
    field's text in the same frame: ``"{time} [{namespace}#{level}] {text}\n"``. Every
    other event goes to Twisted's function.
    """
    if (
        event.get("log_format") != LINE_FORMAT
        or "log_failure" in event
        or "log_system" in event
        or "log_flattened" in event
    ):
        return twisted_classic_text(event, formatTime)
    text = event.get("access_line")
    if type(text) is not str:
        return twisted_classic_text(event, formatTime)
    if not text:
        return None
    level = event.get("log_level")
    return (
        f"{formatTime(event.get('log_time'))} [{event.get('log_namespace', '-')}#"
        f"{'-' if level is None else level.name}] {text.replace(chr(10), chr(10) + chr(9))}\n"
    )


def install() -> None:
    """Memoise the timestamps of twistd's text log observers and format access-log lines
    the short way (``textFileLogObserver`` looks ``formatTime`` and
    ``formatEventAsClassicLogText`` up in its module each time it formats a line)."""
    if getattr(_file.formatTime, "__name__", "") != "format_time":
        _file.formatTime = memo_format_time()
    _file.formatEventAsClassicLogText = classic_text
