"""Log timestamps made once a second instead of once a line.

Every line twistd writes (``--logfile``, stdout under ``-n``) starts with a timestamp that
``twisted.logger.formatTime`` builds from scratch: a local-timezone offset and a
``strftime`` — about 40% of what a log line costs, and the access log writes a line per
request. twistd's default format (``%Y-%m-%dT%H:%M:%S%z``) has no field finer than a
second, so the text is the same for every line of one second: :func:`install` puts a
per-second memo in front of it for that format (and only that one; others go straight to
Twisted's function). The output is byte for byte what Twisted would write
(``tests/test_accesslog.py`` checks it against the original over two days of instants,
DST changes included).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import _file
from twisted.logger._format import formatTime as twisted_format_time
from twisted.logger._format import timeFormatRFC3339


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


def install() -> None:
    """Memoise the timestamps of twistd's text log observers (``textFileLogObserver``
    looks ``formatTime`` up in its module each time it formats a line)."""
    if getattr(_file.formatTime, "__name__", "") != "format_time":
        _file.formatTime = memo_format_time()
