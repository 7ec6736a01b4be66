"""The configuration file: YAML in, frozen attrs objects out.

Everything an operator can get wrong is caught here, once, with one line that names the file, the
key path and the problem (``etc/y.yaml: upstreams[0].keys[1].rpm: expected an integer, got 'abc'``).
Nothing past this module sees a raw dict.

Rules that apply everywhere:

- ``${NAME}`` inside any string value is replaced by the environment variable ``NAME``; an unset
  variable is an error at that key path.  Expansion applies to string-typed values only, so numbers
  must be YAML numbers.
- Unknown keys are errors (with a "did you mean" hint).
- A key whose value is ``null`` (or left empty, ``key:``) counts as absent and takes its default; a
  required key that is absent is an error (``upstreams[0].base_url: is required``).
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml
from attrs import field, frozen

__all__ = [
    "ACCESS_LOG_FORMATS",
    "AccessLogConfig",
    "AccountConfig",
    "AdminConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "FailoverConfig",
    "KeyConfig",
    "LimitsConfig",
    "PluginsConfig",
    "PoolConfig",
    "Price",
    "STRATEGIES",
    "Timeouts",
    "UpstreamConfig",
    "default_config",
    "load_config",
    "parse_config",
]

STRATEGIES = ("least-loaded", "round-robin", "weighted", "random")
ACCESS_LOG_FORMATS = ("text", "json")
REDIS_OUTAGE_CHOICES = ("local", "reject")
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
DEFAULT_STATE = "sqlite:yugongd.db"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULTS_SOURCE = "<defaults>"


class ConfigError(Exception):
    """A problem with the configuration, located by file and key path.

    :param source: the file's path, or ``<defaults>``.
    :param keypath: where in the file, e.g. ``upstreams[0].keys[1].rpm``; ``""`` for the whole file.
    :param message: what is wrong, in words an operator can act on.
    """

    def __init__(self, source: str, keypath: str, message: str) -> None:
        super().__init__(source, keypath, message)
        self.source = source
        self.keypath = keypath
        self.message = message

    def __str__(self) -> str:
        if self.keypath:
            return f"{self.source}: {self.keypath}: {self.message}"
        return f"{self.source}: {self.message}"


@frozen
class Timeouts:
    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 300.0


@frozen
class KeyConfig:
    id: str
    key: str = field(repr=False)  # never in a repr, a log line or a traceback
    organization: str | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] = ("*",)


@frozen
class UpstreamConfig:
    name: str
    base_url: str
    timeouts: Timeouts = Timeouts()
    models: tuple[str, ...] = ("*",)
    keys: tuple[KeyConfig, ...] = ()


@frozen
class PoolConfig:
    strategy: str = "least-loaded"
    cooldown: float = 20.0
    max_cooldown: float = 600.0
    queue_timeout: float = 10.0
    probe_interval: float = 600.0


@frozen
class FailoverConfig:
    attempts: int = 3


@frozen
class Price:
    input: float | None = None
    output: float | None = None
    request: float | None = None


@frozen
class AccountConfig:
    name: str
    key: str = field(repr=False)
    models: tuple[str, ...] = ("*",)
    rpm: int = 0
    tpm: int = 0
    credit_usd: float | None = None
    expires: datetime.datetime | None = None
    ip_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    enabled: bool = True


@frozen
class AdminConfig:
    token: str | None = field(default=None, repr=False)


@frozen
class LimitsConfig:
    max_body: int = 33554432
    #: seconds a client connection may send nothing while no request is in progress
    idle_timeout: float = 60.0
    #: seconds from a request's first byte until its headers must be complete
    header_timeout: float = 20.0
    #: open client connections per listener; past it the longest-idle one is closed
    max_connections: int = 4096


@frozen
class AccessLogConfig:
    """One line per request through twisted.logger (see :mod:`yugongd.accesslog`)."""

    enabled: bool = True
    format: str = "text"


@frozen
class PluginsConfig:
    dirs: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()


@frozen
class ClusterConfig:
    """Cluster mode (``state: "redis://…"``): what this process calls itself, where it spools
    ledger rows while Redis is unreachable, and what admission does meanwhile.

    :param redis_outage: ``"local"``: keep serving on this process's own limits and credit
        view; ``"reject"``: answer 503 ``state_unavailable`` to requests of accounts with
        limits or credit until Redis is back.
    :param instance: this process's name in ``/metrics`` and logs; default ``<host>-<pid>``.
    """

    redis_outage: str = "local"
    instance: str | None = None
    spool_dir: str = "."
    timeout: float = 1.0


@frozen
class Config:
    source: str
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    state: str = DEFAULT_STATE
    shutdown_grace: float = 30.0
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    pool: PoolConfig = PoolConfig()
    failover: FailoverConfig = FailoverConfig()
    prices: Mapping[str, Price] = field(factory=dict)
    accounts: tuple[AccountConfig, ...] = ()
    plugins: PluginsConfig = PluginsConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    cluster: ClusterConfig = ClusterConfig()
    notes: tuple[str, ...] = ()


def parse_redis_url(url: str) -> tuple[str, int, int, str | None]:
    """``redis://[:password@]host[:port][/db]`` as ``(host, port, db, password)``.

    :raises ValueError: with a message that says what is wrong.
    """
    parts = urlsplit(url)
    # the password never appears in a message
    shown = url.replace(f":{parts.password}@", ":…@") if parts.password else url
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"expected 'redis://host:port/db', got {shown!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in {shown!r}") from None
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"the database in {shown!r} must be a number, like redis://host:6379/0")
    if parts.query or parts.fragment:
        raise ValueError(f"no query or fragment expected in {shown!r}")
    return parts.hostname, port, int(db_text), parts.password


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at *path*.

    :raises ConfigError: the file is missing, unreadable, not YAML, or not a valid config.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(path, "", f"cannot read the file: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, path, environ)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        where = e.problem_mark
        problem = e.problem or e.context or "syntax error"
        if where is not None:
            return f"{problem} (line {where.line + 1}, column {where.column + 1})"
        return problem
    # e.g. a ReaderError (a control character) spans lines: the error is one line
    return " ".join(str(e).split())


def parse_config(data: object, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate *data* (the object YAML loaded from *source*) into a :class:`Config`.

    :raises ConfigError: at the first problem found.
    """
    r = _Reader(source, os.environ if environ is None else environ)
    if data is None:
        data = {}
    top = r.section(data, "", _TOP_KEYS)

    listen = r.listen(top.get("listen"), "listen")
    state = r.state(top.get("state"), "state")
    shutdown_grace = r.number(top.get("shutdown_grace"), "shutdown_grace", 30.0, minimum=0.0)

    admin = AdminConfig()
    if (v := top.get("admin")) is not None:
        s = r.section(v, "admin", ("token",))
        admin = AdminConfig(token=r.opt_str(s.get("token"), s.path("token"), nonempty=True))

    limits = LimitsConfig()
    if (v := top.get("limits")) is not None:
        s = r.section(
            v, "limits", ("max_body", "idle_timeout", "header_timeout", "max_connections")
        )
        limits = LimitsConfig(
            max_body=r.integer(s.get("max_body"), s.path("max_body"), 33554432, minimum=1),
            idle_timeout=r.number(s.get("idle_timeout"), s.path("idle_timeout"), 60.0, above=0),
            header_timeout=r.number(
                s.get("header_timeout"), s.path("header_timeout"), 20.0, above=0
            ),
            max_connections=r.integer(
                s.get("max_connections"), s.path("max_connections"), 4096, minimum=1
            ),
        )

    raw_upstreams = top.get("upstreams")
    if raw_upstreams is None:
        r.fail("upstreams", "is required")
    upstreams = r.upstreams(raw_upstreams, "upstreams")

    pool = r.pool(top.get("pool"), "pool")

    failover = FailoverConfig()
    if (v := top.get("failover")) is not None:
        s = r.section(v, "failover", ("attempts",))
        failover = FailoverConfig(
            attempts=r.integer(s.get("attempts"), s.path("attempts"), 3, minimum=1)
        )

    prices = r.prices(top.get("prices"), "prices")
    accounts = r.accounts(top.get("accounts"), "accounts")

    plugins = PluginsConfig()
    if (v := top.get("plugins")) is not None:
        s = r.section(v, "plugins", ("dirs", "disable"))
        plugins = PluginsConfig(
            dirs=r.str_list(s.get("dirs"), s.path("dirs"), ()),
            disable=r.str_list(s.get("disable"), s.path("disable"), ()),
        )

    access_log = r.access_log(top.get("access_log"), "access_log")
    cluster = r.cluster(top.get("cluster"), "cluster")

    notes: list[str] = []
    if not any(u.keys for u in upstreams):
        notes.append(
            f"no upstream keys in {source}: requests will get 503 until keys are added "
            "through the admin API"
        )

    return Config(
        source=source,
        listen=listen,
        state=state,
        shutdown_grace=shutdown_grace,
        admin=admin,
        limits=limits,
        upstreams=upstreams,
        pool=pool,
        failover=failover,
        prices=prices,
        accounts=accounts,
        plugins=plugins,
        access_log=access_log,
        cluster=cluster,
        notes=tuple(notes),
    )


def default_config(environ: Mapping[str, str] | None = None) -> Config:
    """The embedded defaults used when the daemon is started without ``--config``.

    One upstream ``openai`` at ``$OPENAI_BASE_URL`` (default the OpenAI API) with the keys in
    ``$OPENAI_API_KEY`` (comma-separated).  With no keys the daemon still starts, so that keys can
    be added through the admin API; the notes say so.

    :raises ConfigError: ``OPENAI_BASE_URL`` is not an http(s) URL.
    """
    env = os.environ if environ is None else environ
    r = _Reader(DEFAULTS_SOURCE, env)
    raw_url = env.get("OPENAI_BASE_URL", "").strip()
    base_url = r.url(raw_url, "OPENAI_BASE_URL") if raw_url else DEFAULT_BASE_URL
    secrets = [part.strip() for part in env.get("OPENAI_API_KEY", "").split(",")]
    keys = tuple(
        KeyConfig(id=f"openai-{i}", key=secret)
        for i, secret in enumerate((s for s in secrets if s), start=1)
    )
    upstream = UpstreamConfig(name="openai", base_url=base_url, keys=keys)

    notes = [
        "no --config given: using the embedded defaults",
        f"listening on {DEFAULT_LISTEN}",
        f"state: {DEFAULT_STATE} (relative to the working directory)",
        f"upstream 'openai': {base_url}" + (" (from OPENAI_BASE_URL)" if raw_url else ""),
    ]
    token = env.get("YUGONGD_ADMIN_TOKEN", "").strip() or None
    if keys:
        n = len(keys)
        notes.append(f"{n} upstream key{'s' if n != 1 else ''} from OPENAI_API_KEY")
    else:
        notes.append(
            "OPENAI_API_KEY is not set: no upstream keys, requests will get 503 until keys "
            "are added"
            + (" through the admin API" if token else " (set OPENAI_API_KEY, or a config file)")
        )
    notes.append(
        "admin API: on (token from YUGONGD_ADMIN_TOKEN)"
        if token
        else "admin API: off (set YUGONGD_ADMIN_TOKEN to turn it on)"
    )
    return Config(
        source=DEFAULTS_SOURCE,
        upstreams=(upstream,),
        admin=AdminConfig(token=token),
        notes=tuple(notes),
    )


# --- validation machinery ---------------------------------------------------------------------

_TOP_KEYS = (
    "listen",
    "state",
    "shutdown_grace",
    "admin",
    "limits",
    "upstreams",
    "pool",
    "failover",
    "prices",
    "accounts",
    "plugins",
    "access_log",
    "cluster",
)
_CLUSTER_KEYS = ("redis_outage", "instance", "spool_dir", "timeout")
_UPSTREAM_KEYS = ("name", "base_url", "timeouts", "models", "keys")
_KEY_KEYS = ("id", "key", "organization", "weight", "rpm", "tpm", "models")
_POOL_KEYS = ("strategy", "cooldown", "max_cooldown", "queue_timeout", "probe_interval")
_ACCOUNT_KEYS = (
    "name",
    "key",
    "models",
    "rpm",
    "tpm",
    "credit_usd",
    "expires",
    "ip_allow",
    "enabled",
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

N = TypeVar("N", int, float)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    """How a wrong value is shown in a message: short, never a whole nested structure."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _fmt(n: float) -> str:
    return repr(int(n)) if float(n).is_integer() else repr(n)


class _Section:
    """A mapping whose keys have been checked against the allowed names."""

    def __init__(self, data: Mapping[str, object], path: str) -> None:
        self._data = data
        self._path = path

    def get(self, key: str) -> object:
        return self._data.get(key)

    def path(self, key: str) -> str:
        return _join(self._path, key)


class _Reader:
    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(self.source, path, message)

    # -- shapes --

    def section(self, value: object, path: str, allowed: Iterable[str]) -> _Section:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_describe(value)}")
        allowed = tuple(allowed)
        data: dict[str, object] = {}
        for k, v in value.items():
            name = str(k)
            if not isinstance(k, str) or name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(path, f"unknown key {name!r}{hint}")
            if v is not None:
                data[name] = v
        return _Section(data, path)

    def items(self, value: object, path: str) -> list[tuple[str, object]]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_describe(value)}")
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]

    # -- scalars --

    def string(self, value: object, path: str, *, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_describe(value)}")
        result = self.expand(value, path)
        if nonempty and not result.strip():
            self.fail(path, "must not be empty")
        return result

    def required_str(self, section: _Section, key: str) -> str:
        value = section.get(key)
        if value is None:
            self.fail(section.path(key), "is required")
        return self.string(value, section.path(key))

    def opt_str(self, value: object, path: str, *, nonempty: bool = True) -> str | None:
        return None if value is None else self.string(value, path, nonempty=nonempty)

    def expand(self, value: str, path: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.environ:
                self.fail(path, f"environment variable {name} is not set")
            return self.environ[name]

        return _ENV_REF.sub(sub, value)

    def _bounded(
        self,
        n: N,
        path: str,
        minimum: float | None,
        above: float | None,
    ) -> N:
        if above is not None and not n > above:
            self.fail(path, f"must be greater than {_fmt(above)}, got {_fmt(n)}")
        if minimum is not None and n < minimum:
            if minimum == 0:
                self.fail(path, f"must not be negative, got {_fmt(n)}")
            self.fail(path, f"must be at least {_fmt(minimum)}, got {_fmt(n)}")
        return n

    def number(
        self,
        value: object,
        path: str,
        default: float,
        *,
        minimum: float | None = None,
        above: float | None = None,
    ) -> float:
        n = self.opt_number(value, path, minimum=minimum, above=above)
        return default if n is None else n

    def opt_number(
        self,
        value: object,
        path: str,
        *,
        minimum: float | None = None,
        above: float | None = None,
    ) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number, got {_describe(value)}")
        n = float(value)
        if n != n or n in (float("inf"), float("-inf")):
            self.fail(path, f"expected a finite number, got {_describe(value)}")
        return self._bounded(n, path, minimum, above)

    def integer(self, value: object, path: str, default: int, *, minimum: int | None = None) -> int:
        n = self.opt_integer(value, path, minimum=minimum)
        return default if n is None else n

    def opt_integer(self, value: object, path: str, *, minimum: int | None = None) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_describe(value)}")
        return self._bounded(value, path, minimum, None)

    def boolean(self, value: object, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_describe(value)}")
        return value

    def str_list(
        self, value: object, path: str, default: tuple[str, ...], *, nonempty: bool = False
    ) -> tuple[str, ...]:
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(path, f"expected a list of strings, got {_describe(value)}")
        if nonempty and not value:
            self.fail(path, "must not be an empty list")
        return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(value))

    def models(self, value: object, path: str) -> tuple[str, ...]:
        if isinstance(value, list) and not value:
            self.fail(path, 'must list at least one model pattern (use ["*"] for all models)')
        return self.str_list(value, path, ("*",))

    # -- specific values --

    def listen(self, value: object, path: str) -> tuple[str, ...]:
        if value is None:
            return (DEFAULT_LISTEN,)
        if isinstance(value, str):
            return (self.endpoint(value, path),)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(
                path,
                f"expected an endpoint string or a list of them, got {_describe(value)}",
            )
        if not value:
            self.fail(path, "must list at least one endpoint")
        return tuple(self.endpoint(v, f"{path}[{i}]") for i, v in enumerate(value))

    def endpoint(self, value: str, path: str) -> str:
        description = self.string(value, path)
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), description)
        except (IndexError, KeyError):
            # A systemd endpoint looks its socket up in LISTEN_FDS as it is parsed; outside a
            # socket-activated process (a config check, a test) there is none to find.
            if not description.startswith("systemd:"):
                self.fail(path, f"invalid endpoint {description!r}")
        except Exception as e:
            reason = str(e) or type(e).__name__
            self.fail(path, f"invalid endpoint {description!r}: {reason}")
        return description

    def state(self, value: object, path: str) -> str:
        if value is None:
            return DEFAULT_STATE
        s = self.string(value, path, nonempty=False)
        if s == "memory":
            return s
        if s.startswith("redis://"):
            try:
                parse_redis_url(s)
            except ValueError as e:
                self.fail(path, str(e))
            return s
        if s.startswith("sqlite:") and s[len("sqlite:") :].strip():
            return s
        self.fail(path, f"expected 'memory', 'sqlite:<path>' or 'redis://…', got {s!r}")

    def url(self, value: object, path: str) -> str:
        s = self.string(value, path)
        parts = urlsplit(s)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.fail(path, f"expected an http:// or https:// URL, got {s!r}")
        return s.rstrip("/")

    def expires(self, value: object, path: str) -> datetime.datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime.datetime):
            when = value
        elif isinstance(value, datetime.date):
            when = datetime.datetime(value.year, value.month, value.day)
        elif isinstance(value, str):
            s = self.string(value, path)
            try:
                when = datetime.datetime.fromisoformat(s.strip())
            except ValueError:
                self.fail(
                    path,
                    f"expected an ISO 8601 date-time like '2027-01-01T00:00:00Z', got {s!r}",
                )
        else:
            self.fail(
                path,
                f"expected an ISO 8601 date-time like '2027-01-01T00:00:00Z', "
                f"got {_describe(value)}",
            )
        if when.tzinfo is None:
            return when.replace(tzinfo=datetime.timezone.utc)
        return when.astimezone(datetime.timezone.utc)

    def networks(
        self, value: object, path: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        result = []
        for i, s in enumerate(self.str_list(value, path, ())):
            try:
                result.append(ipaddress.ip_network(s.strip(), strict=False))
            except ValueError:
                self.fail(f"{path}[{i}]", f"expected an IP address or CIDR network, got {s!r}")
        return tuple(result)

    # -- sections --

    def upstreams(self, value: object, path: str) -> tuple[UpstreamConfig, ...]:
        entries = self.items(value, path)
        if not entries:
            self.fail(path, "must list at least one upstream")
        names: dict[str, str] = {}
        key_ids: dict[str, str] = {}
        result = []
        for upath, raw in entries:
            s = self.section(raw, upath, _UPSTREAM_KEYS)
            name = self.required_str(s, "name")
            if name in names:
                self.fail(s.path("name"), f"duplicate upstream name {name!r} (also {names[name]})")
            names[name] = upath
            base_url = s.get("base_url")
            if base_url is None:
                self.fail(s.path("base_url"), "is required")
            keys = []
            if (raw_keys := s.get("keys")) is not None:
                for index, (kpath, raw_key) in enumerate(self.items(raw_keys, s.path("keys")), 1):
                    k = self.key(raw_key, kpath, f"{name}-{index}")
                    if k.id in key_ids:
                        self.fail(
                            _join(kpath, "id"), f"duplicate key id {k.id!r} (also {key_ids[k.id]})"
                        )
                    key_ids[k.id] = kpath
                    keys.append(k)
            result.append(
                UpstreamConfig(
                    name=name,
                    base_url=self.url(base_url, s.path("base_url")),
                    timeouts=self.timeouts(s.get("timeouts"), s.path("timeouts")),
                    models=self.models(s.get("models"), s.path("models")),
                    keys=tuple(keys),
                )
            )
        return tuple(result)

    def timeouts(self, value: object, path: str) -> Timeouts:
        if value is None:
            return Timeouts()
        s = self.section(value, path, ("connect", "first_byte", "idle"))
        return Timeouts(
            connect=self.number(s.get("connect"), s.path("connect"), 10.0, above=0),
            first_byte=self.number(s.get("first_byte"), s.path("first_byte"), 120.0, above=0),
            idle=self.number(s.get("idle"), s.path("idle"), 300.0, above=0),
        )

    def key(self, value: object, path: str, default_id: str) -> KeyConfig:
        s = self.section(value, path, _KEY_KEYS)
        secret = self.required_str(s, "key").strip()
        raw_id = s.get("id")
        return KeyConfig(
            id=default_id if raw_id is None else self.string(raw_id, s.path("id")),
            key=secret,
            organization=self.opt_str(s.get("organization"), s.path("organization")),
            weight=self.number(s.get("weight"), s.path("weight"), 1.0, above=0),
            rpm=self.opt_integer(s.get("rpm"), s.path("rpm"), minimum=0),
            tpm=self.opt_integer(s.get("tpm"), s.path("tpm"), minimum=0),
            models=self.models(s.get("models"), s.path("models")),
        )

    def access_log(self, value: object, path: str) -> AccessLogConfig:
        if value is None:
            return AccessLogConfig()
        s = self.section(value, path, ("enabled", "format"))
        fmt = "text"
        if (raw := s.get("format")) is not None:
            fmt = self.string(raw, s.path("format"))
            if fmt not in ACCESS_LOG_FORMATS:
                self.fail(
                    s.path("format"),
                    f"unknown format {fmt!r}; expected one of " + ", ".join(ACCESS_LOG_FORMATS),
                )
        return AccessLogConfig(
            enabled=self.boolean(s.get("enabled"), s.path("enabled"), True), format=fmt
        )

    def cluster(self, value: object, path: str) -> ClusterConfig:
        if value is None:
            return ClusterConfig()
        s = self.section(value, path, _CLUSTER_KEYS)
        outage = "local"
        if (raw := s.get("redis_outage")) is not None:
            outage = self.string(raw, s.path("redis_outage"))
            if outage not in REDIS_OUTAGE_CHOICES:
                self.fail(
                    s.path("redis_outage"),
                    f"unknown choice {outage!r}; expected one of "
                    + ", ".join(REDIS_OUTAGE_CHOICES),
                )
        instance = self.opt_str(s.get("instance"), s.path("instance"))
        if instance is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,64}", instance):
            self.fail(
                s.path("instance"),
                f"expected 1 to 64 letters, digits or '_.:@-', got {instance!r}",
            )
        spool_dir = self.opt_str(s.get("spool_dir"), s.path("spool_dir")) or "."
        return ClusterConfig(
            redis_outage=outage,
            instance=instance,
            spool_dir=spool_dir,
            timeout=self.number(s.get("timeout"), s.path("timeout"), 1.0, above=0),
        )

    def pool(self, value: object, path: str) -> PoolConfig:
        if value is None:
            return PoolConfig()
        s = self.section(value, path, _POOL_KEYS)
        strategy = "least-loaded"
        if (raw := s.get("strategy")) is not None:
            strategy = self.string(raw, s.path("strategy"))
            if strategy not in STRATEGIES:
                close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(
                    s.path("strategy"),
                    f"unknown strategy {strategy!r}{hint}; expected one of "
                    + ", ".join(STRATEGIES),
                )
        cooldown = self.number(s.get("cooldown"), s.path("cooldown"), 20.0, above=0)
        max_cooldown = self.number(s.get("max_cooldown"), s.path("max_cooldown"), 600.0, above=0)
        if max_cooldown < cooldown:
            self.fail(
                s.path("max_cooldown"),
                f"must be at least pool.cooldown ({_fmt(cooldown)}), got {_fmt(max_cooldown)}",
            )
        return PoolConfig(
            strategy=strategy,
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            queue_timeout=self.number(
                s.get("queue_timeout"), s.path("queue_timeout"), 10.0, minimum=0
            ),
            probe_interval=self.number(
                s.get("probe_interval"), s.path("probe_interval"), 600.0, above=0
            ),
        )

    def prices(self, value: object, path: str) -> dict[str, Price]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping of model names to prices, got {_describe(value)}")
        result: dict[str, Price] = {}
        for model, raw in value.items():
            if not isinstance(model, str) or not model.strip():
                self.fail(path, f"expected model names as keys, got {_describe(model)}")
            ppath = _join(path, model)
            s = self.section({} if raw is None else raw, ppath, ("input", "output", "request"))
            price = Price(
                input=self.opt_number(s.get("input"), s.path("input"), minimum=0),
                output=self.opt_number(s.get("output"), s.path("output"), minimum=0),
                request=self.opt_number(s.get("request"), s.path("request"), minimum=0),
            )
            if price == Price():
                self.fail(ppath, "needs at least one of 'input', 'output', 'request'")
            result[model] = price
        return result

    def accounts(self, value: object, path: str) -> tuple[AccountConfig, ...]:
        if value is None:
            return ()
        names: dict[str, str] = {}
        secrets: dict[str, str] = {}
        result = []
        for apath, raw in self.items(value, path):
            s = self.section(raw, apath, _ACCOUNT_KEYS)
            name = self.required_str(s, "name")
            if name in names:
                self.fail(s.path("name"), f"duplicate account name {name!r} (also {names[name]})")
            names[name] = apath
            secret = self.required_str(s, "key").strip()
            if secret in secrets:
                # The key itself is never echoed: the message names the other entry instead.
                self.fail(s.path("key"), f"same key as {secrets[secret]}")
            secrets[secret] = s.path("key")
            result.append(
                AccountConfig(
                    name=name,
                    key=secret,
                    models=self.models(s.get("models"), s.path("models")),
                    rpm=self.integer(s.get("rpm"), s.path("rpm"), 0, minimum=0),
                    tpm=self.integer(s.get("tpm"), s.path("tpm"), 0, minimum=0),
                    credit_usd=self.opt_number(
                        s.get("credit_usd"), s.path("credit_usd"), minimum=0
                    ),
                    expires=self.expires(s.get("expires"), s.path("expires")),
                    ip_allow=self.networks(s.get("ip_allow"), s.path("ip_allow")),
                    enabled=self.boolean(s.get("enabled"), s.path("enabled"), True),
                )
            )
        return tuple(result)
