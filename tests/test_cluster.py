"""Cluster mode without daemons: the ``cluster`` config section, Redis URLs, the spool,
and the Lua scripts run against a real redis-server (idempotent ledger, atomic admission)."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis_fixtures import RedisServer, needs_redis, redis_fixture  # noqa: F401

from yugongd.config import ClusterConfig, ConfigError, parse_config, parse_redis_url
from yugongd.redisstate import (
    ADMIT,
    LEDGER,
    PREFIX,
    Spool,
    row_from_item,
    row_item,
    settle_item,
)
from yugongd.state import LedgerRow

MINIMAL = {"upstreams": [{"name": "u", "base_url": "http://h"}]}


def parse(**extra: object):
    return parse_config({**MINIMAL, **extra}, "y.yaml", {})


def error(**extra: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse(**extra)
    return str(info.value)


# -- config ------------------------------------------------------------------------------


def test_cluster_section_defaults_and_values() -> None:
    assert parse().cluster == ClusterConfig("local", None, ".", 1.0)
    c = parse(
        state="redis://:pw@r.example:6380/2",
        cluster={"instance": "web-1", "redis_outage": "reject", "spool_dir": "/s", "timeout": 0.5},
    )
    assert c.cluster == ClusterConfig("reject", "web-1", "/s", 0.5)
    assert parse_redis_url(c.state) == ("r.example", 6380, 2, "pw")
    assert parse_redis_url("redis://localhost") == ("localhost", 6379, 0, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"cluster": {"redis_outage": "wait"}},
            "y.yaml: cluster.redis_outage: unknown choice 'wait'; expected one of local, reject",
        ),
        (
            {"cluster": {"instance": "a b"}},
            "y.yaml: cluster.instance: expected 1 to 64 letters, digits or '_.:@-', got 'a b'",
        ),
        ({"cluster": {"timeout": 0}}, "y.yaml: cluster.timeout: must be greater than 0, got 0"),
        ({"cluster": {"spool": "x"}}, "y.yaml: cluster: unknown key 'spool' (did you mean"),
        (
            {"state": "redis://localhost/x"},
            "y.yaml: state: the database in 'redis://localhost/x' must be a number, "
            "like redis://host:6379/0",
        ),
        ({"state": "redis://:6379/0"}, "y.yaml: state: expected 'redis://host:port/db', got"),
        ({"state": "redis://h:port/0"}, "y.yaml: state: invalid port in 'redis://h:port/0'"),
        (  # never the password
            {"state": "redis://:s3cret@h:port/0"},
            "y.yaml: state: invalid port in 'redis://:…@h:port/0'",
        ),
    ],
)
def test_cluster_config_errors(extra: dict[str, object], message: str) -> None:
    assert error(**extra).startswith(message)


# -- the spool ---------------------------------------------------------------------------


def test_spool_replays_in_order_and_adopts_a_dead_process_file(tmp_path: Path) -> None:
    first = Spool(str(tmp_path), "a", "a.1")
    first.write([("a.1", 1, "one"), ("a.1", 2, "two")])
    first.write([("a.1", 3, "three")])
    # a live process's spool is locked: another one does not take it
    other = Spool(str(tmp_path), "b", "b.1")
    assert other.adopt_orphans() == 0
    assert first.peek(2) == [("a.1", 1, "one"), ("a.1", 2, "two")]
    first.consume(2)
    first.close()  # the process dies with one item not sent
    # the adopter replays the whole file: Redis skips what it has (numbered per boot id,
    # see test_ledger_batches_resent_are_applied_once)
    assert other.adopt_orphans() == 1 and other.count == 3
    assert other.peek(10) == [("a.1", 1, "one"), ("a.1", 2, "two"), ("a.1", 3, "three")]
    other.consume(3)
    assert not other and not list(tmp_path.iterdir())


# -- the scripts, in a real Redis --------------------------------------------------------


def ledger(redis: RedisServer, boot: str, items: list[tuple[int, str]]) -> object:
    keys = [PREFIX + "ledger", PREFIX + "hwm", PREFIX + "totals", PREFIX + "spent"]
    return redis.command(
        "EVAL", LEDGER, 4, *keys, PREFIX, boot, *(f"{seq}\t{text}" for seq, text in items)
    )


def row(n: int) -> LedgerRow:
    return LedgerRow(
        time=1000.0 + n,
        request_id=f"req{n}",
        account_id="acct_1",
        model="gpt-4o-mini",
        key_id="k",
        status=200,
        prompt_tokens=10,
        completion_tokens=5,
        cost_usd=0.25,
        estimated=False,
        latency=0.1,
        attempts=1,
        endpoint="/chat/completions",
    )


def test_row_items_round_trip() -> None:
    assert row_from_item(row_item(row(1))) == row(1)


@needs_redis
def test_ledger_batches_resent_are_applied_once(redis: RedisServer) -> None:
    batch = [(1, row_item(row(1))), (2, settle_item("acct_1", "", 0.25, None, 0))]
    assert ledger(redis, "p.1", batch) == 2
    assert ledger(redis, "p.1", batch) == 0  # a reply lost, the batch sent again
    assert ledger(redis, "p.1", batch + [(3, row_item(row(2)))]) == 1
    assert ledger(redis, "p.2", [(1, row_item(row(3)))]) == 1  # another process's numbering
    assert redis.command("XLEN", PREFIX + "ledger") == 3
    totals = redis.command("HGETALL", PREFIX + "totals")
    assert isinstance(totals, list)
    got = dict(zip(totals[::2], totals[1::2], strict=True))
    assert got["acct_1|requests"] == "3" and float(got["acct_1|cost_usd"]) == 0.75
    assert float(str(redis.command("HGET", PREFIX + "spent", "acct_1"))) == 0.25


@needs_redis
def test_admission_counts_windows_and_reserves_credit_atomically(redis: RedisServer) -> None:
    keys = [PREFIX + "rpm:a", PREFIX + "tpm:a", PREFIX + "held:a", PREFIX + "spent"]

    def admit(now: float, uid: str, credit: str = "1.0") -> list:
        # rpm 2, tpm 100, 30 tokens, credit $1, expected cost $0.4
        packed = f"{now} a 2 100 30 {credit} 0.4 {uid} 900"
        answer = redis.command("EVAL", ADMIT, 4, *keys, packed)
        assert isinstance(answer, str)
        verdict, retry, rused, rreset, tused, treset, sec = answer.split()
        return [verdict, retry, int(rused), rreset, int(tused), treset, int(sec)]

    assert admit(100.0, "u1")[0] == "ok"
    assert admit(100.5, "u2")[0] == "ok"
    verdict = admit(101.0, "u3")
    assert verdict[0] == "requests" and float(verdict[1]) == 59.0  # the oldest second leaves
    assert verdict[2] == 2 and verdict[4] == 60
    # a minute later the window is empty again; the two reservations ($0.8) still hold
    assert admit(161.0, "u3")[0] == "ok"
    assert admit(161.5, "u4")[0] == "credit"  # 0.8 + 0.4 reserved >= 1.0
    held = redis.command("HGETALL", PREFIX + "held:a")
    assert isinstance(held, list)
    fields = dict(zip(held[::2], held[1::2], strict=True))
    assert sorted(f for f in fields if not f.startswith("_")) == ["u1", "u2", "u3"]
    assert float(fields["_s"]) == pytest.approx(1.2) and fields["_n"] == "3"
    # settling u1 (through the ledger script) gives its $0.4 back
    assert ledger(redis, "p.9", [(1, settle_item("a", "u1", 0.3, None, 0))]) == 1
    assert admit(162.0, "u5")[0] == "credit"  # 0.3 spent + 0.8 held >= 1.0
    assert ledger(redis, "p.9", [(2, settle_item("a", "u2", 0.1, None, 0))]) == 1
    assert admit(162.5, "u6")[0] == "ok"  # 0.4 spent + 0.4 held < 1.0
