"""What the mail and webhook dispatchers share: the breaker, the rate limit, the retry schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from servicekit.dispatch import CircuitBreaker, RetrySchedule, TokenBucket

START = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_breaker_opens_after_the_threshold_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10.0)
    breaker.failure(now=0.0)
    breaker.failure(now=1.0)
    assert breaker.state(now=1.0) == "closed"
    assert breaker.probe_at is None
    breaker.failure(now=2.0)
    assert breaker.state(now=2.0) == "open"
    assert breaker.probe_at == 12.0


def test_a_success_between_failures_keeps_the_breaker_closed() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=10.0)
    for now in range(5):
        breaker.failure(now=float(now))
        breaker.success()
    assert breaker.state(now=5.0) == "closed"


def test_an_open_breaker_turns_half_open_after_the_cooldown() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=10.0)
    breaker.failure(now=100.0)
    assert breaker.state(now=109.9) == "open"
    assert breaker.state(now=110.0) == "half-open"


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=10.0)
    breaker.failure(now=0.0)
    assert breaker.state(now=10.0) == "half-open"
    breaker.success()
    assert breaker.state(now=10.0) == "closed"
    assert breaker.probe_at is None
    breaker.failure(now=11.0)  # a fresh count: one failure reaches the threshold again
    assert breaker.state(now=11.0) == "open"


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10.0)
    for now in (0.0, 1.0, 2.0):
        breaker.failure(now)
    assert breaker.state(now=12.0) == "half-open"
    breaker.failure(now=12.5)  # one failure is enough: the count is not started again
    assert breaker.state(now=12.5) == "open"
    assert breaker.state(now=22.4) == "open"
    assert breaker.state(now=22.5) == "half-open"


def test_a_late_failure_while_open_restarts_the_cooldown() -> None:
    """An attempt already on the wire when the breaker opened fails later: wait from then."""
    breaker = CircuitBreaker(threshold=1, cooldown=10.0)
    breaker.failure(now=0.0)
    breaker.failure(now=5.0)
    assert breaker.state(now=12.0) == "open"
    assert breaker.probe_at == 15.0


def test_a_bucket_allows_a_burst_of_its_rate_then_spaces_requests() -> None:
    bucket = TokenBucket(rate=4.0)
    assert [bucket.reserve(now=0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert bucket.reserve(now=0.0) == pytest.approx(0.25)
    assert bucket.reserve(now=0.0) == pytest.approx(0.5)  # queued behind the previous one


def test_a_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=4.0)
    for _ in range(4):
        bucket.reserve(now=0.0)
    assert bucket.reserve(now=0.5) == 0.0  # two tokens back, one taken
    assert bucket.reserve(now=0.5) == 0.0
    assert bucket.reserve(now=0.5) == pytest.approx(0.25)
    # An idle hour refills it to its capacity, no more.
    assert [bucket.reserve(now=3600.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert bucket.reserve(now=3600.0) == pytest.approx(0.25)


def test_a_bucket_slower_than_one_a_second_still_lets_one_request_through() -> None:
    bucket = TokenBucket(rate=0.5)
    assert bucket.reserve(now=0.0) == 0.0
    assert bucket.reserve(now=0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)],
)
def test_the_retry_delay_doubles_up_to_the_maximum_with_jitter(
    attempt: int, ceiling: float
) -> None:
    schedule = RetrySchedule(initial=1.0, maximum=10.0, window=3600.0)
    delays = [schedule.delay(attempt) for _ in range(200)]
    assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > 0  # jittered, so that retries of one outage spread


def test_a_retry_inside_the_window_is_scheduled_and_one_past_it_is_not() -> None:
    schedule = RetrySchedule(initial=1.0, maximum=10.0, window=60.0)
    assert schedule.allows(START, 10.0, now=START + timedelta(seconds=50))  # at the end: in
    assert not schedule.allows(START, 10.0, now=START + timedelta(seconds=50.001))
    assert schedule.allows(START, 0.0, now=START + timedelta(seconds=60))


def test_the_schedule_gives_up_when_the_next_attempt_would_fall_past_the_window() -> None:
    schedule = RetrySchedule(initial=1.0, maximum=10.0, window=60.0)
    early = schedule.retry_in(3, START, now=START + timedelta(seconds=5))
    assert early is not None and 2.0 <= early <= 4.0
    # The delay is at least 5 s (half of the 10 s cap), and only 4 s of the window are left.
    assert schedule.retry_in(9, START, now=START + timedelta(seconds=56)) is None
    # A redelivery opens a new window: the same attempt counts from there.
    reopened = START + timedelta(seconds=55)
    assert schedule.retry_in(9, reopened, now=START + timedelta(seconds=56)) is not None
