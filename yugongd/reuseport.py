"""``reuseport:PORT[:interface=ADDR][:backlog=N]``: a TCP listener with ``SO_REUSEPORT``.

Several processes that listen on the same address and port this way share it: the kernel
(Linux 3.9+, the BSDs) spreads incoming connections over them. That is how N yugongd
processes of a cluster serve one port with no proxy in front (see ``docs/cluster.md``).
A process that stops takes only its own accept queue with it; the others go on.

The endpoint string parser is registered as a Twisted plugin
(``twisted/plugins/yugongd_reuseport.py``), so ``listen: "reuseport:8080"`` works
wherever Twisted endpoint strings do, and is checked when the config is loaded.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEPORT`` (and ``SO_REUSEADDR``)."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50) -> None:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("SO_REUSEPORT is not available on this system")
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return defer.fail(error.CannotListenError(self.interface, self.port, e))
        finally:
            # the reactor keeps its own duplicate of the descriptor
            sock.close()
        return defer.succeed(port)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """``reuseport:PORT[:interface=ADDR][:backlog=N]``."""

    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> Any:
        if len(args) != 1 or set(kwargs) - {"interface", "backlog"}:
            raise ValueError("expected reuseport:PORT[:interface=ADDR][:backlog=N]")
        return ReusePortEndpoint(
            reactor,
            int(str(args[0])),
            str(kwargs.get("interface", "")),
            int(str(kwargs.get("backlog", 50))),
        )
