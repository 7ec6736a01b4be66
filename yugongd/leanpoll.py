"""The epoll reactor's loop without a log context per I/O event.

For every ready descriptor, Twisted's ``EPollReactor.doPoll`` calls the descriptor's
``logPrefix()``, builds a ``{"system": prefix}`` dict and pushes it on
``twisted.python.context`` around the read or write (``log.callWithLogger``), so that a
*legacy* ``twisted.python.log`` message emitted during it is tagged with the connection.
That is six Python calls per event: about a tenth of the daemon's time when it relays
1,000 streams (one upstream read per relayed event), a few percent per plain request.

:func:`install` gives a running epoll reactor an identical loop without that wrapper. What
differs: such legacy messages carry twistd's default system tag (``-``) instead of the
connection's prefix (yugongd's own lines use ``twisted.logger`` namespaces and are
unchanged), and an exception escaping ``_doReadOrWrite`` itself — which already catches
and logs everything a protocol raises — is logged with the prefix as before.
"""

from __future__ import annotations

import errno
from types import MethodType
from typing import Any

from twisted.python import log

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


def _do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` with the read/write called directly."""
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    do_read_or_write = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            do_read_or_write(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            try:
                prefix = selectable.logPrefix()
            except BaseException:
                prefix = "(buggy logPrefix method)"
            log.err(system=prefix)


def install(reactor: Any) -> bool:
    """Use the lean loop on ``reactor`` if it is Twisted's epoll reactor with the stock
    ``doPoll``; returns whether it did."""
    if EPollReactor is None or not isinstance(reactor, EPollReactor):
        return False
    if type(reactor).doPoll is not EPollReactor.doPoll:
        return False  # a subclass with its own loop: leave it alone
    lean = MethodType(_do_poll, reactor)
    reactor.doPoll = lean  # type: ignore[method-assign]
    reactor.doIteration = lean  # type: ignore[method-assign]
    return True
