"""``state: "redis://host:port/db"``: one pool and one set of accounts for many processes.

Everything the processes must agree on lives in Redis and changes through Lua scripts, so
that each change is atomic and costs one round trip:

- **admission** (:data:`ADMIT`): an account's rolling-minute ``rpm``/``tpm`` windows (one
  hash of per-second buckets each) and its credit (``spent`` plus the reservations of the
  requests in flight, anywhere) are checked and, when the request may go, counted and
  reserved, in one script: the one round trip a request waits for before it is forwarded.
- **settlement and the ledger** (:data:`LEDGER`): after the response, the request's
  reservation is released, its real cost added to ``spent``, its token estimate corrected,
  and its ledger row appended to a Redis stream with the account's running totals. The
  client never waits for this: rows and settlements are queued in memory and sent in
  batches. Each queued item carries this process's boot id and a sequence number; the
  script keeps the highest number applied per boot id, so a batch sent twice (a reply lost
  in a Redis outage, a spool replayed) is applied once.
- **accounts, runtime keys, key states, learned limits**: kept in hashes and announced on
  one pub/sub channel; every process keeps a local mirror (the hot path reads only that)
  and applies what the others announce within a few milliseconds.

While Redis is unreachable, ledger items are written to a spool file in ``cluster.spool_dir``
and replayed, in order, when Redis answers again; a spool left by a process that died is
adopted (``flock`` tells a live owner from a dead one) by the next process that starts
with the same ``spool_dir``. Admission then follows ``cluster.redis_outage``.

All keys share the hash tag ``{yg}``, so that the scripts' keys are in one slot.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import txredisapi
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from yugongd.config import ClusterConfig, parse_redis_url
from yugongd.model import Account
from yugongd.sqlite import _account_from_row, _account_row
from yugongd.state import AccountTotals, LedgerRow, Snapshot, StoredKey, UsageLine, summarize_rows

log = Logger()

#: script text -> SHA-1 digest (EVALSHA)
_SHA1: dict[str, str] = {}

PREFIX = "yg:{yg}:"
#: items per LEDGER script call
BATCH = 500
#: seconds a credit reservation outlives a request whose process died before settling it
HOLD_TTL = 900
#: rows of the ledger stream read per XRANGE while answering a usage query
SCAN_CHUNK = 5000
#: a row's stream id is at most this much earlier than its time (clock skew between hosts)
SKEW = 300.0
DAY = 86400
#: the fields of a day's totals: requests, prompt and completion tokens, cost, estimated
_METRICS = {"r": 0, "p": 1, "o": 2, "c": 3, "e": 4}

#: Account admission: rate windows and credit in one atomic step.
#: KEYS: rpm window, tpm window, held, spent.
#: ARGV[1]: "now account rpm tpm tokens credit cost uid ttl" (credit '-' = unlimited): one
#: argument and one string back keep the client's encoding and parsing cheap.
#: Returns "verdict retry_after requests_used requests_reset tokens_used tokens_reset
#: second"; verdict is ok, requests, tokens or credit.
#:
#: A window is a hash of per-second buckets plus its running total ``t``, its oldest
#: second ``m`` and its newest ``n``: admitting costs a few hash operations, and the
#: buckets are only scanned when the oldest one has left the minute (once a second at
#: most) or to compute a Retry-After. The reservations hash keeps its sum ``_s``, count
#: ``_n`` and earliest expiry ``_e`` the same way.
ADMIT = """
local packed = ARGV[1]
local ARGV = {}
for word in string.gmatch(packed, '%S+') do ARGV[#ARGV + 1] = word end
if ARGV[6] == '-' then ARGV[6] = '' end
local now = tonumber(ARGV[1])
local sec = math.floor(now)
local horizon = sec - 60
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local function total_of(key)
  local tmn = redis.call('HMGET', key, 't', 'm', 'n')
  local total = tonumber(tmn[1] or '0')
  local newest = tonumber(tmn[3] or '0')
  if tmn[2] and tonumber(tmn[2]) <= horizon then
    local flat = redis.call('HGETALL', key)
    local oldest = nil
    total = 0
    for i = 1, #flat, 2 do
      local f = flat[i]
      if f ~= 't' and f ~= 'm' and f ~= 'n' then
        local s = tonumber(f)
        if s <= horizon then
          redis.call('HDEL', key, f)
        else
          total = total + tonumber(flat[i + 1])
          if oldest == nil or s < oldest then oldest = s end
        end
      end
    end
    if oldest == nil then
      redis.call('DEL', key)
      return 0, 0
    end
    redis.call('HSET', key, 't', total, 'm', oldest)
  end
  return total, newest
end
local function wait(key, total, amount, limit)
  local need = math.min(amount, limit)
  if total + need <= limit then return 0 end
  local flat = redis.call('HGETALL', key)
  local buckets = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f ~= 't' and f ~= 'm' and f ~= 'n' then
      buckets[#buckets + 1] = {tonumber(f), tonumber(flat[i + 1])}
    end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  local freed = 0
  for _, b in ipairs(buckets) do
    freed = freed + b[2]
    if total - freed + need <= limit then return math.max(0, b[1] + 60 - now) end
  end
  if #buckets > 0 then return math.max(0, buckets[#buckets][1] + 60 - now) end
  return 0
end
local function add(key, amount)
  redis.call('HINCRBY', key, sec, amount)
  redis.call('HINCRBY', key, 't', amount)
  redis.call('HSETNX', key, 'm', sec)
  redis.call('HSET', key, 'n', sec)
  redis.call('EXPIRE', key, 120)
end
local function reset(total, newest)
  if total <= 0 then return 0 end
  return math.max(0, newest + 60 - now)
end
local rused, rnew, tused, tnew = 0, 0, 0, 0
local verdict, retry = 'ok', 0
if rpm > 0 then
  rused, rnew = total_of(KEYS[1])
  local w = wait(KEYS[1], rused, 1, rpm)
  if w > 0 then verdict, retry = 'requests', w end
end
if tpm > 0 then
  tused, tnew = total_of(KEYS[2])
  if verdict == 'ok' then
    local w = wait(KEYS[2], tused, tokens, tpm)
    if w > 0 then verdict, retry = 'tokens', w end
  end
end
if verdict == 'ok' and ARGV[6] ~= '' then
  local spent = tonumber(redis.call('HGET', KEYS[4], ARGV[2]) or '0')
  local sne = redis.call('HMGET', KEYS[3], '_s', '_n', '_e')
  local held = tonumber(sne[1] or '0')
  if sne[3] and tonumber(sne[3]) < now then
    -- a reservation outlived its request (its process died): drop the expired ones
    local flat = redis.call('HGETALL', KEYS[3])
    local n, earliest = 0, nil
    held = 0
    for i = 1, #flat, 2 do
      local f = flat[i]
      if f ~= '_s' and f ~= '_n' and f ~= '_e' then
        local sp = string.find(flat[i + 1], ' ', 1, true)
        local expiry = tonumber(string.sub(flat[i + 1], sp + 1))
        if expiry < now then
          redis.call('HDEL', KEYS[3], f)
        else
          held = held + tonumber(string.sub(flat[i + 1], 1, sp - 1))
          n = n + 1
          if earliest == nil or expiry < earliest then earliest = expiry end
        end
      end
    end
    if n == 0 then
      redis.call('DEL', KEYS[3])
      held = 0
    else
      redis.call('HSET', KEYS[3], '_s', tostring(held), '_n', n, '_e', tostring(earliest))
    end
  end
  if spent + held >= tonumber(ARGV[6]) then verdict = 'credit' end
end
if verdict == 'ok' then
  if rpm > 0 then
    add(KEYS[1], 1)
    rused, rnew = rused + 1, sec
  end
  if tpm > 0 then
    add(KEYS[2], tokens)
    tused, tnew = tused + tokens, sec
  end
  if ARGV[6] ~= '' then
    local ttl = tonumber(ARGV[9])
    local expiry = tostring(now + ttl)
    redis.call('HSET', KEYS[3], ARGV[8], ARGV[7] .. ' ' .. expiry)
    redis.call('HINCRBYFLOAT', KEYS[3], '_s', ARGV[7])
    redis.call('HINCRBY', KEYS[3], '_n', 1)
    redis.call('HSETNX', KEYS[3], '_e', expiry)
    redis.call('EXPIRE', KEYS[3], ttl + 60)
  end
end
return table.concat({verdict, tostring(retry), rused, tostring(reset(rused, rnew)), tused,
                     tostring(reset(tused, tnew)), sec}, ' ')
"""

#: Ledger rows and settlements, in order, each applied once.
#: KEYS: stream, hwm, totals, spent. ARGV: prefix, boot id, then items "seq<TAB>json".
LEDGER = """
local hwm = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local top = hwm
local applied = 0
for i = 3, #ARGV do
  local tab = string.find(ARGV[i], '\\t', 1, true)
  local seq = tonumber(string.sub(ARGV[i], 1, tab - 1))
  if seq > hwm then
    local text = string.sub(ARGV[i], tab + 1)
    local item = cjson.decode(text)
    local a = item.a
    if item.k == 'row' then
      redis.call('XADD', KEYS[1], '*', 'd', text)
      redis.call('HINCRBY', KEYS[3], a .. '|requests', 1)
      redis.call('HINCRBY', KEYS[3], a .. '|prompt_tokens', item.p)
      redis.call('HINCRBY', KEYS[3], a .. '|completion_tokens', item.o)
      redis.call('HINCRBYFLOAT', KEYS[3], a .. '|cost_usd', item.c)
      -- the day's totals per account and model: usage and billing queries over whole days
      -- read these instead of the stream
      local day = math.floor(item.t / 86400) * 86400
      local m = '-'
      if type(item.m) == 'string' then m = '=' .. item.m end
      local daily = ARGV[1] .. 'daily:' .. day .. ':' .. a
      redis.call('HINCRBY', daily, m .. '\tr', 1)
      redis.call('HINCRBY', daily, m .. '\tp', item.p)
      redis.call('HINCRBY', daily, m .. '\to', item.o)
      redis.call('HINCRBYFLOAT', daily, m .. '\tc', item.c)
      if item.e then redis.call('HINCRBY', daily, m .. '\te', 1) end
      redis.call('ZADD', ARGV[1] .. 'days:' .. a, day, day)
      redis.call('ZADD', ARGV[1] .. 'days', day, day)
      redis.call('SADD', ARGV[1] .. 'dayaccounts:' .. day, a)
    else
      if item.u ~= '' then
        local held = ARGV[1] .. 'held:' .. a
        local hold = redis.call('HGET', held, item.u)
        if hold then
          redis.call('HDEL', held, item.u)
          if redis.call('HINCRBY', held, '_n', -1) <= 0 then
            redis.call('DEL', held)
          else
            local sp = string.find(hold, ' ', 1, true)
            redis.call('HINCRBYFLOAT', held, '_s', '-' .. string.sub(hold, 1, sp - 1))
          end
        end
      end
      if item.c ~= '0' then redis.call('HINCRBYFLOAT', KEYS[4], a, item.c) end
      if item.s ~= cjson.null and item.d ~= 0 then
        local key = ARGV[1] .. 'tpm:' .. a
        local cur = redis.call('HGET', key, item.s)
        if cur then
          local d = math.max(item.d, -tonumber(cur))
          redis.call('HINCRBY', key, item.s, d)
          redis.call('HINCRBY', key, 't', d)
        end
      end
    end
    if seq > top then top = seq end
    applied = applied + 1
  end
end
if top > hwm then redis.call('HSET', KEYS[2], ARGV[2], top) end
return applied
"""

#: Store a value in a hash and announce it, in one step.
#: KEYS: hash. ARGV: field, value ('' = delete), channel, message.
ANNOUNCE = """
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


class ClusterListener(Protocol):
    """What the other processes announce (see :class:`yugongd.builtin.cluster.ClusterPlugin`)."""

    def account_event(self, account_id: str, account: Account | None) -> None: ...

    def key_event(self, key_id: str, stored: StoredKey | None) -> None: ...

    def key_state_event(self, key_id: str, state: dict[str, Any]) -> None: ...

    def budget_event(self, name: str, data: dict[str, Any]) -> None: ...

    def resync(self) -> Any: ...


@attrs.frozen
class Admission:
    """The answer of the :data:`ADMIT` script."""

    verdict: str
    retry_after: float
    requests_used: int
    requests_reset: float
    tokens_used: int
    tokens_reset: float
    second: int


# -- (de)serialising --------------------------------------------------------------------


def account_json(account: Account) -> str:
    return json.dumps(list(_account_row(account)))


def account_from_json(text: str) -> Account:
    return _account_from_row(tuple(json.loads(text)))


def key_json(key: StoredKey) -> str:
    return json.dumps(
        {
            "upstream": key.upstream,
            "id": key.id,
            "key": key.key,
            "organization": key.organization,
            "weight": key.weight,
            "rpm": key.rpm,
            "tpm": key.tpm,
            "models": list(key.models),
        }
    )


def key_from_json(text: str) -> StoredKey:
    d = json.loads(text)
    return StoredKey(
        upstream=d["upstream"],
        id=d["id"],
        key=d["key"],
        organization=d.get("organization"),
        weight=float(d.get("weight", 1.0)),
        rpm=d.get("rpm"),
        tpm=d.get("tpm"),
        models=tuple(d.get("models") or ("*",)),
    )


def row_item(row: LedgerRow) -> str:
    """A ledger row as the :data:`LEDGER` script takes it (and the stream keeps it)."""
    return json.dumps(
        {
            "k": "row",
            "a": row.account_id,
            "p": row.prompt_tokens,
            "o": row.completion_tokens,
            "c": repr(float(row.cost_usd)),
            "t": row.time,
            "r": row.request_id,
            "m": row.model,
            "key": row.key_id,
            "st": row.status,
            "e": row.estimated,
            "l": row.latency,
            "n": row.attempts,
            "ep": row.endpoint,
        },
        separators=(",", ":"),
    )


def row_from_item(text: str) -> LedgerRow:
    d = json.loads(text)
    return LedgerRow(
        time=float(d["t"]),
        request_id=d["r"],
        account_id=d["a"],
        model=d.get("m"),
        key_id=d.get("key"),
        status=int(d["st"]),
        prompt_tokens=int(d["p"]),
        completion_tokens=int(d["o"]),
        cost_usd=float(d["c"]),
        estimated=bool(d.get("e")),
        latency=float(d.get("l", 0.0)),
        attempts=int(d.get("n", 0)),
        endpoint=d.get("ep", ""),
    )


def settle_item(account_id: str, uid: str, cost: float, second: int | None, delta: int) -> str:
    return json.dumps(
        {
            "k": "settle",
            "a": account_id,
            "u": uid,
            "c": repr(float(cost)) if cost else "0",
            "s": str(second) if second is not None else None,
            "d": delta,
        },
        separators=(",", ":"),
    )


def _no_delay(transport: Any) -> None:
    """Commands are small and pipelined: without TCP_NODELAY, Nagle's algorithm holds a
    command back until the previous one is acknowledged (tens of milliseconds)."""
    if hasattr(transport, "setTcpNoDelay"):
        transport.setTcpNoDelay(True)


class _NoDelayProtocol(txredisapi.RedisProtocol):
    def connectionMade(self) -> Any:
        _no_delay(self.transport)
        return super().connectionMade()


def _release(_: object, waiter: defer.Deferred[None]) -> None:
    waiter.callback(None)


# -- the spool ----------------------------------------------------------------------------


class Spool:
    """Ledger items that could not reach Redis, in a local file, oldest first.

    Lines are ``boot<TAB>seq<TAB>item``. The file of a live process is ``flock``-ed by it;
    a file nobody holds was left by a process that died, and is adopted.
    """

    def __init__(self, directory: str, instance: str, boot: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, f"yugongd-spool-{instance}-{boot}.jsonl")
        self._file: Any = None
        #: (path, open file, offset) of spools being replayed, oldest first
        self._replay: list[tuple[str, Any]] = []
        self.count = 0

    def adopt_orphans(self) -> int:
        """Take over the spool files of processes that died; returns how many."""
        found = 0
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return 0
        for name in names:
            path = os.path.join(self.directory, name)
            if not (name.startswith("yugongd-spool-") and name.endswith(".jsonl")):
                continue
            if path == self.path or any(p == path for p, _ in self._replay):
                continue
            try:
                f = open(path, "r+", encoding="utf-8")
            except OSError:
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            if os.fstat(f.fileno()).st_nlink == 0:
                f.close()
                continue
            lines = sum(1 for _ in f)
            f.seek(0)
            self._replay.append((path, f))
            self.count += lines
            found += 1
        return found

    def write(self, items: list[tuple[str, int, str]]) -> None:
        if not items:
            return
        if self._file is None:
            os.makedirs(self.directory, exist_ok=True)
            self._file = open(self.path, "a+", encoding="utf-8")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            os.chmod(self.path, 0o600)
            self._file.seek(0)
            self._replay.append((self.path, self._file))
        pos = self._file.tell()
        self._file.seek(0, os.SEEK_END)
        self._file.write("".join(f"{b}\t{s}\t{t}\n" for b, s, t in items))
        self._file.flush()
        self._file.seek(pos)
        self.count += len(items)

    def __bool__(self) -> bool:
        return bool(self._replay)

    def peek(self, limit: int) -> list[tuple[str, int, str]]:
        """The oldest items of one boot id (at most ``limit``), without consuming them."""
        if not self._replay:
            return []
        _, f = self._replay[0]
        start = f.tell()
        out: list[tuple[str, int, str]] = []
        while len(out) < limit:
            at = f.tell()
            line = f.readline()
            if not line or not line.endswith("\n"):
                f.seek(at)
                break
            boot, seq, text = line.rstrip("\n").split("\t", 2)
            if out and boot != out[0][0]:
                f.seek(at)
                break
            out.append((boot, int(seq), text))
        self._mark = f.tell()
        f.seek(start)
        return out

    def consume(self, n: int) -> None:
        """The items :meth:`peek` returned are in Redis: move past them."""
        path, f = self._replay[0]
        f.seek(self._mark)
        self.count -= n
        if f.read(1) == "":
            # all of this file is in Redis
            os.unlink(path)
            f.close()
            self._replay.pop(0)
            if f is self._file:
                self._file = None
        else:
            f.seek(self._mark)

    def close(self) -> None:
        for _, f in self._replay:
            f.close()
        self._replay = []
        self._file = None


# -- the store ---------------------------------------------------------------------------


class RedisState:
    """A :class:`~yugongd.state.StateStore` shared by every process that names the same
    Redis database; also the hot path's shared admission and the processes' event bus."""

    #: tells the accounts plugin to admit through :meth:`admit`
    shared_admission = True

    def __init__(
        self,
        url: str,
        reactor: Any,
        cluster: ClusterConfig | None = None,
        flush_interval: float = 0.05,
    ) -> None:
        cluster = cluster or ClusterConfig()
        self.url = url
        self.host, self.port, self.db, self.password = parse_redis_url(url)
        self.reactor = reactor
        self.cluster = cluster
        self.timeout = cluster.timeout
        self.instance = cluster.instance or f"{socket.gethostname()}-{os.getpid()}"
        #: this process's run: ledger items are numbered per boot id
        self.boot = self.instance + "." + secrets.token_hex(4)
        self.flush_interval = flush_interval
        self.channel = f"{PREFIX}events:{self.db}"
        self.listener: ClusterListener | None = None
        self.redis: Any = None
        self._events: Any = None
        self._seq = 0
        self._queue: list[tuple[str, int, str]] = []
        #: announcements not yet in Redis, oldest first; one per (kind, id): only the
        #: latest state of a key, account or budget matters
        self._ops: dict[tuple[str, str], tuple[str, list[str], list[str]]] = {}
        self._flushing: defer.Deferred[None] | None = None
        self._waiters: list[defer.Deferred[None]] = []
        self._loop: task.LoopingCall | None = None
        self.spool = Spool(cluster.spool_dir, self.instance, self.boot)
        self.down_since: float | None = None

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> None:
        factory = txredisapi.RedisFactory(
            f"{self.host}:{self.port}",
            self.db,
            2,
            isLazy=True,
            password=self.password,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        factory.protocol = _NoDelayProtocol
        factory.reconnect = True
        factory.maxDelay = 1.0
        factory.initialDelay = 0.2
        factory.startConnecting(txredisapi._makeEndpoint(self.host, self.port, self.timeout))
        self.redis = factory.handler

    def _subscribe(self) -> None:
        state = self

        class Events(txredisapi.SubscriberProtocol):
            def connectionMade(self) -> Any:
                _no_delay(self.transport)
                d = super().connectionMade()
                self.whenConnected().addCallback(self._on_ready)
                return d

            def _on_ready(self, _: object) -> None:
                d = self.subscribe(state.channel)
                d.addCallback(lambda _: state._events_ready())
                d.addErrback(lambda f: log.failure("redis: subscribe failed", f))

            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                state._event(message)

        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = Events
        factory.password = self.password
        factory.maxDelay = 1.0
        factory.initialDelay = 0.2
        factory.startConnecting(txredisapi._makeEndpoint(self.host, self.port, self.timeout))
        self._events = factory

    @property
    def up(self) -> bool:
        """Whether a connection to Redis is open now (the hot path asks before waiting)."""
        return self.redis is not None and self.redis._factory.size > 0

    def _call(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return d.addTimeout(self.timeout, self.reactor)

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        """EVALSHA (the script's digest is computed once), EVAL when Redis does not know
        the script yet (first use, or after a Redis restart)."""
        sha = _SHA1.get(script)
        if sha is None:
            sha = _SHA1[script] = hashlib.sha1(script.encode()).hexdigest()
        redis = self.redis
        d = redis.evalsha(sha, keys, args)

        def unknown(reason: Failure) -> Any:
            reason.trap(txredisapi.ScriptDoesNotExist)
            return redis.eval(script, keys, args)

        return self._call(d.addErrback(unknown))

    # -- opening -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def open(self) -> Any:
        self._connect()
        outcome: list[Any] = []
        self.redis._connected.addBoth(outcome.append)
        ticks = 0
        while not outcome:
            # a process started before Redis comes up when Redis does; until then it
            # knows no account and refuses every request (see the accounts plugin)
            yield task.deferLater(self.reactor, 0.1, lambda: None)
            ticks += 1
            if ticks % 50 == 0:
                log.warn(
                    "redis: waiting for {where} before loading the state ({s}s)",
                    where=f"{self.host}:{self.port}",
                    s=ticks // 10,
                )
        if isinstance(outcome[0], Failure):
            raise RuntimeError(f"redis: cannot connect: {outcome[0].getErrorMessage()}")
        raw_accounts = yield self._call(self.redis.hgetall(PREFIX + "accounts"))
        raw_keys = yield self._call(self.redis.hgetall(PREFIX + "keys"))
        totals = yield self.fetch_totals()
        accounts = tuple(account_from_json(v) for _, v in sorted(raw_accounts.items()))
        keys = tuple(key_from_json(v) for _, v in sorted(raw_keys.items()))
        self.spool.adopt_orphans()
        self._subscribe()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.flush_interval, now=False)
        log.info(
            "state: Redis {url}, instance {instance}; {n} accounts, {k} runtime keys",
            url=f"redis://{self.host}:{self.port}/{self.db}",
            instance=self.instance,
            n=len(accounts),
            k=len(keys),
        )
        return Snapshot(accounts, keys, totals)

    @defer.inlineCallbacks
    def fetch_totals(self) -> Any:
        """Every account's running totals, as the ledger in Redis has them."""
        raw = yield self._call(self.redis.hgetall(PREFIX + "totals"))
        totals: dict[str, AccountTotals] = {}
        for name, value in raw.items():
            account_id, _, what = name.rpartition("|")
            t = totals.setdefault(account_id, AccountTotals())
            if what == "cost_usd":
                t.cost_usd = float(value)
            elif what in ("requests", "prompt_tokens", "completion_tokens"):
                setattr(t, what, int(value))
        return totals

    @defer.inlineCallbacks
    def key_states(self) -> Any:
        """Every key state announced so far (for a process that starts or reconnects)."""
        raw = yield self._call(self.redis.hgetall(PREFIX + "keystate"))
        return {k: json.loads(v) for k, v in raw.items()}

    # -- events --------------------------------------------------------------------------

    def _events_ready(self) -> None:
        if self.listener is not None:
            self.listener.resync()

    def _event(self, message: Any) -> None:
        try:
            doc = json.loads(message)
            if doc.get("from") == self.boot or self.listener is None:
                return
            kind = doc["t"]
            if kind == "account":
                v = doc.get("v")
                self.listener.account_event(doc["id"], account_from_json(v) if v else None)
            elif kind == "key":
                v = doc.get("v")
                self.listener.key_event(doc["id"], key_from_json(v) if v else None)
            elif kind == "keystate":
                self.listener.key_state_event(doc["id"], doc["v"])
            elif kind == "budget":
                self.listener.budget_event(doc["id"], doc["v"])
        except Exception:
            log.failure("redis: could not apply an event")

    def _announce(self, kind: str, ident: str, hash_name: str | None, value: Any) -> None:
        text = value if isinstance(value, str) or value is None else json.dumps(value)
        message = json.dumps({"t": kind, "id": ident, "v": value, "from": self.boot})
        self._ops.pop((kind, ident), None)
        if hash_name is None:
            self._ops[(kind, ident)] = ("publish", [self.channel], [message])
        else:
            self._ops[(kind, ident)] = (
                "announce",
                [PREFIX + hash_name],
                [ident, text or "", self.channel, message],
            )
        self._kick()

    def publish_key_state(self, key_id: str, state: dict[str, Any]) -> None:
        """A key's cooldown or disabled state changed here: tell the others, keep it."""
        self._announce("keystate", key_id, "keystate", state)

    def publish_budget(self, name: str, data: dict[str, Any]) -> None:
        self._announce("budget", name, None, data)

    # -- writes --------------------------------------------------------------------------

    def save_account(self, account: Account) -> None:
        self._announce("account", account.id, "accounts", account_json(account))

    def delete_account(self, account_id: str) -> None:
        self._announce("account", account_id, "accounts", None)

    def save_key(self, key: StoredKey) -> None:
        self._announce("key", key.id, "keys", key_json(key))

    def delete_key(self, key_id: str) -> None:
        self._announce("key", key_id, "keys", None)

    def _push(self, text: str) -> None:
        self._seq += 1
        self._queue.append((self.boot, self._seq, text))
        self._kick()

    def append(self, row: LedgerRow) -> None:
        self._push(row_item(row))

    def settle(
        self, account_id: str, uid: str, cost: float, second: int | None, delta: int
    ) -> None:
        """After a request: release its reservation ``uid`` (if made in Redis), add its
        cost to the account's spending and correct its token estimate; sent with the
        ledger rows, never waited for."""
        self._push(settle_item(account_id, uid, cost, second, delta))

    def pending(self) -> int:
        return len(self._queue) + self.spool.count

    # -- admission -----------------------------------------------------------------------

    def admit(
        self,
        account: Account,
        tokens: int,
        credit: float | None,
        cost: float,
        uid: str,
        now: float,
    ) -> defer.Deferred[Admission]:
        """Check and count one request of ``account`` (one round trip)."""
        a = account.id
        packed = (
            f"{now!r} {a} {account.rpm} {account.tpm} {tokens} "
            f"{'-' if credit is None else repr(float(credit))} {float(cost)!r} {uid} {HOLD_TTL}"
        )
        d = self._eval(
            ADMIT,
            [
                PREFIX + "rpm:" + a,
                PREFIX + "tpm:" + a,
                PREFIX + "held:" + a,
                PREFIX + "spent",
            ],
            [packed],
        )

        def parse(text: str) -> Admission:
            r = text.split(" ")
            return Admission(
                r[0], float(r[1]), int(r[2]), float(r[3]), int(r[4]), float(r[5]), int(r[6])
            )

        return d.addCallback(parse)

    # -- the flusher ---------------------------------------------------------------------

    def _kick(self) -> None:
        if self._flushing is None and self._loop is not None:
            self.reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        if self._flushing is None and (self._ops or self._queue or self.spool):
            self.flush().addErrback(lambda f: log.failure("redis: flush failed", f))

    def flush(self) -> defer.Deferred[None]:
        """Send everything queued (and spooled); fires when it is in Redis, or spooled."""
        if self._flushing is not None:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        d = self._flushing = defer.ensureDeferred(self._flush())

        def done(result: Any) -> Any:
            self._flushing = None
            waiters, self._waiters = self._waiters, []
            if waiters:
                again = self.flush()
                for w in waiters:
                    again.addBoth(_release, w)
            return result

        return d.addBoth(done)

    async def _flush(self) -> None:
        while self._ops:
            if not self.up:
                break
            ident = next(iter(self._ops))
            op = self._ops[ident]
            kind, keys, args = op
            try:
                if kind == "publish":
                    await self._call(self.redis.publish(keys[0], args[0]))
                else:
                    await self._eval(ANNOUNCE, keys, args)
            except Exception as e:
                self._went_down(e)
                break
            if self._ops.get(ident) is op:
                del self._ops[ident]
        while self.spool or self._queue:
            if not self.up:
                self._went_down(None)
                return
            from_spool = bool(self.spool)
            batch = self.spool.peek(BATCH) if from_spool else self._batch()
            if not batch:
                return
            try:
                await self._eval(
                    LEDGER,
                    [PREFIX + "ledger", PREFIX + "hwm", PREFIX + "totals", PREFIX + "spent"],
                    [PREFIX, batch[0][0]] + [f"{seq}\t{text}" for _, seq, text in batch],
                )
            except Exception as e:
                self._went_down(e)
                return
            if self.down_since is not None:
                log.info("redis: reachable again; ledger items sent")
                self.down_since = None
            if from_spool:
                self.spool.consume(len(batch))
            else:
                del self._queue[: len(batch)]

    def _batch(self) -> list[tuple[str, int, str]]:
        return self._queue[:BATCH]

    def _went_down(self, error: Exception | None) -> None:
        """Redis did not answer: keep the ledger items on disk until it does."""
        if self.down_since is None:
            self.down_since = self.reactor.seconds()
            log.warn(
                "redis: unreachable ({error}); spooling ledger rows to {path}",
                error=type(error).__name__ if error is not None else "not connected",
                path=self.spool.path,
            )
        queued, self._queue = self._queue, []
        try:
            self.spool.write(queued)
        except OSError as e:
            self._queue[:0] = queued
            log.error("redis: cannot write the spool {path}: {e}", path=self.spool.path, e=e)

    # -- reads ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _rows(self, since: float | None) -> Any:
        try:
            yield self.flush()
        except Exception:
            pass
        start = "-" if since is None else str(max(0, int((since - SKEW) * 1000)))
        rows: list[LedgerRow] = []
        while True:
            chunk = yield self._call(
                self.redis.execute_command(
                    "XRANGE", PREFIX + "ledger", start, "+", "COUNT", SCAN_CHUNK
                )
            )
            for _entry_id, fields in chunk:
                data = dict(zip(fields[::2], fields[1::2], strict=True))
                rows.append(row_from_item(data["d"]))
            if len(chunk) < SCAN_CHUNK:
                return rows
            start = "(" + chunk[-1][0]

    def query(
        self, account_id: str | None, since: float | None, until: float | None
    ) -> defer.Deferred[list[LedgerRow]]:
        from yugongd.state import _select

        d = self._rows(since)
        return d.addCallback(lambda rows: list(_select(rows, account_id, since, until)))

    def summarize(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> defer.Deferred[list[UsageLine]]:
        """Ledger totals per account and model (exact: every row of every process is
        counted once). Over whole UTC days (the billing endpoints, ``/admin/usage``
        without ``since``/``until`` or with dates) they are read from the per-day totals
        the ledger script keeps; otherwise the rows are read from the stream."""
        if all(t is None or t % DAY == 0 for t in (since, until)):
            return defer.ensureDeferred(self._summarize_days(account_id, since, until, by_day))
        return self.query(account_id, since, until).addCallback(summarize_rows, by_day)

    async def _summarize_days(
        self, account_id: str | None, since: float | None, until: float | None, by_day: bool
    ) -> list[UsageLine]:
        try:
            await self.flush()
        except Exception:
            pass
        r = self.redis
        low = "-inf" if since is None else str(int(since))
        high = "+inf" if until is None else f"({int(until)}"
        pairs: list[tuple[int, str]] = []
        if account_id is not None:
            days = await self._call(
                r.execute_command("ZRANGEBYSCORE", PREFIX + "days:" + account_id, low, high)
            )
            pairs = [(int(d), account_id) for d in days]
        else:
            days = await self._call(r.execute_command("ZRANGEBYSCORE", PREFIX + "days", low, high))
            members = await defer.gatherResults(
                [self._call(r.smembers(f"{PREFIX}dayaccounts:{d}")) for d in days],
                consumeErrors=True,
            )
            pairs = [
                (int(d), a) for d, accounts in zip(days, members, strict=True) for a in accounts
            ]
        tables = await defer.gatherResults(
            [self._call(r.hgetall(f"{PREFIX}daily:{d}:{a}")) for d, a in pairs],
            consumeErrors=True,
        )
        groups: dict[tuple[str, str | None, int | None], list[float]] = {}
        for (day, account), table in zip(pairs, tables, strict=True):
            for name, value in table.items():
                model_field, _, metric = name.rpartition("\t")
                model = None if model_field == "-" else model_field[1:]
                key = (account, model, day if by_day else None)
                t = groups.setdefault(key, [0, 0, 0, 0.0, 0])
                t[_METRICS[metric]] += float(value)
        lines = [
            UsageLine(a, m, d, int(t[0]), int(t[1]), int(t[2]), t[3], int(t[4]))
            for (a, m, d), t in groups.items()
        ]
        lines.sort(key=lambda u: (u.day or 0, u.account_id, u.model or ""))
        return lines

    # -- closing -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def close(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._queue or self._ops:
            try:
                yield self.flush()
            except Exception:
                pass
        if self._queue:
            self.spool.write(self._queue)
            self._queue = []
        if self._events is not None:
            try:
                yield self._events.disconnect()
            except Exception:
                pass
        if self.redis is not None:
            try:
                yield self.redis.disconnect()
            except Exception:
                pass
        self.spool.close()


# -- migration ---------------------------------------------------------------------------


async def migrate(
    sqlite_path: str, redis_url: str, reactor: Any, out: Callable[[str], None]
) -> int:
    """Copy the SQLite state (accounts, runtime keys, every ledger row) into Redis.

    Rows are numbered by their position under a boot id derived from the database's path,
    so running the migration twice copies nothing twice.
    """
    import hashlib

    from yugongd.sqlite import SQLiteState

    source = SQLiteState(sqlite_path, reactor)
    snapshot = await source.open()
    rows = await source.query(None, None, None)
    await source.close()
    target = RedisState(redis_url, reactor, ClusterConfig(timeout=10.0))
    target._connect()
    await target.redis._connected.addTimeout(10, reactor)
    r = target.redis
    for account in snapshot.accounts:
        await target._call(r.hset(PREFIX + "accounts", account.id, account_json(account)))
    for key in snapshot.keys:
        await target._call(r.hset(PREFIX + "keys", key.id, key_json(key)))
    boot = "migrate." + hashlib.sha256(os.path.abspath(sqlite_path).encode()).hexdigest()[:12]
    items: list[str] = []
    seq = 0
    for row in rows:
        seq += 1
        items.append(f"{seq}\t{row_item(row)}")
        seq += 1
        items.append(f"{seq}\t{settle_item(row.account_id, '', row.cost_usd, None, 0)}")
    applied = 0
    for i in range(0, len(items), BATCH):
        n = await target._eval(
            LEDGER,
            [PREFIX + "ledger", PREFIX + "hwm", PREFIX + "totals", PREFIX + "spent"],
            [PREFIX, boot] + items[i : i + BATCH],
        )
        applied += int(n)
    await r.disconnect()
    out(
        f"migrated {sqlite_path} -> {redis_url}: {len(snapshot.accounts)} accounts, "
        f"{len(snapshot.keys)} runtime keys, {len(rows)} ledger rows "
        f"({applied // 2} new, {len(rows) - applied // 2} already there)"
    )
    return 0
