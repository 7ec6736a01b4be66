"""``twistd yugongd``: command-line options and the service tree.

``makeService`` loads the config (or the embedded defaults), opens the state store,
builds the :class:`~yugongd.gateway.Gateway` and returns a ``MultiService`` with one
``StreamServerEndpointService`` per ``listen`` endpoint. A config error prints one line
and exits non-zero before anything listens.
"""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

import pluggy
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage

from yugongd import leanpoll, logtime
from yugongd.config import Config, ConfigError, default_config, load_config
from yugongd.gateway import Gateway
from yugongd.plugins import PluginLoadError
from yugongd.site import GatewaySite
from yugongd.state import MemoryState, StateStore

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run yugongd, an OpenAI-compatible API gateway over a pool of upstream keys. "
        "Without --config it listens on tcp:8080:interface=127.0.0.1 with the keys of "
        "OPENAI_API_KEY (comma-separated)."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML config file (see etc/yugongd.yaml)."],
    ]


def open_state(config: Config, reactor: Any) -> StateStore:
    """The state store that ``config.state`` names."""
    spec = config.state
    if spec == "memory":
        return MemoryState()
    if spec.startswith("sqlite:"):
        from yugongd.sqlite import SQLiteState

        return SQLiteState(spec[len("sqlite:") :], reactor)
    if spec.startswith("redis://"):
        from yugongd.redisstate import RedisState

        try:
            return RedisState(spec, reactor, config.cluster)
        except ValueError as e:
            raise ConfigError(config.source, "state", str(e)) from None
    raise ConfigError(
        config.source, "state", f"{spec!r}: expected 'memory', 'sqlite:<path>' or 'redis://…'"
    )


def load(path: str | None) -> Config:
    return load_config(path) if path else default_config()


def _freeze(result: object) -> object:
    gc.freeze()
    return result


class GatewayService(service.MultiService):
    """The gateway and its listeners; reload on SIGHUP, drain and flush on stop."""

    def __init__(self, gateway: Gateway, config_path: str | None) -> None:
        super().__init__()
        self.gateway = gateway
        self.config_path = config_path

    def startService(self) -> None:
        d = self.gateway.start()
        d.addErrback(lambda f: log.failure("could not load the state", f))
        # what exists at start (modules, config, accounts, keys) lives as long as the
        # process: out of the collector's sight, full collections stay short
        d.addBoth(_freeze)
        for note in self.gateway.config.notes:
            log.info("{note}", note=note)
        log.info(
            "yugongd: listening on {listen}; {keys} upstream keys; {accounts} accounts; state {state}",
            listen=", ".join(self.gateway.config.listen),
            keys=len(self.gateway.pool.keys),
            accounts=len(self.gateway.accounts),
            state=self.gateway.config.state,
        )
        if self.gateway.single_user():
            log.info(
                "yugongd: no accounts: single-user mode (loopback listeners forward any "
                "client key; other listeners refuse every request until an account exists)"
            )
        if hasattr(signal, "SIGHUP"):
            reactor = self.gateway.reactor
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload))
        super().startService()

    def reload(self) -> None:
        try:
            config = load(self.config_path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: {error}", error=str(e))
            return
        self.gateway.reload(config)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        yield self.gateway.drain(self.gateway.config.shutdown_grace)
        yield self.gateway.stop()


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    # twistd's log lines (the access log: one per request) get their timestamp once a second
    logtime.install()
    # the epoll loop without a log context pushed around every read and write
    leanpoll.install(reactor)
    path = options["config"]
    try:
        config = load(path)
        state = open_state(config, reactor)
        gateway = Gateway(config, reactor, state)
    except ConfigError as e:
        sys.exit(f"yugongd: {e}")
    except (PluginLoadError, pluggy.PluginValidationError) as e:
        sys.exit(f"yugongd: {config.source}: plugins: {e}")
    top = GatewayService(gateway, path)
    for description in config.listen:
        endpoint = endpoints.serverFromString(reactor, description)
        listener = StreamServerEndpointService(endpoint, GatewaySite(gateway))
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
    return top
