"""Rate-limit header parsing and the refilling budgets."""

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yugongd.ratelimit import Bucket, Budget, parse_duration, parse_int, parse_retry_after


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("8.64ms", 0.00864),
        ("2m30.5s", 150.5),
        ("0s", 0.0),
        ("17", 17.0),
        (b"59.5s", 59.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1x", "s", "5s junk", "ms5", None])
def test_bad_durations(text):
    assert parse_duration(text) is None


@given(st.text(max_size=20))
def test_duration_parser_never_raises(text):
    value = parse_duration(text)
    assert value is None or value >= 0


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(b"0.5") == 0.5
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(10, usegmt=True), now=1_000_000) == 0.0
    assert parse_retry_after("soon") is None


def test_parse_int():
    assert parse_int(b"42") == 42
    assert parse_int("x") is None
    assert parse_int(None) is None


def test_bucket_learns_and_refills_linearly():
    b = Bucket()
    assert b.level(0) == float("inf")
    b.sync(limit=100, remaining=40, reset=30.0, now=10.0)
    assert b.level(10.0) == 40
    assert b.level(25.0) == pytest.approx(70)
    assert b.level(40.0) == 100
    assert b.level(400.0) == 100
    b.take(50, 40.0)
    assert b.level(40.0) == 50
    assert b.wait_for(60, 40.0) == pytest.approx(10 / (60 / 30.0))


def test_configured_limit_until_headers_arrive():
    budget = Budget("org", rpm=60, tpm=6000)
    assert budget.admits(6000, 0)
    budget.take(6000, 0)
    assert not budget.admits(100, 0)
    assert budget.wait_for(100, 0) == pytest.approx(1.0)  # 100 tokens per second refill
    budget.tokens.sync(limit=1_000_000, remaining=999_000, reset=0.06, now=1)
    budget.configure(60, 6000)  # a reload does not undo what was learned
    assert budget.tokens.capacity == 1_000_000


def test_request_larger_than_the_whole_allowance_waits_for_a_full_bucket():
    b = Bucket(1000)
    b.take(500, 0)
    assert b.wait_for(5000, 0) == pytest.approx(500 / (1000 / 60))
    assert b.wait_for(5000, 30) == 0.0


def test_sync_counts_requests_sent_after_the_responding_one():
    """Headers describe the bucket when the responding request was admitted upstream: the
    requests the pool sent after it are not in ``remaining`` yet and must stay taken."""
    b = Bucket(100)
    b.take(1, 0.0)
    mark = b.spent  # request A sent
    for _ in range(9):  # B..J sent while A is upstream
        b.take(1, 0.0)
    # A's response: the upstream had 99 left after admitting A
    b.sync(limit=100, remaining=99, reset=0.6, now=0.0, spent_at_send=mark)
    assert b.level(0.0) == 90  # not 99: B..J are still to be counted
    # without a mark (a plugin calling sync itself) the header's word is taken as is
    b.sync(limit=100, remaining=99, reset=0.6, now=0.0)
    assert b.level(0.0) == 99


def test_give_back_is_not_counted_as_spent():
    b = Bucket(10)
    b.take(3, 0.0)
    b.give_back(3, 0.0)
    assert b.spent == 3
    assert b.level(0.0) == 10
