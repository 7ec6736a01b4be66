"""yugongd.leanpoll: the epoll loop without a log context per event does what Twisted's does."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from yugongd import leanpoll

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    """A minimal read descriptor over one end of a socket pair."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.got: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> None:
        data = self.sock.recv(100)
        if self.fail:
            raise RuntimeError("protocol bug")
        self.got.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@pytest.fixture
def lean() -> Any:
    reactor = epollreactor.EPollReactor()
    assert leanpoll.install(reactor)
    yield reactor
    reactor._poller.close()


def test_reads_are_delivered(lean):
    ours, theirs = socket.socketpair()
    reader = Reader(ours)
    lean.addReader(reader)
    theirs.send(b"hello")
    lean.doIteration(0.5)
    assert reader.got == [b"hello"] and not reader.lost
    lean.removeReader(reader)
    ours.close()
    theirs.close()


def test_a_protocol_error_is_logged_and_its_connection_dropped(lean):
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        ours, theirs = socket.socketpair()
        reader = Reader(ours, fail=True)
        lean.addReader(reader)
        theirs.send(b"x")
        lean.doIteration(0.5)  # must not raise out of the loop
    finally:
        globalLogPublisher.removeObserver(observe)
    assert reader.lost and reader.lost[0].check(RuntimeError)
    assert errors
    failure = errors[0].get("log_failure") or errors[0].get("failure")
    assert failure.check(RuntimeError)
    assert reader not in lean.getReaders()
    ours.close()
    theirs.close()


def test_only_the_stock_epoll_reactor_is_changed():
    class Other:
        pass

    assert not leanpoll.install(Other())

    class OwnLoop(epollreactor.EPollReactor):
        def doPoll(self, timeout: float | None) -> None:
            pass

    reactor = OwnLoop()
    try:
        assert not leanpoll.install(reactor)
    finally:
        reactor._poller.close()


def test_new_work_is_taken_in_slices_after_work_in_progress():
    """A pass with many ready descriptors serves all work in progress, then at most
    NEW_WORK_PER_PASS new ones; the rest stay ready for the next passes."""
    reactor = epollreactor.EPollReactor()
    assert leanpoll.install(reactor, lambda s: getattr(s, "new", False))
    pairs = []
    try:
        readers = []
        for i in range(100):
            ours, theirs = socket.socketpair()
            pairs.append((ours, theirs))
            reader = Reader(ours)
            reader.new = i >= 10  # type: ignore[attr-defined]
            readers.append(reader)
            reactor.addReader(reader)
            theirs.send(b"x")
        current, new = readers[:10], readers[10:]
        reactor.doIteration(0.5)
        assert all(r.got for r in current)
        assert sum(bool(r.got) for r in new) == leanpoll.NEW_WORK_PER_PASS
        passes = 1
        while not all(r.got for r in new):
            reactor.doIteration(0.5)
            passes += 1
        assert passes == 2  # 32 of 90 new ones, then the 58 left: too few to slice
        assert all(r.got == [b"x"] for r in readers)  # each read once
        # a pass with few ready descriptors is not sliced
        for _ours, theirs in pairs[: leanpoll.SORT_ABOVE]:
            theirs.send(b"y")
        reactor.doIteration(0.5)
        assert all(r.got[-1] == b"y" for r in readers[: leanpoll.SORT_ABOVE])
    finally:
        for r in readers:
            reactor.removeReader(r)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
        reactor._poller.close()


def test_what_counts_as_new_work():
    from twisted.internet import tcp
    from twisted.internet.testing import StringTransport

    from tests.test_channel import GET, Conn
    from yugongd.channel import is_new_work

    port = tcp.Port(0, None)
    assert is_new_work(port)
    c = Conn()

    class Server:
        protocol = c.proto

    assert is_new_work(Server())  # a connection between requests
    c.send(GET)
    assert not is_new_work(Server())  # answering
    c.res.requests[0].finish()
    assert is_new_work(Server())

    class Other:
        protocol = object()

    assert not is_new_work(Other())
    assert not is_new_work(StringTransport())
