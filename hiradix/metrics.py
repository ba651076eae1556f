"""Per-tier counters and gauges: a ``stats()`` snapshot in Python and, optionally, Prometheus.

The counters are plain integers bumped on the scheduler thread. ``PrometheusExporter``
mirrors them into ``prometheus_client`` metrics; under SGLang's multiprocess Prometheus
setup (``PROMETHEUS_MULTIPROC_DIR``) each scheduler process writes its own files and the
HTTP server aggregates them, so counters are exported as deltas and gauges use the
``livesum`` mode (the sum over live processes: the TP ranks' slabs add up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

COUNTERS = (
    ("prompt_tokens", "Prompt tokens seen at admission"),
    ("l1_hit_tokens", "Prompt tokens served from device memory (L1)"),
    ("l2_hit_tokens", "Prompt tokens loaded back from host memory (L2)"),
    ("l3_hit_tokens", "Prompt tokens fetched from the L3 store"),
    ("l1_to_l2_tokens", "Tokens demoted from device to host"),
    ("l2_to_l1_tokens", "Tokens loaded back from host to device"),
    ("l2_to_l3_tokens", "Tokens written from host to the L3 store"),
    ("l3_to_l2_tokens", "Tokens read from the L3 store into host memory"),
    ("d2h_bytes", "Bytes copied device -> host"),
    ("h2d_bytes", "Bytes copied host -> device"),
    ("l3_put_bytes", "Bytes written to the L3 store"),
    ("l3_get_bytes", "Bytes read from the L3 store"),
    ("l1_evicted_tokens", "Tokens evicted from device memory"),
    ("l2_evicted_tokens", "Tokens evicted from host memory"),
    ("l1_expired_tokens", "Tokens expired (TTL) from device memory"),
    ("l2_expired_tokens", "Tokens expired (TTL) from host memory"),
    ("l2_full_skips", "Demotions skipped because the host tier was full of pinned pages"),
    ("copy_failures", "Device/host copies that failed and were rolled back"),
    ("l3_errors", "L3 store operations that failed (degraded to a miss)"),
    ("l3_corrupt_pages", "L3 pages whose header or checksum did not verify"),
    ("l3_dropped_writes", "L3 writes dropped (queue full or store refused)"),
    ("recompute_instead_of_load", "Loads skipped because recomputing was estimated faster"),
    ("policy_events", "Events handed to the prefetch policy (arrival, finish, tick)"),
    ("policy_plans", "Plans the prefetch policy returned"),
    ("policy_plans_skipped", "Plans not executed (over budget, or no free device slots)"),
    ("policy_l1_staged_tokens", "Tokens a policy's plans brought from host to device ahead of use"),
    ("verify_checked_pages", "Verify mode: pages that came back up a tier and matched"),
    ("verify_unchecked_pages", "Verify mode: pages that came back with no record to check"),
    ("verify_mismatches", "Verify mode: pages that came back with other KV than went down"),
)
GAUGES = (
    ("l1_tokens", "Tokens the tree holds on device"),
    ("l1_protected_tokens", "Device tokens pinned by requests or in-flight copies"),
    ("l2_used_slots", "Host slab slots in use"),
    ("l2_tokens", "Tokens the tree holds in host memory (equals used slots when idle)"),
    ("l2_total_slots", "Host slab capacity in slots"),
    ("in_flight", "Transfers in flight"),
)


@dataclass
class Stats:
    """Mutable counters owned by one cache instance (scheduler thread only)."""

    counters: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in COUNTERS})
    gauges: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in GAUGES})

    def add(self, name: str, value: int = 1) -> None:
        self.counters[name] += value

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(dict(self.counters), dict(self.gauges))


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    counters: dict[str, int]
    gauges: dict[str, int]

    def hit_ratio(self) -> dict[str, float]:
        prompt = max(1, self.counters["prompt_tokens"])
        return {tier: self.counters[f"{tier}_hit_tokens"] / prompt for tier in ("l1", "l2", "l3")}

    def as_dict(self) -> dict[str, Any]:
        return {**self.counters, **self.gauges}


class PrometheusExporter:
    """Mirrors a ``Stats`` into prometheus_client metrics named ``hiradix_*``."""

    def __init__(self, labels: dict[str, str] | None = None):
        import prometheus_client as prom

        self.labels = dict(labels or {})
        names = list(self.labels)
        self._counters = {
            name: prom.Counter(f"hiradix_{name}", help_text, names) for name, help_text in COUNTERS
        }
        self._gauges = {
            name: prom.Gauge(f"hiradix_{name}", help_text, names, multiprocess_mode="livesum")
            for name, help_text in GAUGES
        }
        self._exported = {name: 0 for name, _ in COUNTERS}
        if self.labels:  # create every labelled child now, so that all series show from 0
            for metric in (*self._counters.values(), *self._gauges.values()):
                metric.labels(**self.labels)

    def export(self, stats: Stats) -> None:
        for name, value in stats.counters.items():
            delta = value - self._exported[name]
            if delta > 0:
                metric = self._counters[name]
                (metric.labels(**self.labels) if self.labels else metric).inc(delta)
                self._exported[name] = value
        for name, value in stats.gauges.items():
            gauge = self._gauges[name]
            (gauge.labels(**self.labels) if self.labels else gauge).set(value)
