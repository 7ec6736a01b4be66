"""The twistd service, in process (a memory reactor: nothing listens for real)."""

import gc
import signal

from twisted.internet.testing import MemoryReactorClock

from yugongd import tap


def test_what_exists_at_start_is_frozen_out_of_the_collectors_sight(monkeypatch):
    """After the state is loaded the long-lived objects are frozen (gc.freeze): full
    collections then skip them, which keeps latency spikes short."""
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0000000000000000")
    options = tap.Options()
    options.parseOptions([])
    reactor = MemoryReactorClock()
    top = tap.makeService(options, reactor=reactor)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        top.startService()
        assert calls == ["freeze"]
        assert reactor.tcpServers, "the default listener was started"
    finally:
        signal.signal(signal.SIGHUP, previous)
        top.stopService()
