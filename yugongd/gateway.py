"""The gateway: everything one running yugongd holds, and its lifecycle.

A :class:`Gateway` is built from a :class:`~yugongd.config.Config`, a reactor (also its
clock) and a :class:`~yugongd.state.StateStore`; nothing in it imports the global reactor,
so tests drive it with ``MemoryReactorClock`` or ``task.Clock``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pluggy
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, server
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from yugongd.accounts import AccountStore
from yugongd.errors import write_json
from yugongd.httpclient import HTTPClient, UpstreamAgent
from yugongd.ledger import Ledger
from yugongd.plugins import make_plugin_manager
from yugongd.pool import KeyPool, Upstream, UpstreamKey
from yugongd.proxy import PoolQueue
from yugongd.state import StateStore, StoredKey
from yugongd.usage import PriceTable

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from yugongd.config import Config
    from yugongd.proxy import ProxiedRequest

log = Logger()

#: how often (seconds, at most) disabled keys are looked at for a due probe
PROBE_TICK = 5.0


class Gateway:
    """The pool, the accounts, the ledger, the plugins and the upstream connections."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        state: StateStore,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.state = state
        self.pool = KeyPool(reactor)
        self.accounts = AccountStore()
        self.ledger = Ledger(state)
        self.prices = PriceTable(config.prices)
        self.inflight: set[ProxiedRequest] = set()
        self.queue = PoolQueue(reactor)
        #: persistent upstream connections (at most 256 idle per host, closed after 90 s)
        self.http = HTTPClient(reactor, max_idle_per_host=256, idle_timeout=90.0)
        self._agents: dict[str, tuple[Upstream, UpstreamAgent]] = {}
        self.pm = pm if pm is not None else make_plugin_manager(config, self)
        from yugongd.admin import AdminAPI
        from yugongd.billing import BillingAPI
        from yugongd.metrics import Metrics

        self.admin = AdminAPI(self)
        self.billing = BillingAPI(self)
        self.metrics = Metrics(self)
        self.started = False
        self.prober: task.LoopingCall | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Load the durable state, then apply the config."""
        snapshot = yield self.state.open()
        for account in snapshot.accounts:
            self.accounts.put(account)
        self.ledger.restore(snapshot.totals)
        self.apply_config(self.config)
        for stored in snapshot.keys:
            self._add_stored_key(stored)
        self.prober = task.LoopingCall(self.probe_keys)
        self.prober.clock = self.reactor
        self.prober.start(min(self.config.pool.probe_interval, PROBE_TICK), now=False)
        self.started = True

    def _add_stored_key(self, stored: StoredKey) -> None:
        if stored.upstream not in self.pool.upstreams or stored.id in self.pool.keys:
            log.warn(
                "runtime key {key_id} refers to upstream {upstream} that is not configured; skipped",
                key_id=stored.id,
                upstream=stored.upstream,
            )
            return
        self.pool.add_key(stored.upstream, stored.key_config(), source="api")

    def apply_config(self, config: Config) -> None:
        """Take a new config (at start and on reload): keys, accounts, prices, limits."""
        runtime = [k for k in self.pool.keys.values() if k.source != "config"]
        self.config = config
        self.pool.configure(config.upstreams)
        for key in runtime:
            if key.id not in self.pool.keys and key.upstream in self.pool.upstreams:
                self.pool.keys[key.id] = key
        self.accounts.configure(config.accounts)
        self.prices = PriceTable(config.prices)
        self._agents.clear()
        self.pm.hook.yugongd_configure(config=config, gateway=self)

    def reload(self, config: Config) -> None:
        """SIGHUP: apply ``config``; requests in flight finish on what they started with."""
        self.apply_config(config)
        log.info(
            "reloaded {source}: {keys} keys, {accounts} accounts",
            source=config.source,
            keys=len(self.pool.keys),
            accounts=len(self.accounts),
        )

    def drain(self, grace: float) -> defer.Deferred[None]:
        """Fires when no request is in flight, or after ``grace`` seconds."""
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.clock.seconds() + grace

        def check() -> None:
            if not self.inflight or self.clock.seconds() >= deadline:
                if self.inflight:
                    log.warn(
                        "shutdown: {n} requests still in flight after {grace}s; closing them",
                        n=len(self.inflight),
                        grace=grace,
                    )
                done.callback(None)
            else:
                self.reactor.callLater(0.05, check)

        check()
        return done

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Flush the ledger and close the store and the upstream connections."""
        if self.prober is not None and self.prober.running:
            self.prober.stop()
        yield self.state.flush()
        yield self.state.close()
        yield self.http.close()

    # -- probes ---------------------------------------------------------------------------

    def probe_keys(self) -> None:
        """Re-test, every ``pool.probe_interval``, the keys disabled for quota or repeated
        failures, with ``GET /models``; a key that passes is enabled again."""
        now = self.clock.seconds()
        interval = self.config.pool.probe_interval
        for key in list(self.pool.keys.values()):
            if not key.enabled and key.probe and now - key.disabled_at >= interval:
                key.disabled_at = now
                self._probe(key)

    def _probe(self, key: UpstreamKey) -> defer.Deferred[Any]:
        headers = Headers({b"authorization": [key.auth_header]})
        if key.org_header is not None:
            headers.setRawHeaders(b"openai-organization", [key.org_header])
        url = key.endpoint.base_url.encode("ascii") + b"/models"
        d = self.agent_for(key.endpoint).request(b"GET", url, headers)
        timeout = self.reactor.callLater(key.endpoint.timeouts.first_byte, d.cancel)

        def answered(response: IResponse) -> defer.Deferred[None]:
            if timeout.active():
                timeout.cancel()
            done = client.readBody(response)
            if response.code == 200 and key.id in self.pool.keys and not key.enabled and key.probe:
                self.pool.enable(key)
                log.info("key {key_id} passed its probe: enabled again", key_id=key.id)
            else:
                log.info(
                    "key {key_id} failed its probe (HTTP {status}); next try in {interval}s",
                    key_id=key.id,
                    status=response.code,
                    interval=self.config.pool.probe_interval,
                )
            return done.addCallbacks(lambda _: None, lambda _: None)

        def failed(reason: Failure) -> None:
            if timeout.active():
                timeout.cancel()
            log.info(
                "key {key_id} failed its probe ({problem}); next try in {interval}s",
                key_id=key.id,
                problem=type(reason.value).__name__,
                interval=self.config.pool.probe_interval,
            )

        return d.addCallbacks(answered, failed)

    # -- per request helpers ------------------------------------------------------------

    def agent_for(self, upstream: Upstream) -> UpstreamAgent:
        """One agent per upstream (its connect timeout), all on the shared connections."""
        entry = self._agents.get(upstream.name)
        if entry is None or entry[0] is not upstream:
            entry = (upstream, self.http.agent(upstream.timeouts.connect))
            self._agents[upstream.name] = entry
        return entry[1]

    def single_user(self) -> bool:
        """No account exists: loopback listeners forward without a client key."""
        return len(self.accounts) == 0

    def unauthenticated_message(self, request: server.Request) -> str:
        if self.single_user():
            return (
                "No accounts exist yet and this listener is not loopback: create an account "
                "(config 'accounts' or POST /admin/accounts) to use yugongd from other hosts."
            )
        return "Incorrect API key provided. Use the key of a yugongd account."

    def healthz(self, request: server.Request) -> Any:
        doc: dict[str, Any] = {"status": "ok", "keys": self.pool.counts()}
        instance = getattr(self.state, "instance", None)
        if instance is not None:  # cluster mode: which process answered
            doc["instance"] = instance
        body = json.dumps(doc).encode()
        write_json(request, 200, body)
        return server.NOT_DONE_YET
