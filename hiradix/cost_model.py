"""Online cost model: load from a tier only when that beats recomputing.

Loading KV is worth it only while ``fetch latency + bytes / bandwidth`` is below
``tokens / prefill speed``. Both sides are measured as the server runs (exponentially
weighted averages of observed fetches and prefills), so a slow Redis, a cold disk or a
fast GPU are found out without configuration. While loading loses, one lookup in
``probe_every`` still goes through, so that a store that got faster is noticed again.

Pure and single-threaded: observations are fed from the scheduler thread (the IO threads
measure, the completion callbacks report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    fetch: bool
    fetch_s: float
    recompute_s: float


class Ewma:
    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = (
            sample if self.value is None else self.value + self.alpha * (sample - self.value)
        )


class CostModel:
    """Decides, per lookup, whether fetching ``tokens`` beats recomputing them."""

    def __init__(self, *, alpha: float = 0.3, margin: float = 1.0, probe_every: int = 16):
        self.margin = margin
        self.probe_every = probe_every
        self.fetch_latency_s = Ewma(alpha)  # per round trip
        self.fetch_bytes_per_s = Ewma(alpha)
        self.prefill_tokens_per_s = Ewma(alpha)
        self._losing_streak = 0
        self._fetching = True

    @property
    def fetching(self) -> bool:
        """False while recomputing is measured to be faster than loading (between probes)."""
        return self._fetching

    def observe_fetch(self, nbytes: int, seconds: float, round_trips: int = 1) -> None:
        if seconds <= 0:
            return
        if nbytes > 0:
            self.fetch_bytes_per_s.add(nbytes / seconds)
        else:
            self.fetch_latency_s.add(seconds / max(1, round_trips))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s.add(tokens / seconds)

    def decide(self, tokens: int, bytes_per_token: int) -> Decision:
        """Fetch unless recomputing is measured to be faster (then one probe in
        ``probe_every``). A fetch is two round trips: the lookup and the read."""
        prefill = self.prefill_tokens_per_s.value
        bandwidth = self.fetch_bytes_per_s.value
        if prefill is None or bandwidth is None or tokens <= 0:
            return Decision(True, 0.0, 0.0)
        latency = self.fetch_latency_s.value or 0.0
        fetch_s = 2 * latency + tokens * bytes_per_token / bandwidth
        recompute_s = tokens / prefill
        fetch = fetch_s <= recompute_s * self.margin
        if not fetch:
            self._losing_streak += 1
            if self._losing_streak % self.probe_every == 0:
                fetch = True  # probe: keep measuring a store that may have recovered
        else:
            self._losing_streak = 0
        if fetch != self._fetching and (fetch is False or self._losing_streak == 0):
            self._fetching = fetch
            logger.warning(
                "hiradix: L3 loads %s (fetch %.1f ms vs recompute %.1f ms for %d tokens)",
                "resumed" if fetch else "skipped: recomputing is faster",
                fetch_s * 1e3,
                recompute_s * 1e3,
                tokens,
            )
        return Decision(fetch, fetch_s, recompute_s)
