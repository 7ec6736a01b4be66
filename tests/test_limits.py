"""Rolling rpm/tpm windows and credit reservations, with a fake clock."""

import pytest
from twisted.internet.task import Clock

from yugongd.limits import AccountLimiter, CreditBook, RollingWindow, format_duration
from yugongd.model import Account
from yugongd.ratelimit import parse_duration


def test_rolling_window_counts_the_last_minute_in_seconds():
    w = RollingWindow()
    w.add(1, 0.5)
    w.add(1, 10.2)
    w.add(1, 10.9)
    assert w.used(10.9) == 3
    assert w.used(59.99) == 3
    # what was counted in second 0 is gone at 60.0, second 10's at 70.0
    assert w.used(60.0) == 2
    assert w.used(69.99) == 2
    assert w.used(70.0) == 0


def test_wait_is_the_time_until_enough_old_buckets_expire():
    w = RollingWindow()
    w.add(1, 0.0)
    w.add(1, 5.0)
    w.add(1, 20.0)
    assert w.wait(1, 4, 21.0) == 0.0
    # full at 3: the oldest request (second 0) frees its slot at 60
    assert w.wait(1, 3, 21.0) == pytest.approx(39.0)
    # two slots needed -> second 5 must expire too
    assert w.wait(2, 3, 21.0) == pytest.approx(44.0)


def test_request_larger_than_the_limit_waits_for_an_empty_window():
    w = RollingWindow()
    assert w.wait(5000, 1000, 0.0) == 0.0
    w.add(5000, 0.0)
    assert w.wait(10, 1000, 30.0) == pytest.approx(30.0)
    assert w.wait(5000, 1000, 60.0) == 0.0


def test_adjust_corrects_the_admission_bucket_only_while_in_the_window():
    w = RollingWindow()
    second = w.add(100, 3.7)
    w.add(5, 4.1)
    w.adjust(second, -70, 10.0)
    assert w.used(10.0) == 35
    w.adjust(second, -1000, 10.0)  # never below zero
    assert w.used(10.0) == 5
    w.adjust(second, +20, 10.0)
    assert w.used(10.0) == 25
    w.adjust(second, +500, 63.5)  # second 3 has expired: nothing to correct
    assert w.used(63.5) == 5


def test_format_duration_reads_back_with_the_pool_parser():
    for seconds in (0.02, 1.0, 1.5, 59.0, 60.0, 61.25, 3600.0):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)
    assert format_duration(0.02) == "20ms"
    assert format_duration(6 * 60) == "6m0s"


def acct(**kw):
    return Account(id="a1", name="a", **kw)


def test_rpm_refuses_with_retry_after_and_frees_slots_as_the_minute_rolls():
    clock = Clock()
    lim = AccountLimiter(clock)
    a = acct(rpm=2)
    for _ in range(2):
        assert lim.check(a, 0).retry_after is None
        lim.admit(a, 0)
        clock.advance(10)
    refused = lim.check(a, 0)
    assert (refused.which, refused.retry_after) == ("requests", pytest.approx(40.0))
    clock.advance(40)
    assert lim.check(a, 0).retry_after is None


def test_tpm_counts_expected_tokens_and_is_settled_with_the_real_usage():
    clock = Clock()
    lim = AccountLimiter(clock)
    a = acct(tpm=1000)
    second = lim.admit(a, 900)
    assert second == 0
    refused = lim.check(a, 200)
    assert refused.which == "tokens" and refused.retry_after == pytest.approx(60.0)
    # the request really used 150 tokens, not 900
    lim.settle(a.id, second, 150 - 900)
    assert lim.check(a, 200).retry_after is None
    headers = lim.headers(a)
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"850"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1m0s"
    assert b"x-ratelimit-limit-requests" not in headers


def test_headers_describe_the_account_limits():
    clock = Clock()
    lim = AccountLimiter(clock)
    a = acct(rpm=5, tpm=100)
    lim.admit(a, 30)
    clock.advance(12.5)
    h = lim.headers(a)
    assert h[b"x-ratelimit-limit-requests"] == b"5"
    assert h[b"x-ratelimit-remaining-requests"] == b"4"
    assert h[b"x-ratelimit-reset-requests"] == b"47.5s"
    assert h[b"x-ratelimit-remaining-tokens"] == b"70"


def test_limits_changed_at_runtime_apply_to_the_same_window():
    clock = Clock()
    lim = AccountLimiter(clock)
    a = acct(rpm=10)
    for _ in range(3):
        lim.admit(a, 0)
    assert lim.check(a, 0).retry_after is None
    stricter = acct(rpm=3)
    assert lim.check(stricter, 0).retry_after == pytest.approx(60.0)


def test_credit_is_refused_once_used_plus_reserved_reaches_it():
    book = CreditBook()
    assert book.reserve("a", used=0.0, credit=1.0, cost=0.4)
    assert book.reserve("a", used=0.0, credit=1.0, cost=0.4)
    assert book.reserve("a", used=0.0, credit=1.0, cost=0.4)  # 0.8 < 1.0: the last one
    assert not book.reserve("a", used=0.0, credit=1.0, cost=0.4)
    assert book.held("a") == pytest.approx(1.2)
    assert book.inflight("a") == 3
    for _ in range(3):
        book.release("a", 0.4)
    assert book.held("a") == 0.0 and book.inflight("a") == 0
    book.release("a", 0.4)  # an extra release changes nothing
    assert book.held("a") == 0.0
    assert not book.reserve("a", used=1.0, credit=1.0, cost=0.0)
    assert not book.reserve("b", used=0.0, credit=0.0, cost=0.0)


def test_concurrent_reservations_overspend_by_at_most_one_request_each():
    """50 requests at once against credit for about three: at most one request beyond."""
    book = CreditBook()
    cost = 0.01
    credit = 0.025
    admitted = sum(book.reserve("a", 0.0, credit, cost) for _ in range(50))
    assert admitted == 3
    assert admitted * cost <= credit + cost
