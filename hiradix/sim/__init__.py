"""Trace-driven simulator: the real tree and policies on a virtual clock and a cost model.

    requests (replay) --> Simulator (engine: FCFS lanes, ticks, plans)
                              |  real RadixTree + GuardedPolicy
                              v
                          Tiers (tiers: capacities, L3 page keys, FIFO links) -- cost model
                                                                                 (cost, profiles)

:func:`simulate` runs the configured policy and the two baselines (L1-only LRU with the
same L1; an unbounded L1 whose hits cost nothing) over the same requests and returns the
JSON report (see :mod:`hiradix.sim.report`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hiradix.config import HiradixConfig, PrefetchConfig, StoreKind, TtlMode
from hiradix.policies.base import GuardedPolicy, PrefetchPolicy
from hiradix.policies.registry import create_policy
from hiradix.sim.engine import SimResult, SimSettings, Simulator
from hiradix.sim.profiles import get_profile
from hiradix.sim.replay import TraceRequest, distinct_tokens, load_trace
from hiradix.sim.report import combine
from hiradix.tree import TierTtl, TtlRules

logger = logging.getLogger(__name__)

__all__ = ["SimOptions", "load_trace", "run_one", "settings_for", "simulate"]


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Command-line level knobs of a simulation (tier sizes in tokens)."""

    profile: str
    l1_tokens: int | None = None  # default: 5% of the trace's distinct tokens
    l2_tokens: int | None = None  # default: from config host.size (ratio x L1, or bytes)
    policy: str | None = None  # default: the config's prefetch.policy
    page_size: int = 64
    tick_s: float = 1.0
    lanes: int = 1


def _ttl_rules(config: HiradixConfig) -> TtlRules:
    def tier(rule: Any) -> TierTtl:
        return TierTtl(rule.seconds, rule.mode is TtlMode.SLIDING)

    return TtlRules(tier(config.ttl.device), tier(config.ttl.host), config.ttl.max_age)


def settings_for(
    config: HiradixConfig, requests: Sequence[TraceRequest], options: SimOptions
) -> SimSettings:
    """The configured run's settings (sizes resolved against the trace and profile)."""
    profile = get_profile(options.profile)
    l1 = options.l1_tokens
    if l1 is None:
        l1 = max(options.page_size, int(distinct_tokens(list(requests)) * 0.05))
    l2 = options.l2_tokens
    if l2 is None:
        host_bytes = config.host.resolve_bytes(l1 * profile.model.kv_bytes_per_token)
        l2 = host_bytes // profile.model.kv_bytes_per_token
    kind = config.store.kind
    l3_kind = None if kind is StoreKind.NONE else kind.value
    queue_tokens = config.store.write_queue_pages * options.page_size
    return SimSettings(
        l1_tokens=l1,
        l2_tokens=l2,
        l3_kind=l3_kind,
        l3_ttl=config.ttl.store.seconds,
        l3_sliding=config.ttl.store.mode is TtlMode.SLIDING,
        ttl=_ttl_rules(config),
        eviction=config.eviction_policy.value,
        wait=config.prefetch.wait,
        wait_budget=config.prefetch.wait_budget,
        page_size=options.page_size,
        tick_s=options.tick_s,
        lanes=options.lanes,
        write_queue_tokens=queue_tokens,
        # stores read pipelined batches of store.redis.batch_pages pages; each batch is
        # usable once it has landed (the NVMe store reads page files, at least as fine)
        read_batch_tokens=config.store.redis.batch_pages * options.page_size,
    )


def run_one(
    requests: Sequence[TraceRequest],
    profile_name: str,
    settings: SimSettings,
    policy: PrefetchPolicy,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """One simulated run of ``policy`` (guarded) under ``settings``."""
    simulator = Simulator(
        requests, get_profile(profile_name), settings, GuardedPolicy(policy), progress=progress
    )
    return simulator.run()


def baselines(settings: SimSettings) -> tuple[SimSettings, SimSettings]:
    """(ceiling, L1-only): an unbounded free L1; the same L1 alone with LRU."""
    ceiling = replace(
        settings,
        l1_tokens=math.inf,
        l2_tokens=0,
        l3_kind=None,
        free_hits=True,
        eviction="lru",
        wait=settings.wait,
    )
    l1_only = replace(settings, l2_tokens=0, l3_kind=None, eviction="lru")
    return ceiling, l1_only


def simulate(
    config: HiradixConfig,
    requests: Sequence[TraceRequest],
    options: SimOptions,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, SimResult]]:
    """Run the configured policy and both baselines; returns (report, results by run)."""
    settings = settings_for(config, requests, options)
    prefetch = config.prefetch
    if options.policy is not None and options.policy != prefetch.policy:
        prefetch = PrefetchConfig(
            options.policy, {}, prefetch.wait, prefetch.timeout, prefetch.timeout_per_1k_tokens
        )
    ceiling, l1_only = baselines(settings)
    none = PrefetchConfig("none", {}, prefetch.wait, 0.0, 0.0)
    results = {
        "policy": run_one(requests, options.profile, settings, create_policy(prefetch), progress),
        "ceiling": run_one(requests, options.profile, ceiling, create_policy(none), progress),
        "l1_only": run_one(requests, options.profile, l1_only, create_policy(none), progress),
    }
    described = {
        "l1_tokens": settings.l1_tokens,
        "l2_tokens": settings.l2_tokens,
        "l3": settings.l3_kind,
        "wait": settings.wait.value,
        "page_size": settings.page_size,
        "tick_s": settings.tick_s,
        "lanes": settings.lanes,
        "eviction": settings.eviction,
        "policy_spec": prefetch.policy,
    }
    report = combine(
        results["policy"],
        results["ceiling"],
        results["l1_only"],
        profile=options.profile,
        settings=described,
    )
    return report, results
