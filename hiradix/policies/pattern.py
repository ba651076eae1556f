"""The ``pattern`` prefetch policy (the default): learns each shared prefix's reuse
interval, stages it ahead of its next use, reads long L3 runs ahead in chunks and lets
one-shot paths go cold.

Pure and deterministic like the other built-ins (:mod:`hiradix.policies.builtin`): state
changes only through events, time is ``event.now``, and memory is bounded by options.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from hiradix.policies.base import (
    AbortEvent,
    ArrivalEvent,
    Cold,
    FinishEvent,
    PathView,
    Plan,
    Stage,
    TickEvent,
)
from hiradix.policies.staging import (
    StagingPolicy,
    TickBudget,
    count_option,
    needs_staging,
    positive_option,
    stage_l3_run,
)
from hiradix.types import Tier

logger = logging.getLogger(__name__)


class _Reuse:
    __slots__ = ("count", "interval", "last", "namespace", "tokens", "version")

    def __init__(self, namespace: Hashable, tokens: memoryview, now: float):
        self.namespace = namespace
        self.tokens = tokens
        self.count = 1
        self.interval: float | None = None
        self.last = now
        self.version = 0


class _Block:
    __slots__ = ("fresh_after_share", "last", "reused")

    def __init__(self, now: float, fresh_after_share: bool):
        self.last = now
        self.fresh_after_share = fresh_after_share
        self.reused = False


class PatternPolicy(StagingPolicy):
    """``pattern``: learns how shared prefixes are reused and stages what it predicts.

    On each arrival the prompt's block keys are looked up among the blocks seen before;
    the deepest one found ends the prefix this request shares with earlier ones (many
    requests share long prefixes: documents, tool outputs, conversation history). That
    prefix's use is recorded: count, last use and an EMA of the intervals between uses.
    A shared prefix predicted to be used again within ``horizon_s`` is staged into L2
    ``lead_s`` before it is due (into L1 ``l1_lead_s`` before; off by default), at most
    ``l2_budget`` / ``l1_budget`` of the tier's capacity per tick, soonest first; a
    prefix already resident is skipped.

    It also learns how often the blocks a request adds are reused later, separately for
    requests that shared a prefix (their private tail) and requests that shared nothing.
    When a finished request's kind is reused less than ``cold_below`` (learned over at
    least ``cold_min_blocks`` blocks) and it added at least ``cold_min_tokens``, its
    path is marked cold: it leaves L1 and L2 before shared prefixes do (its L3 copy
    stays). Arrivals read their L3 run ahead in order, in chunks of ``readahead_tokens``,
    and with ``arrival_l1`` their whole cached prefix is staged to the device while they
    wait to be scheduled (the host -> device copy overlaps the queue instead of the
    prefill; the engine never evicts a locked node for it).

    Options (defaults): ``block_tokens`` (512); ``horizon_s`` (600.0); ``lead_s``
    (120.0); ``l1_lead_s`` (0.0 = never); ``l2_budget`` (0.0 = predicted prefixes are
    not staged: on the Mooncake trace staging them gained nothing with the 70B profile
    and cost 5% TTFT where one 8B instance is saturated); ``l1_budget`` (0.01);
    ``ema`` (0.5); ``readahead_tokens`` (8192, 0 = one plan); ``cold_min_tokens``
    (4096); ``cold_below`` (0.2); ``cold_min_blocks`` (32); ``max_prefixes`` (100000,
    shared prefixes tracked); ``max_blocks`` (400000, block keys remembered);
    ``arrival_l1`` (true). The defaults were chosen on the Mooncake trace with both
    profiles (README, "Trace simulation").
    """

    name = "pattern"

    def __init__(
        self,
        *,
        block_tokens: int = 512,
        horizon_s: float = 600.0,
        lead_s: float = 120.0,
        l1_lead_s: float = 0.0,
        l2_budget: float = 0.0,
        l1_budget: float = 0.01,
        ema: float = 0.5,
        readahead_tokens: int = 8192,
        cold_min_tokens: int = 4096,
        cold_below: float = 0.2,
        cold_min_blocks: int = 32,
        max_prefixes: int = 100000,
        max_blocks: int = 400000,
        arrival_l1: bool = True,
    ) -> None:
        self._staging_options(block_tokens, lead_s, l1_lead_s, l2_budget, l1_budget, ema)
        if not isinstance(arrival_l1, bool):
            # a config error like every other option's (ValueError names key and value)
            raise ValueError(f"prefetch.options.arrival_l1: {arrival_l1!r}; allowed: true, false")  # noqa: TRY004
        self.arrival_l1 = arrival_l1
        self.horizon = positive_option(horizon_s, "horizon_s")
        self.readahead = count_option(readahead_tokens, "readahead_tokens", 0)
        self.cold_min = count_option(cold_min_tokens, "cold_min_tokens", 0)
        self.cold_below = positive_option(cold_below, "cold_below", zero=True)
        self.cold_min_blocks = count_option(cold_min_blocks, "cold_min_blocks", 0)
        self.max_prefixes = count_option(max_prefixes, "max_prefixes")
        self.max_blocks = count_option(max_blocks, "max_blocks")
        self._paths: OrderedDict[tuple[Hashable, bytes], _Reuse] = OrderedDict()
        self._blocks: OrderedDict[tuple[Hashable, bytes], _Block] = OrderedDict()
        self._heap: list[tuple[float, int, tuple[Hashable, bytes], int, Tier]] = []
        self._seq = 0
        # [kind] where kind 0: added by a request that shared nothing, 1: after a share
        self._added = [0, 0]
        self._added_reused = [0, 0]
        self._requests: dict[str, tuple[int, int]] = {}  # request id -> (kind, added)

    def reuse_rate(self, after_share: bool) -> float:
        """Share of the blocks added by requests of that kind that were used again."""
        kind = int(after_share)
        return (self._added_reused[kind] + 1) / (self._added[kind] + 2)

    def predicted(self, entry: _Reuse) -> float:
        return entry.last + (entry.interval if entry.interval is not None else self.horizon)

    def _observe(self, namespace: Hashable, path: PathView, now: float) -> tuple[int, float]:
        """Record the blocks of ``path``; (blocks shared with earlier requests, when the
        deepest of them was used last before now)."""
        keys = path.prefix_keys(self.block)
        shared = 0
        previous = now
        for key in keys:
            block = self._blocks.get((namespace, key))
            if block is None:
                break
            shared += 1
            previous = block.last
            if not block.reused:
                block.reused = True
                self._added_reused[int(block.fresh_after_share)] += 1
            block.last = now
            self._blocks.move_to_end((namespace, key))
        for key in keys[shared:]:
            self._blocks[(namespace, key)] = _Block(now, shared > 0)
        self._added[int(shared > 0)] += len(keys) - shared
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return shared, previous

    def _record(
        self, namespace: Hashable, path: PathView, shared: int, previous: float, now: float
    ) -> None:
        key = (namespace, path.prefix_keys(self.block)[shared - 1])
        entry = self._paths.get(key)
        gap = now - previous
        if entry is None:
            entry = self._paths[key] = _Reuse(namespace, path.prefix(shared * self.block), now)
            entry.interval = gap
        else:
            entry.interval = self.ema * gap + (1 - self.ema) * (entry.interval or gap)
        entry.count += 1
        entry.last = now
        entry.version += 1
        self._paths.move_to_end(key)
        while len(self._paths) > self.max_prefixes:
            self._paths.popitem(last=False)
        due = self.predicted(entry)
        if due - now > self.horizon:
            return
        for lead, tier in ((self.lead, Tier.L2), (self.l1_lead, Tier.L1)):
            if lead > 0 or tier is Tier.L2:
                self._seq += 1
                heapq.heappush(self._heap, (due - lead, self._seq, key, entry.version, tier))

    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        shared, previous = self._observe(event.namespace, event.key, event.now)
        if shared > 0:
            self._record(event.namespace, event.key, shared, previous, event.now)
        added = len(event.key) - shared * self.block
        self._requests[event.request_id] = (int(shared > 0), added)
        plans = stage_l3_run(event, chunk_tokens=self.readahead, priority=2)
        matched = event.matched
        if self.arrival_l1 and matched.l2_tokens + matched.l3_tokens > 0:
            # last: after the read-ahead chunks, so the L3 run still lands front first
            last = min((p.priority for p in plans if isinstance(p, Stage)), default=2)
            path = event.key.prefix(min(matched.total, len(event.key)))
            plans.append(Stage(event.namespace, path, Tier.L1, event.now, last - 1))
        return plans

    def on_abort(self, event: AbortEvent) -> Sequence[Plan]:
        self._requests.pop(event.request_id, None)
        return ()

    def on_finish(self, event: FinishEvent) -> Sequence[Plan]:
        kind, added = self._requests.pop(event.request_id, (0, len(event.path)))
        if (
            added >= max(1, self.cold_min)
            and self._added[kind] >= self.cold_min_blocks
            and self.reuse_rate(bool(kind)) < self.cold_below
        ):
            return [Cold(event.namespace, event.path.tokens)]
        return ()

    def on_tick(self, event: TickEvent) -> Sequence[Plan]:
        plans: list[Plan] = []
        budget = TickBudget(event, self.l1_budget, self.l2_budget)
        deferred = []
        while self._heap and self._heap[0][0] <= event.now:
            item = heapq.heappop(self._heap)
            _, _, key, version, tier = item
            entry = self._paths.get(key)
            if entry is None or entry.version != version:
                continue
            due = self.predicted(entry)
            if not needs_staging(event, entry.namespace, entry.tokens, tier):
                continue
            if not budget.take(tier, len(entry.tokens)):
                if due > event.now:
                    deferred.append(item)  # next tick, while still ahead of time
                continue
            plans.append(Stage(entry.namespace, entry.tokens, tier, due, 1))
        for item in deferred:
            heapq.heappush(self._heap, item)
        return plans
