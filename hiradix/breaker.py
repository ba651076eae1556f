"""A circuit breaker for the L3 store: stop calling a store that keeps failing.

While the store is down every L3 lookup would otherwise wait for a socket timeout; the
breaker turns those into immediate misses ("degrade to misses") and probes the store
again after an exponentially growing backoff.

States::

    closed --(failure_threshold consecutive failures)--> open
    open --(backoff elapsed; allow() lets ONE probe through)--> half_open
    half_open --(probe succeeds)--> closed      (backoff resets)
    half_open --(probe fails)--> open           (backoff doubles, up to max_backoff)
    half_open --(no outcome within the backoff)--> half_open, with a new probe

The probe is a lease, not a promise: a caller may take it and then find it has no IO
to do (nothing to write, a page known absent) and report nothing. Without the lease
every later ``allow()`` would answer False and the store would never be tried again;
with it, an unreported probe is replaced after the current retry interval.

Pure bookkeeping: no threads, no IO, no locks; time comes from the injected ``clock``.
The transfer engine calls it from its worker threads under its own lock.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures; opens after ``failure_threshold`` of them.

    Counters: ``failures`` (all recorded failures), ``opens`` (times it opened),
    ``short_circuited`` (calls refused by :meth:`allow`).
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        base_backoff: float = 0.5,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if base_backoff <= 0 or max_backoff < base_backoff:
            raise ValueError(
                f"need 0 < base_backoff <= max_backoff, got {base_backoff}, {max_backoff}"
            )
        self.failure_threshold = failure_threshold
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._backoff = base_backoff
        self._reopen_at = 0.0
        self._probe_expires_at = 0.0
        self.failures = 0
        self.opens = 0
        self.short_circuited = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def retry_at(self) -> float | None:
        """Clock time at which an open breaker lets the next probe through."""
        return self._reopen_at if self._state is BreakerState.OPEN else None

    def allow(self) -> bool:
        """May the caller use the store now?

        In half_open one probe is let through per retry interval: a probe whose outcome
        is not recorded within the current backoff is assumed unused and a new one is
        handed out (see the module docstring).
        """
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN and now >= self._reopen_at:
            self._state = BreakerState.HALF_OPEN
            self._probe_expires_at = now + self._backoff
            return True
        if self._state is BreakerState.HALF_OPEN and now >= self._probe_expires_at:
            logger.debug("L3 store probe went unreported for %.1fs; probing again", self._backoff)
            self._probe_expires_at = now + self._backoff
            return True
        self.short_circuited += 1
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._backoff = self.base_backoff
            logger.info("L3 store recovered")

    def record_failure(self) -> None:
        self.failures += 1
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN:
            # The probe failed: back off longer before the next one.
            self._backoff = min(self._backoff * 2.0, self.max_backoff)
            self._open()
        elif self._state is BreakerState.CLOSED and self._consecutive >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        was_closed = self._state is BreakerState.CLOSED
        self._state = BreakerState.OPEN
        self._reopen_at = self._clock() + self._backoff
        self.opens += 1
        if was_closed:
            # Log once per outage, not once per failed probe.
            logger.warning("L3 store unavailable, degrading to misses for %.1fs", self._backoff)
        else:
            logger.debug("L3 store still unavailable, next probe in %.1fs", self._backoff)
