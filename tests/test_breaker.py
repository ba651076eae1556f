"""The L3 circuit breaker, driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from hiradix.breaker import BreakerState, CircuitBreaker

logger = logging.getLogger(__name__)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_short_circuits() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, base_backoff=1.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.opens == 1
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.short_circuited == 2
    assert breaker.failures == 3


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_probe_and_exponential_backoff() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, base_backoff=1.0, max_backoff=3.0, clock=clock)
    breaker.record_failure()
    assert breaker.retry_at == pytest.approx(101.0)
    clock.now = 100.9
    assert not breaker.allow()
    clock.now = 101.0
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # probe failed: backoff doubles
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_at == pytest.approx(103.0)
    clock.now = 103.0
    assert breaker.allow()
    breaker.record_failure()  # doubles again, capped at 3
    assert breaker.retry_at == pytest.approx(106.0)
    clock.now = 106.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    # Backoff is back to base after recovery.
    breaker.record_failure()
    assert breaker.retry_at == pytest.approx(107.0)
    assert breaker.opens == 4


def test_logs_once_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, base_backoff=0.5, clock=clock)
    with caplog.at_level(logging.INFO, logger="hiradix.breaker"):
        breaker.record_failure()
        for _ in range(3):
            clock.now += 10
            assert breaker.allow()
            breaker.record_failure()
        clock.now += 100
        assert breaker.allow()
        breaker.record_success()
        breaker.record_success()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1
    assert "degrading to misses for 0.5s" in warnings[0].getMessage()
    assert [r.getMessage() for r in infos] == ["L3 store recovered"]


@pytest.mark.parametrize(
    "kwargs", [{"failure_threshold": 0}, {"base_backoff": 0}, {"base_backoff": 5, "max_backoff": 1}]
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


def test_unused_half_open_probe_expires_so_the_store_can_recover() -> None:
    """Issue 16 item 9: a caller may take the probe and do no IO (nothing to write, the
    page known absent). The probe's lease runs out after the retry interval and the next
    caller gets a new probe, instead of allow() answering False forever."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, base_backoff=1.0, max_backoff=30.0, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()  # the probe, taken and never reported
    assert not breaker.allow()  # one probe at a time while its lease runs
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 1000.0
    assert breaker.allow()  # the lease expired: a new probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_expired_probe_lease_follows_the_backoff() -> None:
    """The lease is the current retry interval: after failed probes doubled the backoff
    to 4s, an unused probe blocks others for 4s, not for the base interval."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, base_backoff=1.0, max_backoff=8.0, clock=clock)
    breaker.record_failure()
    for _ in range(2):  # two failed probes: backoff 1 -> 2 -> 4
        clock.now = breaker.retry_at or clock.now
        assert breaker.allow()
        breaker.record_failure()
    clock.now = breaker.retry_at or clock.now
    assert breaker.allow()  # unused probe
    clock.now += 3.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert breaker.failures == 3  # an expired lease is not a failure
