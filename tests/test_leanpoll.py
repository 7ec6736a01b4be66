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
