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

It also takes new work in slices. When one pass of the loop finds more than
:data:`SORT_ABOVE` descriptors ready, it first serves everything already in
progress (upstream connections, clients whose request is being answered) and then at
most :data:`NEW_WORK_PER_PASS` *new* pieces of work — a listening socket's next connections, a request
arriving on a connection with none in progress (``is_new_work``, given by the caller);
the others stay ready (epoll is level-triggered) and are served, in the order they became
ready, in the next passes. Without this, a burst of 1,000 streaming requests is read and
set up in one pass (~0.4 s of CPU) before the first upstream answer is looked at, so every
stream waits for the whole burst; with it, the first streams' events flow while the rest
of the burst is still being set up. Under ordinary load a pass has fewer ready descriptors
than that and nothing is sorted (sorting costs ~0.5 µs a descriptor).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from types import MethodType
from typing import Any

from twisted.python import log

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


#: new pieces of work taken in one pass of the loop when many are ready (see above)
NEW_WORK_PER_PASS = 32
#: passes with at most this many ready descriptors are not sorted (ordinary load)
SORT_ABOVE = 2 * NEW_WORK_PER_PASS


def _never(selectable: Any) -> bool:
    return False


def _do_poll(self: Any, timeout: float | None, is_new_work: Callable[[Any], bool] = _never) -> None:
    """``EPollReactor.doPoll`` with the read/write called directly, new work in slices."""
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    if len(events) > SORT_ABOVE and is_new_work is not _never:
        # work in progress first, then the first NEW_WORK_PER_PASS new pieces in the order
        # epoll gave them; the rest stay ready for the next pass
        current: list[tuple[int, int]] = []
        new: list[tuple[int, int]] = []
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                (new if is_new_work(selectable) else current).append((fd, event))
        events = current + new[:NEW_WORK_PER_PASS]
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


def install(reactor: Any, is_new_work: Callable[[Any], bool] = _never) -> bool:
    """Use the lean loop on ``reactor`` if it is Twisted's epoll reactor with the stock
    ``doPoll``; returns whether it did. ``is_new_work(selectable)`` says whether a ready
    descriptor is new work (see the module docstring); by default nothing is."""
    if EPollReactor is None or not isinstance(reactor, EPollReactor):
        return False
    if type(reactor).doPoll is not EPollReactor.doPoll:
        return False  # a subclass with its own loop: leave it alone

    def do_poll(self: Any, timeout: float | None) -> None:
        _do_poll(self, timeout, is_new_work)

    lean = MethodType(do_poll, reactor)
    reactor.doPoll = lean  # type: ignore[method-assign]
    reactor.doIteration = lean  # type: ignore[method-assign]
    return True
