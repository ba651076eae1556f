"""The built-in prefetch policies none, arrival, session and hot (pattern, the default,
is in :mod:`hiradix.policies.pattern`; shared pieces in :mod:`hiradix.policies.staging`).

All of them are pure and deterministic (state changes only through events; time is
``event.now``). Prefixes are identified by :meth:`PathView.prefix_keys` at a block
granularity (option ``block_tokens``), so memory grows with distinct prefixes seen, and
each policy bounds it.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from hiradix.policies.base import (
    AbortEvent,
    ArrivalEvent,
    FinishEvent,
    PathView,
    Plan,
    PrefetchPolicy,
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


class NonePolicy(PrefetchPolicy):
    """``none``: never prefetches. L3 hits are read only when a request is scheduled (and
    only under the ``wait_complete`` / ``timeout`` wait modes). No options."""

    name = "none"


class ArrivalPolicy(PrefetchPolicy):
    """``arrival``: when a request arrives, stage its L3 run into L2, so that the copy
    overlaps the request's time in the queue.

    Options: ``min_tokens`` (int, default 1): smallest L3 run worth staging.
    """

    name = "arrival"

    def __init__(self, *, min_tokens: int = 1) -> None:
        self.min_tokens = count_option(min_tokens, "min_tokens")

    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        if event.matched.l3_tokens < self.min_tokens:
            return ()
        return stage_l3_run(event)


class _Session:
    __slots__ = ("finished_at", "keys", "namespace", "path", "think", "turns", "version")

    def __init__(self, namespace: Hashable):
        self.namespace = namespace
        self.path: PathView | None = None
        self.finished_at: float | None = None
        self.think: float | None = None
        self.keys: tuple[bytes, ...] = ()
        self.turns = 0
        self.version = 0


class SessionPolicy(StagingPolicy):
    """``session``: multi-turn conversations. When a request finishes, its path is kept as
    the session's; shortly before the session's next turn is expected (its finish time
    plus its learned think time, minus ``lead_s``) the path is staged back up, so the next
    turn finds it in L2 instead of L3 (and in L1 with ``l1_lead_s`` > 0; off by default:
    a turn's time is a guess, and L1 is too small to hold guesses). Each tick stages at
    most ``l2_budget`` of L2's capacity and ``l1_budget`` of L1's, soonest first, and
    skips paths already resident; what does not fit waits for the next tick until its
    expected time has passed. Arrivals also stage their L3 run (as ``arrival``).

    A session is ``session_id`` when the request has one; otherwise the next turn is
    recognised by extending a finished path: the last ``index_blocks`` block keys of each
    finished path index its session, and an arrival looks up its own keys, deepest first.
    Think time is an exponential moving average per session (weight ``ema``), starting
    from the average over all sessions (itself starting at ``think_time_s``).

    Options (defaults): ``block_tokens`` (512) prefix-key granularity; ``think_time_s``
    (30.0) prior think time; ``lead_s`` (5.0) how long before the expected return to
    stage; ``l1_lead_s`` (0.0 = never) how long before it to stage into L1 as well;
    ``l2_budget`` (0.05) and ``l1_budget`` (0.01) shares of a tier's capacity staged per
    tick; ``ema`` (0.5); ``min_tokens`` (512) shorter paths are not tracked;
    ``index_blocks`` (4); ``max_sessions`` (20000, least recently active dropped first);
    ``max_idle_s`` (1800.0) a session not back after this long is forgotten;
    ``stage_on_arrival`` (true).
    """

    name = "session"

    def __init__(
        self,
        *,
        block_tokens: int = 512,
        think_time_s: float = 30.0,
        lead_s: float = 5.0,
        l1_lead_s: float = 0.0,
        l2_budget: float = 0.05,
        l1_budget: float = 0.01,
        ema: float = 0.5,
        min_tokens: int = 512,
        index_blocks: int = 4,
        max_sessions: int = 20000,
        max_idle_s: float = 1800.0,
        stage_on_arrival: bool = True,
    ) -> None:
        self._staging_options(block_tokens, lead_s, l1_lead_s, l2_budget, l1_budget, ema)
        self.prior = positive_option(think_time_s, "think_time_s")
        self.min_tokens = count_option(min_tokens, "min_tokens", 0)
        self.index_blocks = count_option(index_blocks, "index_blocks")
        self.max_sessions = count_option(max_sessions, "max_sessions")
        self.max_idle = positive_option(max_idle_s, "max_idle_s")
        self.stage_on_arrival = bool(stage_on_arrival)
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self._by_key: dict[tuple[Hashable, bytes], Hashable] = {}
        self._by_request: dict[str, Hashable] = {}
        self._heap: list[tuple[float, int, Hashable, int, Tier]] = []
        self._seq = 0
        self._global_think = self.prior

    # -- identity
    def _lookup(self, namespace: Hashable, path: PathView, session_id: str | None) -> Any:
        if session_id is not None:
            return ("id", namespace, session_id)
        for key in reversed(path.prefix_keys(self.block)):
            sid = self._by_key.get((namespace, key))
            if sid is not None:
                return sid
        return None

    def expected_return(self, session: _Session) -> float | None:
        if session.finished_at is None:
            return None
        think = session.think if session.think is not None else self._global_think
        return session.finished_at + think

    # -- hooks
    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        sid = self._lookup(event.namespace, event.key, event.session_id)
        session = self._sessions.get(sid) if sid is not None else None
        if session is not None:
            self._sessions.move_to_end(sid)
            if session.finished_at is not None:
                gap = event.now - session.finished_at
                if 0 <= gap <= self.max_idle:
                    self._learn(session, gap)
                session.finished_at = None
                session.version += 1
            self._by_request[event.request_id] = sid
        if self.stage_on_arrival:
            return stage_l3_run(event, priority=2)
        return ()

    def _learn(self, session: _Session, gap: float) -> None:
        session.think = (
            gap if session.think is None else (self.ema * gap + (1 - self.ema) * session.think)
        )
        self._global_think = 0.1 * gap + 0.9 * self._global_think

    def on_abort(self, event: AbortEvent) -> Sequence[Plan]:
        self._by_request.pop(event.request_id, None)
        return ()

    def on_finish(self, event: FinishEvent) -> Sequence[Plan]:
        sid = self._by_request.pop(event.request_id, None)
        if len(event.path) < max(self.min_tokens, self.block):
            return ()
        if sid is None or sid not in self._sessions:
            sid = self._lookup(event.namespace, event.path, event.session_id)
        keys = event.path.prefix_keys(self.block)
        if sid is None:
            sid = ("path", event.namespace, keys[-1])
        session = self._sessions.get(sid)
        if session is None:
            session = self._sessions[sid] = _Session(event.namespace)
        self._sessions.move_to_end(sid)
        for key in session.keys:
            if self._by_key.get((session.namespace, key)) == sid:
                del self._by_key[(session.namespace, key)]
        session.keys = keys[-self.index_blocks :]
        for key in session.keys:
            self._by_key[(event.namespace, key)] = sid
        session.path = event.path
        session.finished_at = event.now
        session.turns += 1
        session.version += 1
        self._schedule(sid, session)
        while len(self._sessions) > self.max_sessions:
            self._forget(next(iter(self._sessions)))
        return ()

    def _schedule(self, sid: Hashable, session: _Session) -> None:
        expected = self.expected_return(session)
        assert expected is not None
        for lead, tier in ((self.lead, Tier.L2), (self.l1_lead, Tier.L1)):
            if lead > 0 or tier is Tier.L2:
                self._seq += 1
                item = (expected - lead, self._seq, sid, session.version, tier)
                heapq.heappush(self._heap, item)

    def _forget(self, sid: Hashable) -> None:
        session = self._sessions.pop(sid)
        for key in session.keys:
            if self._by_key.get((session.namespace, key)) == sid:
                del self._by_key[(session.namespace, key)]

    def on_tick(self, event: TickEvent) -> Sequence[Plan]:
        plans: list[Plan] = []
        budget = TickBudget(event, self.l1_budget, self.l2_budget)
        deferred = []
        while self._heap and self._heap[0][0] <= event.now:
            item = heapq.heappop(self._heap)
            _, _, sid, version, tier = item
            session = self._sessions.get(sid)
            if session is None or session.version != version or session.path is None:
                continue
            if session.finished_at is None:
                continue
            if event.now - session.finished_at > self.max_idle:
                self._forget(sid)
                continue
            expected = self.expected_return(session) or event.now
            tokens = session.path.tokens
            if not needs_staging(event, session.namespace, tokens, tier):
                continue
            if not budget.take(tier, len(tokens)):
                if expected > event.now:
                    deferred.append(item)  # try again next tick while still ahead of time
                continue
            plans.append(Stage(session.namespace, tokens, tier, expected, 1))
        for item in deferred:
            heapq.heappush(self._heap, item)
        return plans


class _Prefix:
    __slots__ = ("count", "depth", "parent", "seen", "tokens")

    def __init__(self, tokens: memoryview, parent: bytes | None, depth: int, now: float):
        self.tokens = tokens
        self.parent = parent
        self.depth = depth
        self.count = 0.0
        self.seen = now


class HotPolicy(PrefetchPolicy):
    """``hot``: prefixes shared by many requests (system prompts, tool definitions, shared
    documents) stay resident. Counts, with exponential decay (``half_life_s``), how many
    requests used each block-aligned prefix up to ``max_prefix_tokens``; every
    ``refresh_s`` it stages the hottest prefixes used by at least ``min_requests``
    requests, deepest first, into L1 within ``l1_budget`` of L1's capacity and into L2
    within ``l2_budget`` of L2's. Arrivals also stage their L3 run (as ``arrival``).

    Options (defaults): ``block_tokens`` (512); ``max_prefix_tokens`` (32768);
    ``min_requests`` (3.0, decayed count); ``half_life_s`` (300.0); ``refresh_s`` (5.0);
    ``l1_budget`` (0.25); ``l2_budget`` (0.5); ``max_prefixes`` (200000, the coldest
    dropped first); ``stage_on_arrival`` (true). Prefixes already resident are skipped
    (they cost no budget).
    """

    name = "hot"

    def __init__(
        self,
        *,
        block_tokens: int = 512,
        max_prefix_tokens: int = 32768,
        min_requests: float = 3.0,
        half_life_s: float = 300.0,
        refresh_s: float = 5.0,
        l1_budget: float = 0.25,
        l2_budget: float = 0.5,
        max_prefixes: int = 200000,
        stage_on_arrival: bool = True,
    ) -> None:
        self.block = count_option(block_tokens, "block_tokens")
        self.max_blocks = max(1, count_option(max_prefix_tokens, "max_prefix_tokens") // self.block)
        self.min_requests = positive_option(min_requests, "min_requests")
        self.half_life = positive_option(half_life_s, "half_life_s")
        self.refresh = positive_option(refresh_s, "refresh_s")
        self.l1_budget = positive_option(l1_budget, "l1_budget", zero=True)
        self.l2_budget = positive_option(l2_budget, "l2_budget", zero=True)
        self.max_prefixes = count_option(max_prefixes, "max_prefixes")
        self.stage_on_arrival = bool(stage_on_arrival)
        self._prefixes: dict[tuple[Hashable, bytes], _Prefix] = {}
        self._next_refresh = -math.inf

    def _decayed(self, prefix: _Prefix, now: float) -> float:
        return prefix.count * 0.5 ** ((now - prefix.seen) / self.half_life)

    def observe(self, namespace: Hashable, path: PathView, now: float) -> None:
        keys = path.prefix_keys(self.block)[: self.max_blocks]
        parent: bytes | None = None
        for depth, key in enumerate(keys):
            prefix = self._prefixes.get((namespace, key))
            if prefix is None:
                prefix = _Prefix(path.prefix((depth + 1) * self.block), parent, depth, now)
                self._prefixes[(namespace, key)] = prefix
            prefix.count = self._decayed(prefix, now) + 1.0
            prefix.seen = now
            parent = key
        if len(self._prefixes) > self.max_prefixes:
            self._prune(now)

    def _prune(self, now: float) -> None:
        ranked = sorted(self._prefixes.items(), key=lambda kv: self._decayed(kv[1], now))
        for key, _ in ranked[: len(ranked) - self.max_prefixes // 2]:
            del self._prefixes[key]

    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        self.observe(event.namespace, event.key, event.now)
        return stage_l3_run(event, priority=2) if self.stage_on_arrival else ()

    def hot_prefixes(self, now: float) -> list[tuple[Hashable, _Prefix, float]]:
        """Prefixes at or above ``min_requests``, hottest (then deepest) first, with no
        prefix listed whose longer extension is listed before it."""
        hot = []
        for (namespace, _key), prefix in self._prefixes.items():
            count = self._decayed(prefix, now)
            if count >= self.min_requests:
                hot.append((namespace, prefix, count))
        hot.sort(key=lambda item: (-round(item[2], 6), -item[1].depth))  # stable: ties keep order
        covered: set[int] = set()
        out = []
        for namespace, prefix, count in hot:
            if id(prefix) in covered:
                continue
            out.append((namespace, prefix, count))
            parent = prefix.parent
            while parent is not None:
                parent_prefix = self._prefixes.get((namespace, parent))
                if parent_prefix is None:
                    break
                covered.add(id(parent_prefix))
                parent = parent_prefix.parent
        return out

    def on_tick(self, event: TickEvent) -> Sequence[Plan]:
        if event.now < self._next_refresh:
            return ()
        self._next_refresh = event.now + self.refresh
        stale = [k for k, p in self._prefixes.items() if self._decayed(p, event.now) < 0.25]
        for key in stale:  # releases the paths they keep alive
            del self._prefixes[key]
        budgets = {
            Tier.L1: event.tree.capacity(Tier.L1) * self.l1_budget,
            Tier.L2: event.tree.capacity(Tier.L2) * self.l2_budget,
        }
        plans: list[Plan] = []
        for namespace, prefix, _uses in self.hot_prefixes(event.now):
            size = len(prefix.tokens)
            for tier in (Tier.L2, Tier.L1):
                if budgets[tier] >= size and needs_staging(event, namespace, prefix.tokens, tier):
                    budgets[tier] -= size
                    plans.append(Stage(namespace, prefix.tokens, tier, event.now, 0))
            if budgets[Tier.L2] < self.block:
                break
        return plans
