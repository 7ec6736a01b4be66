"""The config loader: whole parsed objects, defaults, ${VAR} expansion, the embedded defaults,
and every error message an operator can meet (file name and key path included)."""

from __future__ import annotations

import datetime
import ipaddress
import textwrap
from pathlib import Path

import pytest
import yaml

from yugongd.config import (
    AccessLogConfig,
    AccountConfig,
    AdminConfig,
    Config,
    ConfigError,
    FailoverConfig,
    KeyConfig,
    LimitsConfig,
    PluginsConfig,
    PoolConfig,
    Price,
    Timeouts,
    UpstreamConfig,
    default_config,
    load_config,
    parse_config,
)

ROOT = Path(__file__).parent.parent
UTC = datetime.timezone.utc

FULL = """\
listen:
  - "tcp:8080:interface=127.0.0.1"
  - "unix:/tmp/yugongd-test.sock"
state: "sqlite:/var/lib/yugongd/state.db"
shutdown_grace: 5
admin:
  token: "${ADMIN_TOKEN}"
limits:
  max_body: 1048576
upstreams:
  - name: openai
    base_url: "https://api.openai.com/v1/"
    timeouts: {connect: 5, first_byte: 60.5, idle: 100}
    models: ["gpt-*"]
    keys:
      - id: main-1
        key: "${KEY_1}"
        organization: "org-a"
        weight: 2
        rpm: 3500
        tpm: 2000000
        models: ["gpt-4o*", "gpt-4.1*"]
      - key: "sk-plain"
  - name: azure
    base_url: "http://localhost:9000"
    keys:
      - key: "prefix-${KEY_2}-suffix"
pool:
  strategy: weighted
  cooldown: 5
  max_cooldown: 60
  queue_timeout: 0
  probe_interval: 30
failover:
  attempts: 5
prices:
  gpt-4o-mini: {input: 0.15, output: 0.60}
  "gpt-4o*": {input: 2.5}
  whisper-1: {request: 0.006}
accounts:
  - name: demo
    key: "sk-demo-0123456789"
    models: ["gpt-4o-mini", "text-embedding-3-*"]
    rpm: 60
    tpm: 100000
    credit_usd: 5
    expires: "2027-01-01T00:00:00Z"
    ip_allow: ["10.0.0.0/8", "192.168.1.7", "2001:db8::1/64"]
    enabled: false
  - name: other
    key: "sk-other"
    expires: 2026-06-30 12:00:00+02:00
plugins:
  dirs: ["plugins", "/opt/yugongd/plugins"]
  disable: ["max_tokens_cap"]
access_log:
  enabled: false
  format: json
"""

ENV = {"ADMIN_TOKEN": "s3cret", "KEY_1": "sk-one", "KEY_2": "two"}

MINIMAL = {"upstreams": [{"name": "openai", "base_url": "https://api.openai.com/v1"}]}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "y.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def parse(data: object, environ: dict[str, str] | None = None) -> Config:
    return parse_config(data, "y.yaml", environ if environ is not None else {})


def error(data: object, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, environ)
    return str(info.value)


def with_upstream(**extra: object) -> dict[str, object]:
    """A minimal valid config plus top-level *extra* keys."""
    return {**MINIMAL, **extra}


def upstream(**fields: object) -> dict[str, object]:
    return {"upstreams": [{"name": "u", "base_url": "http://h", **fields}]}


def account(**fields: object) -> dict[str, object]:
    return with_upstream(accounts=[{"name": "a", "key": "k", **fields}])


# --- whole objects ------------------------------------------------------------------------------


def test_full_example(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert load_config(path, ENV) == Config(
        source=path,
        listen=("tcp:8080:interface=127.0.0.1", "unix:/tmp/yugongd-test.sock"),
        state="sqlite:/var/lib/yugongd/state.db",
        shutdown_grace=5.0,
        admin=AdminConfig(token="s3cret"),
        limits=LimitsConfig(max_body=1048576),
        upstreams=(
            UpstreamConfig(
                name="openai",
                base_url="https://api.openai.com/v1",
                timeouts=Timeouts(connect=5.0, first_byte=60.5, idle=100.0),
                models=("gpt-*",),
                keys=(
                    KeyConfig(
                        id="main-1",
                        key="sk-one",
                        organization="org-a",
                        weight=2.0,
                        rpm=3500,
                        tpm=2000000,
                        models=("gpt-4o*", "gpt-4.1*"),
                    ),
                    KeyConfig(id="openai-2", key="sk-plain"),
                ),
            ),
            UpstreamConfig(
                name="azure",
                base_url="http://localhost:9000",
                keys=(KeyConfig(id="azure-1", key="prefix-two-suffix"),),
            ),
        ),
        pool=PoolConfig(
            strategy="weighted",
            cooldown=5.0,
            max_cooldown=60.0,
            queue_timeout=0.0,
            probe_interval=30.0,
        ),
        failover=FailoverConfig(attempts=5),
        prices={
            "gpt-4o-mini": Price(input=0.15, output=0.60),
            "gpt-4o*": Price(input=2.5),
            "whisper-1": Price(request=0.006),
        },
        accounts=(
            AccountConfig(
                name="demo",
                key="sk-demo-0123456789",
                models=("gpt-4o-mini", "text-embedding-3-*"),
                rpm=60,
                tpm=100000,
                credit_usd=5.0,
                expires=datetime.datetime(2027, 1, 1, tzinfo=UTC),
                ip_allow=(
                    ipaddress.ip_network("10.0.0.0/8"),
                    ipaddress.ip_network("192.168.1.7/32"),
                    ipaddress.ip_network("2001:db8::/64"),
                ),
                enabled=False,
            ),
            AccountConfig(
                name="other",
                key="sk-other",
                expires=datetime.datetime(2026, 6, 30, 10, 0, tzinfo=UTC),
            ),
        ),
        plugins=PluginsConfig(
            dirs=("plugins", "/opt/yugongd/plugins"), disable=("max_tokens_cap",)
        ),
        access_log=AccessLogConfig(enabled=False, format="json"),
        notes=(),
    )


def test_minimal_file_takes_every_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          - name: openai
            base_url: https://api.openai.com/v1
        """,
    )
    assert load_config(path, {}) == Config(
        source=path,
        listen=("tcp:8080:interface=127.0.0.1",),
        state="sqlite:yugongd.db",
        shutdown_grace=30.0,
        admin=AdminConfig(token=None),
        limits=LimitsConfig(max_body=33554432),
        upstreams=(
            UpstreamConfig(
                name="openai",
                base_url="https://api.openai.com/v1",
                timeouts=Timeouts(connect=10.0, first_byte=120.0, idle=300.0),
                models=("*",),
                keys=(),
            ),
        ),
        pool=PoolConfig(
            strategy="least-loaded",
            cooldown=20.0,
            max_cooldown=600.0,
            queue_timeout=10.0,
            probe_interval=600.0,
        ),
        failover=FailoverConfig(attempts=3),
        prices={},
        accounts=(),
        plugins=PluginsConfig(dirs=(), disable=()),
        access_log=AccessLogConfig(enabled=True, format="text"),
        notes=(
            f"no upstream keys in {path}: requests will get 503 until keys are added "
            "through the admin API",
        ),
    )


def test_section_defaults() -> None:
    """Present-but-empty sections (and null values) take the same defaults as absent ones."""
    config = parse(
        with_upstream(
            listen=None,
            admin={},
            limits={},
            pool={},
            failover={},
            prices={},
            accounts=[],
            plugins={"dirs": None},
            access_log={},
        )
    )
    assert config == parse(MINIMAL)
    c = parse(
        {
            "upstreams": [
                {"name": "u", "base_url": "http://h", "timeouts": {}, "keys": [{"key": "k"}]}
            ],
            "accounts": [{"name": "a", "key": "ak"}],
        }
    )
    assert c.upstreams[0].timeouts == Timeouts(connect=10.0, first_byte=120.0, idle=300.0)
    assert c.upstreams[0].keys == (
        KeyConfig(
            id="u-1", key="k", organization=None, weight=1.0, rpm=None, tpm=None, models=("*",)
        ),
    )
    assert c.accounts == (
        AccountConfig(
            name="a",
            key="ak",
            models=("*",),
            rpm=0,
            tpm=0,
            credit_usd=None,
            expires=None,
            ip_allow=(),
            enabled=True,
        ),
    )
    assert c.notes == ()


def test_listen_as_single_string() -> None:
    assert parse(with_upstream(listen="tcp:9000")).listen == ("tcp:9000",)


def test_state_forms() -> None:
    assert parse(with_upstream(state="memory")).state == "memory"
    assert (
        parse(with_upstream(state="redis://localhost:6379/0")).state == "redis://localhost:6379/0"
    )
    assert parse(with_upstream(state="sqlite:data/y.db")).state == "sqlite:data/y.db"


def test_expires_forms() -> None:
    def expires(value: object) -> datetime.datetime | None:
        return parse(account(expires=value)).accounts[0].expires

    midnight = datetime.datetime(2027, 1, 1, tzinfo=UTC)
    assert expires("2027-01-01T00:00:00Z") == midnight
    assert expires("2027-01-01T00:00:00") == midnight  # no zone means UTC
    assert expires("2027-01-01") == midnight
    assert expires("2027-01-01T08:00:00+08:00") == midnight
    assert expires(datetime.date(2027, 1, 1)) == midnight  # YAML: expires: 2027-01-01
    assert expires(datetime.datetime(2027, 1, 1)) == midnight
    assert expires("2027-01-01T00:00:00Z").tzinfo is UTC  # type: ignore[union-attr]


def test_yaml_timestamp_is_utc(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams: [{name: u, base_url: "http://h"}]
        accounts:
          - {name: a, key: k, expires: 2027-01-01}
          - {name: b, key: l, expires: 2027-01-01T09:00:00+09:00}
        """,
    )
    midnight = datetime.datetime(2027, 1, 1, tzinfo=UTC)
    assert [a.expires for a in load_config(path, {}).accounts] == [midnight, midnight]


def test_secrets_not_in_repr() -> None:
    c = parse(yaml.safe_load(FULL), ENV)
    text = repr(c)
    for secret in ("s3cret", "sk-one", "sk-plain", "sk-demo-0123456789"):
        assert secret not in text


# --- ${VAR} expansion ---------------------------------------------------------------------------


def test_env_expansion_everywhere_in_strings() -> None:
    env = {"HOST": "up.example", "PORT": "8443", "M": "gpt-4o", "NET": "10.1.0.0/16", "X": ""}
    c = parse(
        {
            "listen": ["tcp:${PORT}"],
            "state": "sqlite:${HOST}.db",
            "upstreams": [
                {
                    "name": "u${X}",
                    "base_url": "https://${HOST}:${PORT}/v1",
                    "models": ["${M}*"],
                    "keys": [{"key": "${HOST}${PORT}", "organization": "org-${M}"}],
                }
            ],
            "accounts": [{"name": "a", "key": "k", "ip_allow": ["${NET}"]}],
            "plugins": {"dirs": ["${HOST}/plugins"]},
        },
        env,
    )
    assert c.listen == ("tcp:8443",)
    assert c.state == "sqlite:up.example.db"
    u = c.upstreams[0]
    assert (u.name, u.base_url, u.models) == ("u", "https://up.example:8443/v1", ("gpt-4o*",))
    assert (u.keys[0].key, u.keys[0].organization) == ("up.example8443", "org-gpt-4o")
    assert c.accounts[0].ip_allow == (ipaddress.ip_network("10.1.0.0/16"),)
    assert c.plugins.dirs == ("up.example/plugins",)


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YUGONGD_TEST_TOKEN", "from-os")
    c = parse_config(with_upstream(admin={"token": "${YUGONGD_TEST_TOKEN}"}), "y.yaml")
    assert c.admin.token == "from-os"


def test_env_not_a_reference_is_left_alone() -> None:
    c = parse(upstream(keys=[{"key": "a$b${not closed"}]))
    assert c.upstreams[0].keys[0].key == "a$b${not closed"


def test_example_file_loads() -> None:
    env = {
        "YUGONGD_ADMIN_TOKEN": "admin-token",
        "OPENAI_KEY_1": "sk-key-1",
        "OPENAI_KEY_2": "sk-key-2",
        "YUGONGD_DEMO_KEY": "sk-demo",
    }
    path = str(ROOT / "etc/yugongd.yaml")
    c = load_config(path, env)
    assert c.admin.token == "admin-token"
    assert [k.key for u in c.upstreams for k in u.keys] == ["sk-key-1", "sk-key-2"]
    assert c.accounts[0].key == "sk-demo"
    assert c.plugins.dirs == ("plugins",)
    # Every ${VAR} it uses is one the test supplies: dropping any one is an error.
    for name in env:
        with pytest.raises(ConfigError, match=f"environment variable {name} is not set"):
            load_config(path, {k: v for k, v in env.items() if k != name})


def test_example_file_shows_every_key() -> None:
    """etc/yugongd.yaml is the reference example: it must mention every key the loader knows."""
    from yugongd import config as module

    data = yaml.safe_load((ROOT / "etc/yugongd.yaml").read_text(encoding="utf-8"))
    assert set(data) == set(module._TOP_KEYS)
    assert set(data["upstreams"][0]) == set(module._UPSTREAM_KEYS)
    assert set(data["upstreams"][0]["keys"][0]) == set(module._KEY_KEYS)
    assert set(data["upstreams"][0]["timeouts"]) == {"connect", "first_byte", "idle"}
    assert set(data["pool"]) == set(module._POOL_KEYS)
    assert set(data["accounts"][0]) == set(module._ACCOUNT_KEYS)
    assert set().union(*data["prices"].values()) == {"input", "output", "request"}
    assert set(data["plugins"]) == {"dirs", "disable"}
    assert set(data["access_log"]) == {"enabled", "format"}


# --- embedded defaults --------------------------------------------------------------------------


def test_default_config_without_keys() -> None:
    assert default_config({}) == Config(
        source="<defaults>",
        listen=("tcp:8080:interface=127.0.0.1",),
        state="sqlite:yugongd.db",
        upstreams=(UpstreamConfig(name="openai", base_url="https://api.openai.com/v1", keys=()),),
        notes=(
            "no --config given: using the embedded defaults",
            "listening on tcp:8080:interface=127.0.0.1",
            "state: sqlite:yugongd.db (relative to the working directory)",
            "upstream 'openai': https://api.openai.com/v1",
            "OPENAI_API_KEY is not set: no upstream keys, requests will get 503 until keys are "
            "added (set OPENAI_API_KEY, or a config file)",
            "admin API: off (set YUGONGD_ADMIN_TOKEN to turn it on)",
        ),
    )


def test_default_config_admin_token_from_the_environment() -> None:
    c = default_config({"YUGONGD_ADMIN_TOKEN": "t0ken"})
    assert c.admin == AdminConfig(token="t0ken")
    assert c.notes[-2:] == (
        "OPENAI_API_KEY is not set: no upstream keys, requests will get 503 until keys are "
        "added through the admin API",
        "admin API: on (token from YUGONGD_ADMIN_TOKEN)",
    )
    assert not any("t0ken" in note for note in c.notes)


def test_default_config_one_key() -> None:
    c = default_config({"OPENAI_API_KEY": "sk-abc"})
    assert c.upstreams == (
        UpstreamConfig(
            name="openai",
            base_url="https://api.openai.com/v1",
            keys=(KeyConfig(id="openai-1", key="sk-abc"),),
        ),
    )
    assert c.notes[-2] == "1 upstream key from OPENAI_API_KEY"
    assert not any("sk-abc" in note for note in c.notes)


def test_default_config_two_keys_and_base_url() -> None:
    c = default_config(
        {"OPENAI_API_KEY": " sk-a , ,sk-b,", "OPENAI_BASE_URL": "http://127.0.0.1:9999/v1/"}
    )
    assert c.upstreams == (
        UpstreamConfig(
            name="openai",
            base_url="http://127.0.0.1:9999/v1",
            keys=(KeyConfig(id="openai-1", key="sk-a"), KeyConfig(id="openai-2", key="sk-b")),
        ),
    )
    assert c.notes == (
        "no --config given: using the embedded defaults",
        "listening on tcp:8080:interface=127.0.0.1",
        "state: sqlite:yugongd.db (relative to the working directory)",
        "upstream 'openai': http://127.0.0.1:9999/v1 (from OPENAI_BASE_URL)",
        "2 upstream keys from OPENAI_API_KEY",
        "admin API: off (set YUGONGD_ADMIN_TOKEN to turn it on)",
    )


def test_default_config_empty_key_variable_means_no_keys() -> None:
    assert default_config({"OPENAI_API_KEY": " , "}).upstreams[0].keys == ()


def test_default_config_bad_base_url() -> None:
    with pytest.raises(ConfigError) as info:
        default_config({"OPENAI_BASE_URL": "api.openai.com"})
    assert str(info.value) == (
        "<defaults>: OPENAI_BASE_URL: expected an http:// or https:// URL, got 'api.openai.com'"
    )


def test_default_config_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert default_config().upstreams[0].keys == (KeyConfig(id="openai-1", key="sk-x"),)


# --- file-level errors --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})
    assert str(info.value) == f"{tmp_path}: is a directory, not a file"


def test_not_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "upstreams: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}: not valid YAML: ")
    assert "(line 2, column 1)" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "y.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value).startswith(f"{path}: cannot read the file: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    got = {"- a\n- b\n": "a list", "just a string\n": "'just a string'", "42\n": "42"}[text]
    assert str(info.value) == f"{path}: expected a mapping, got {got}"


@pytest.mark.parametrize("text", ["", "# only comments\n", "listen: tcp:8080\n"])
def test_missing_upstreams(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: upstreams: is required"


def test_error_carries_its_parts(tmp_path: Path) -> None:
    path = write(tmp_path, "upstreams: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    err = info.value
    assert (err.source, err.keypath, err.message) == (
        path,
        "upstreams",
        "must list at least one upstream",
    )
    assert str(err) == f"{path}: upstreams: must list at least one upstream"


# --- every message a user can meet --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # unknown keys, with a hint when one is close
        (with_upstream(listn="tcp:1"), "y.yaml: unknown key 'listn' (did you mean 'listen'?)"),
        (with_upstream(colour="blue"), "y.yaml: unknown key 'colour' (did you mean 'cluster'?)"),
        (
            with_upstream(pool={"strategyy": "random"}),
            "y.yaml: pool: unknown key 'strategyy' (did you mean 'strategy'?)",
        ),
        (
            upstream(keys=[{"key": "k", "rpn": 5}]),
            "y.yaml: upstreams[0].keys[0]: unknown key 'rpn' (did you mean 'rpm'?)",
        ),
        (
            upstream(timeouts={"read": 5}),
            "y.yaml: upstreams[0].timeouts: unknown key 'read'",
        ),
        (
            with_upstream(prices={"m": {"input": 1, "cached": 2}}),
            "y.yaml: prices.m: unknown key 'cached'",
        ),
        (
            account(credit=5),
            "y.yaml: accounts[0]: unknown key 'credit' (did you mean 'credit_usd'?)",
        ),
        # wrong shapes and types
        ({"upstreams": {"name": "u"}}, "y.yaml: upstreams: expected a list, got a mapping"),
        ({"upstreams": []}, "y.yaml: upstreams: must list at least one upstream"),
        ({"upstreams": ["openai"]}, "y.yaml: upstreams[0]: expected a mapping, got 'openai'"),
        (with_upstream(pool="fast"), "y.yaml: pool: expected a mapping, got 'fast'"),
        (with_upstream(admin={"token": 123}), "y.yaml: admin.token: expected a string, got 123"),
        (
            with_upstream(shutdown_grace="abc"),
            "y.yaml: shutdown_grace: expected a number, got 'abc'",
        ),
        (with_upstream(shutdown_grace=True), "y.yaml: shutdown_grace: expected a number, got True"),
        (
            with_upstream(limits={"max_body": 1.5}),
            "y.yaml: limits.max_body: expected an integer, got 1.5",
        ),
        (
            upstream(keys=[{"key": "k"}, {"key": "k2", "rpm": "abc"}]),
            "y.yaml: upstreams[0].keys[1].rpm: expected an integer, got 'abc'",
        ),
        (
            with_upstream(failover={"attempts": "3"}),
            "y.yaml: failover.attempts: expected an integer, got '3'",
        ),
        (
            upstream(models="gpt-4o"),
            "y.yaml: upstreams[0].models: expected a list of strings, got 'gpt-4o'",
        ),
        (
            upstream(models=["gpt-4o", 5]),
            "y.yaml: upstreams[0].models: expected a list of strings, got a list",
        ),
        (
            upstream(models=[]),
            'y.yaml: upstreams[0].models: must list at least one model pattern (use ["*"] for '
            "all models)",
        ),
        (upstream(keys={"key": "k"}), "y.yaml: upstreams[0].keys: expected a list, got a mapping"),
        (upstream(keys=["sk-x"]), "y.yaml: upstreams[0].keys[0]: expected a mapping, got 'sk-x'"),
        (account(enabled="no"), "y.yaml: accounts[0].enabled: expected true or false, got 'no'"),
        (
            with_upstream(plugins={"dirs": "plugins"}),
            "y.yaml: plugins.dirs: expected a list of strings, got 'plugins'",
        ),
        (
            with_upstream(listen=8080),
            "y.yaml: listen: expected an endpoint string or a list of them, got 8080",
        ),
        (with_upstream(listen=[]), "y.yaml: listen: must list at least one endpoint"),
        (
            with_upstream(prices=["m"]),
            "y.yaml: prices: expected a mapping of model names to prices, got a list",
        ),
        (
            with_upstream(prices={"m": 0.5}),
            "y.yaml: prices.m: expected a mapping, got 0.5",
        ),
        (
            with_upstream(prices={"m": {}}),
            "y.yaml: prices.m: needs at least one of 'input', 'output', 'request'",
        ),
        (
            with_upstream(prices={"m": {"input": "cheap"}}),
            "y.yaml: prices.m.input: expected a number, got 'cheap'",
        ),
        # required keys and empty strings
        ({"upstreams": [{"base_url": "http://h"}]}, "y.yaml: upstreams[0].name: is required"),
        ({"upstreams": [{"name": "u"}]}, "y.yaml: upstreams[0].base_url: is required"),
        (upstream(keys=[{"id": "x"}]), "y.yaml: upstreams[0].keys[0].key: is required"),
        (upstream(keys=[{"key": "  "}]), "y.yaml: upstreams[0].keys[0].key: must not be empty"),
        (with_upstream(accounts=[{"key": "k"}]), "y.yaml: accounts[0].name: is required"),
        (with_upstream(accounts=[{"name": "a"}]), "y.yaml: accounts[0].key: is required"),
        (with_upstream(admin={"token": ""}), "y.yaml: admin.token: must not be empty"),
        (
            with_upstream(access_log={"format": "xml"}),
            "y.yaml: access_log.format: unknown format 'xml'; expected one of text, json",
        ),
        (
            with_upstream(access_log={"enabled": "yes"}),
            "y.yaml: access_log.enabled: expected true or false, got 'yes'",
        ),
        (
            with_upstream(access_log={"path": "/var/log/x"}),
            "y.yaml: access_log: unknown key 'path'",
        ),
        (
            with_upstream(access_log="json"),
            "y.yaml: access_log: expected a mapping, got 'json'",
        ),
        # numbers out of range
        (
            with_upstream(shutdown_grace=-1),
            "y.yaml: shutdown_grace: must not be negative, got -1",
        ),
        (
            upstream(keys=[{"key": "k", "rpm": -5}]),
            "y.yaml: upstreams[0].keys[0].rpm: must not be negative, got -5",
        ),
        (
            upstream(keys=[{"key": "k", "weight": 0}]),
            "y.yaml: upstreams[0].keys[0].weight: must be greater than 0, got 0",
        ),
        (
            upstream(timeouts={"connect": -0.5}),
            "y.yaml: upstreams[0].timeouts.connect: must be greater than 0, got -0.5",
        ),
        (
            with_upstream(failover={"attempts": 0}),
            "y.yaml: failover.attempts: must be at least 1, got 0",
        ),
        (
            with_upstream(limits={"max_body": 0}),
            "y.yaml: limits.max_body: must be at least 1, got 0",
        ),
        (
            with_upstream(pool={"cooldown": 0}),
            "y.yaml: pool.cooldown: must be greater than 0, got 0",
        ),
        (
            with_upstream(pool={"cooldown": 30, "max_cooldown": 10}),
            "y.yaml: pool.max_cooldown: must be at least pool.cooldown (30), got 10",
        ),
        (
            with_upstream(pool={"queue_timeout": -1}),
            "y.yaml: pool.queue_timeout: must not be negative, got -1",
        ),
        (
            with_upstream(prices={"m": {"output": -0.1}}),
            "y.yaml: prices.m.output: must not be negative, got -0.1",
        ),
        (account(tpm=-1), "y.yaml: accounts[0].tpm: must not be negative, got -1"),
        (account(credit_usd=-5), "y.yaml: accounts[0].credit_usd: must not be negative, got -5"),
        (
            with_upstream(shutdown_grace=float("nan")),
            "y.yaml: shutdown_grace: expected a finite number, got nan",
        ),
        # values with a syntax of their own
        (
            upstream(base_url="api.openai.com/v1"),
            "y.yaml: upstreams[0].base_url: expected an http:// or https:// URL, "
            "got 'api.openai.com/v1'",
        ),
        (
            upstream(base_url="ftp://h"),
            "y.yaml: upstreams[0].base_url: expected an http:// or https:// URL, got 'ftp://h'",
        ),
        (
            with_upstream(listen="tcpp:8080"),
            "y.yaml: listen: invalid endpoint 'tcpp:8080': Unknown endpoint type: 'tcpp'",
        ),
        (
            with_upstream(listen=["tcp:8080", "tcp:port"]),
            "y.yaml: listen[1]: invalid endpoint 'tcp:port': "
            "invalid literal for int() with base 10: 'port'",
        ),
        (
            with_upstream(state="postgres://db"),
            "y.yaml: state: expected 'memory', 'sqlite:<path>' or 'redis://…', got 'postgres://db'",
        ),
        (
            with_upstream(state="sqlite:"),
            "y.yaml: state: expected 'memory', 'sqlite:<path>' or 'redis://…', got 'sqlite:'",
        ),
        (
            with_upstream(pool={"strategy": "round_robin"}),
            "y.yaml: pool.strategy: unknown strategy 'round_robin' (did you mean "
            "'round-robin'?); expected one of least-loaded, round-robin, weighted, random",
        ),
        (
            with_upstream(pool={"strategy": "fastest"}),
            "y.yaml: pool.strategy: unknown strategy 'fastest'; expected one of least-loaded, "
            "round-robin, weighted, random",
        ),
        (
            account(ip_allow=["10.0.0.0/8", "10.0.0.300/8"]),
            "y.yaml: accounts[0].ip_allow[1]: expected an IP address or CIDR network, "
            "got '10.0.0.300/8'",
        ),
        (
            account(ip_allow="10.0.0.0/8"),
            "y.yaml: accounts[0].ip_allow: expected a list of strings, got '10.0.0.0/8'",
        ),
        (
            account(expires="next year"),
            "y.yaml: accounts[0].expires: expected an ISO 8601 date-time like "
            "'2027-01-01T00:00:00Z', got 'next year'",
        ),
        (
            account(expires=2027),
            "y.yaml: accounts[0].expires: expected an ISO 8601 date-time like "
            "'2027-01-01T00:00:00Z', got 2027",
        ),
        # uniqueness
        (
            {
                "upstreams": [
                    {"name": "u", "base_url": "http://a"},
                    {"name": "u", "base_url": "http://b"},
                ]
            },
            "y.yaml: upstreams[1].name: duplicate upstream name 'u' (also upstreams[0])",
        ),
        (
            {
                "upstreams": [
                    {"name": "a", "base_url": "http://a", "keys": [{"id": "k1", "key": "x"}]},
                    {"name": "b", "base_url": "http://b", "keys": [{"id": "k1", "key": "y"}]},
                ]
            },
            "y.yaml: upstreams[1].keys[0].id: duplicate key id 'k1' (also upstreams[0].keys[0])",
        ),
        (
            upstream(keys=[{"key": "x", "id": "u-2"}, {"key": "y"}]),
            "y.yaml: upstreams[0].keys[1].id: duplicate key id 'u-2' (also upstreams[0].keys[0])",
        ),
        (
            with_upstream(accounts=[{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]),
            "y.yaml: accounts[1].name: duplicate account name 'a' (also accounts[0])",
        ),
        (
            with_upstream(
                accounts=[{"name": "a", "key": "sk-same"}, {"name": "b", "key": "sk-same"}]
            ),
            "y.yaml: accounts[1].key: same key as accounts[0].key",
        ),
    ],
)
def test_error_messages(data: object, expected: str) -> None:
    assert error(data) == expected


def test_unset_env_var() -> None:
    assert error(upstream(keys=[{"key": "k"}, {"key": "${OPENAI_KEY_2}"}]), {}) == (
        "y.yaml: upstreams[0].keys[1].key: environment variable OPENAI_KEY_2 is not set"
    )
    assert error(with_upstream(listen=["tcp:1", "tcp:${PORT}"]), {}) == (
        "y.yaml: listen[1]: environment variable PORT is not set"
    )


def test_env_var_expanding_to_empty_key() -> None:
    assert error(upstream(keys=[{"key": "${K}"}]), {"K": ""}) == (
        "y.yaml: upstreams[0].keys[0].key: must not be empty"
    )


def test_nested_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        upstreams:
          - name: openai
            base_url: https://api.openai.com/v1
            keys:
              - key: sk-1
              - key: sk-2
                rpm: abc
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: upstreams[0].keys[1].rpm: expected an integer, got 'abc'"


def test_error_never_shows_a_secret() -> None:
    message = error(
        with_upstream(
            accounts=[{"name": "a", "key": "sk-secret"}, {"name": "b", "key": "sk-secret"}]
        )
    )
    assert "sk-secret" not in message
