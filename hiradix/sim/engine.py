"""The discrete-event simulator: requests, a FCFS server, ticks, and the policy's plans.

Server model (documented in the README table of ``hiradix sim``): ``lanes`` prefill
instances, each a whole copy of the profile's server with its own links (PCIe, drives,
NICs: see :class:`~hiradix.sim.cost.LinkPool`), one prefill at a time each (chunked
prefill serialises them on one engine). They share one tree, that is a router that
sends each request where its prefix is (as Mooncake's conductor does); every run of a
comparison, baselines included, gets the same instances. Requests wait FCFS, except
that one whose L3 prefetch is still landing is passed over (SGLang's scheduler skips a
request whose ``check_prefetch_progress`` is false and tries the next one) and holds
no lane. Decoding runs concurrently and does not slow prefill; it only holds the
request's KV (locked in the tree, plus its output tokens outside it) until it
finishes.

A request's life, all on the virtual clock:

1. arrival: ``locate`` its prompt (L1 run, L2 run, in-flight and L3 runs: the arrival
   ``TierRun``), call ``on_arrival`` and execute its plans;
2. considered (a lane is free and every request before it started or waits for L3): under
   ``wait_complete`` / ``timeout`` it reads the rest of its L3 run now and becomes
   eligible when that and any in-flight reads land (``timeout``: at most the config's
   wait budget counted from arrival, when SGLang issues the prefetch, and at least
   ``prefetch.queued_timeout`` while others are queued; when no other
   request is queued, never if recomputing those tokens is faster: with a queue the
   reads land while the lane serves others, so loading saves lane time even when it is
   slower than recomputing); until then later requests go first;
   ``best_effort`` is eligible at once;
3. start (eligible and a lane free): the ready host run is loaded into L1 (H2D,
   overlapped layer by layer with the prefill, :func:`~hiradix.sim.cost.overlapped`),
   the prompt is inserted and locked, the uncached tokens are prefilled;
4. prefill end: the lane frees, the new nodes are written through to L2 (then L3);
5. finish (after ``output_length`` decode steps): unlocked, ``on_finish``.

Every ``tick_s`` the tree sweeps its TTLs and the policy's ``on_tick`` plans run.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import math
from array import array
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hiradix.config import WaitMode
from hiradix.policies.base import (
    ArrivalEvent,
    Cold,
    FinishEvent,
    GuardedPolicy,
    PathView,
    Plan,
    Stage,
    StagedForRequests,
    TickEvent,
    TierRun,
)
from hiradix.policies.views import RadixTreeView
from hiradix.sim.cost import Profile, overlapped
from hiradix.sim.replay import TraceRequest
from hiradix.sim.tiers import Tiers
from hiradix.tree import Node, RadixTree, TtlRules, chain_page_keys
from hiradix.types import PageKey, Tier

logger = logging.getLogger(__name__)

# event order at equal times: copies land, then requests finish, then arrivals, then
# starts, then ticks (so a start sees every copy that completed at its instant)
_LANDED, _FINISH, _PREFILL_END, _ARRIVAL, _SCHEDULE, _START, _TICK = range(7)


@dataclass(frozen=True, slots=True)
class SimSettings:
    """One run's knobs (tier sizes in tokens; ``math.inf`` for unbounded)."""

    l1_tokens: float
    l2_tokens: float = 0
    l3_kind: str | None = None  # None: no L3; else the store kind (profile's link)
    l3_ttl: float | None = None
    l3_sliding: bool = True
    ttl: TtlRules = field(default_factory=TtlRules)
    eviction: str = "lru"
    wait: WaitMode = WaitMode.BEST_EFFORT
    wait_budget: Callable[[int, bool], float] = lambda tokens, others_queued: 0.0
    free_hits: bool = False  # the ceiling: cached tokens cost nothing to use
    page_size: int = 64
    tick_s: float = 1.0
    lanes: int = 1
    max_backlog_s: float = 30.0  # prefetch reads are skipped beyond this queue
    write_queue_tokens: float = math.inf
    read_batch_tokens: int = 0  # L3 reads land in batches of this size (0: all at once)


@dataclass
class RequestRecord:
    """What the simulator measured for one request."""

    arrival: float
    prompt: int
    l1_hit: int = 0
    l2_hit: int = 0
    l3_hit: int = 0
    deep: int = 0  # hit tokens found below L1 at arrival (L2, in flight, L3)
    ready: int = 0  # of those, in L1/L2 when scheduled
    wait_s: float = 0.0  # waited for L3 reads before starting
    ttft: float = math.nan


@dataclass
class SimResult:
    records: list[RequestRecord]
    bytes_by_link: dict[str, int]
    counters: dict[str, int]
    busy_s: float
    makespan_s: float
    policy: str
    policy_disabled: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    lanes: int = 1


class _Request:
    __slots__ = (
        "arrival_run",
        "considered_at",
        "gate",
        "keys",
        "node",
        "private",
        "record",
        "spec",
        "tokens",
        "woken",
    )

    def __init__(self, spec: TraceRequest, page: int):
        self.spec = spec
        tokens = spec.tokens()
        self.tokens = tokens[: len(tokens) - len(tokens) % page]
        self.keys: list[PageKey] = []
        self.node: Node | None = None
        self.private = 0
        self.record = RequestRecord(spec.arrival, spec.input_length)
        self.arrival_run = TierRun()
        self.gate: float | None = None  # when it may start (set when first considered)
        self.considered_at = 0.0
        self.woken = False


class Simulator:
    """Replays requests through a real ``RadixTree`` under a policy and a cost model."""

    def __init__(
        self,
        requests: Sequence[TraceRequest],
        profile: Profile,
        settings: SimSettings,
        policy: GuardedPolicy,
        *,
        progress: Callable[[int], None] | None = None,
    ):
        self.requests = list(requests)
        self.profile = profile
        self.settings = settings
        self.policy = policy
        self.progress = progress
        self.now = 0.0
        self._events: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = 0
        self.tree = RadixTree(
            settings.page_size,
            eviction=settings.eviction,
            ttl=settings.ttl,
            clock=lambda: self.now,
        )
        self.tiers = Tiers(
            self.tree,
            profile,
            l1_tokens=settings.l1_tokens,
            l2_tokens=settings.l2_tokens,
            l3_kind=settings.l3_kind,
            l3_ttl=settings.l3_ttl,
            l3_sliding=settings.l3_sliding,
            write_queue_tokens=settings.write_queue_tokens,
            schedule=self._at_landed,
            clock=lambda: self.now,
            instances=settings.lanes,
            read_batch_tokens=settings.read_batch_tokens,
        )
        self.view = RadixTreeView(
            self.tree,
            {
                Tier.L1: settings.l1_tokens,
                Tier.L2: settings.l2_tokens,
                Tier.L3: math.inf if settings.l3_kind else 0.0,
            },
            l3_resident=lambda: len(self.tiers.l3) * settings.page_size,
        )
        self._queue: deque[_Request] = deque()
        self._free_lanes = settings.lanes
        self._pending = 0
        self._busy = 0.0
        self._key_cache: dict[tuple[Hashable, bytes], list[PageKey]] = {}
        self._staged_for = StagedForRequests()  # the adapter's rule for arrivals' L1 staging

    # ------------------------------------------------------------------ events
    def _push(self, when: float, order: int, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (max(when, self.now), order, self._seq, action))

    def _at_landed(self, when: float, action: Callable[[], None]) -> None:
        self._push(when, _LANDED, action)

    def run(self) -> SimResult:
        records = []
        for spec in self.requests:
            request = _Request(spec, self.settings.page_size)
            records.append(request.record)
            self._push(spec.arrival, _ARRIVAL, functools.partial(self._arrive, request))
        self._pending = len(self.requests)
        if self.requests:
            self._push(self.requests[0].arrival, _TICK, self._tick)
        while self._events:
            when, _, _, action = heapq.heappop(self._events)
            self.now = when
            action()
        makespan = max((r.arrival + r.ttft for r in records if r.ttft == r.ttft), default=0.0)
        return SimResult(
            records=records,
            bytes_by_link={name: link.bytes_moved for name, link in self.tiers.links.items()},
            counters=dict(self.tiers.counters),
            busy_s=self._busy,
            makespan_s=makespan,
            policy=self.policy.name,
            policy_disabled=self.policy.reason,
            lanes=self.settings.lanes,
        )

    # ------------------------------------------------------------------ helpers
    def _keys(self, namespace: Hashable, tokens: array) -> list[PageKey]:
        if self.settings.l3_kind is None or not tokens:
            return []
        return chain_page_keys(self.tree.seed_key(namespace), tokens, self.settings.page_size)

    def _plan_tokens(self, tokens: Any) -> array:
        if isinstance(tokens, array) and tokens.typecode == "q":
            out = tokens
        elif isinstance(tokens, memoryview) and tokens.format == "q":
            out = array("q")
            out.frombytes(tokens.tobytes())
        else:
            out = array("q", tokens)
        page = self.settings.page_size
        return out[: len(out) - len(out) % page]

    def _plan_keys(self, namespace: Hashable, tokens: array) -> list[PageKey]:
        """Keys of a plan's path (plans repeat paths: a small cache by content digest)."""
        if self.settings.l3_kind is None:
            return []
        digest = hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()
        cached = self._key_cache.get((namespace, digest))
        if cached is None:
            cached = self._keys(namespace, tokens)
            if len(self._key_cache) > 1024:
                self._key_cache.clear()
            self._key_cache[(namespace, digest)] = cached
        return cached

    def _execute(self, plans: Sequence[Plan], request: _Request | None = None) -> None:
        """Carry out plans; ``request``: the arriving request whose event made them (a
        device staging of its own prefix is capped as the SGLang adapter caps it)."""
        if not plans:
            return
        stages = sorted(
            (p for p in plans if isinstance(p, Stage)), key=lambda p: (-p.priority, p.deadline)
        )
        for plan in stages:
            tokens = self._plan_tokens(plan.tokens)
            if not tokens:
                continue
            keys = self._plan_keys(plan.namespace, tokens)
            self.tiers.stage_l2(
                plan.namespace, tokens, keys, max_backlog=self.settings.max_backlog_s
            )
            if plan.tier is Tier.L1:
                where = self.tiers.locate(plan.namespace, tokens, keys, touch=False)
                nodes = self.tiers.host_run(where) + list(where.inflight)
                if request is not None and request.tokens[: len(tokens)] == tokens:
                    size = sum(len(n) for n in nodes)  # its own prefix: the staging rule
                    ahead = sum(r.spec.input_length - r.arrival_run.total for r in self._queue)
                    if not self._staged_for.fits(
                        size, now=self.now, l1_tokens=self.settings.l1_tokens, queued_new=ahead
                    ):
                        self.tiers.counters["stage_skipped"] += 1
                        continue
                    self._staged_for.add(request.spec.request_id, size, self.now)
                self.tiers.load_l1(nodes, where.match.l1_node, strict=False)
                # a path staged for use is as recent as a use: without this it would be
                # the first victim of the next eviction (staging for nothing)
                self.tree.match(plan.namespace, tokens, touch=True)
        for cold in plans:
            if isinstance(cold, Cold):
                path = self._plan_tokens(cold.tokens)
                if path:
                    self.tiers.cold(cold.namespace, path)

    # ------------------------------------------------------------------ request life
    def _arrive(self, request: _Request) -> None:
        spec = request.spec
        request.keys = self._keys(spec.namespace, request.tokens)
        where = self.tiers.locate(spec.namespace, request.tokens, request.keys, touch=False)
        found = where.match
        request.arrival_run = TierRun(
            found.l1_len, found.host_len, where.inflight_tokens + where.l3_tokens
        )
        event = ArrivalEvent(
            now=self.now,
            request_id=spec.request_id,
            namespace=spec.namespace,
            key=PathView(request.tokens, spec.namespace),
            matched=request.arrival_run,
            session_id=spec.session_id,
        )
        self._execute(self.policy.on_arrival(event), request)
        self._queue.append(request)
        self._dispatch()

    def _dispatch(self) -> None:
        """Start eligible requests in FCFS order on free lanes, passing over the ones
        still waiting for their L3 reads (they hold no lane meanwhile)."""
        index = 0
        queue = self._queue
        while self._free_lanes > 0 and index < len(queue):
            request = queue[index]
            if request.gate is None:
                request.gate = self._consider(request)
            if request.gate <= self.now:
                del queue[index]
                self._free_lanes -= 1
                request.record.wait_s = self.now - request.considered_at
                self._push(self.now, _START, functools.partial(self._start, request))
                continue
            if not request.woken:
                request.woken = True
                self._push(request.gate, _SCHEDULE, self._dispatch)
            index += 1

    def _consider(self, request: _Request) -> float:
        """First time a lane could take ``request``: measure readiness; when it may start."""
        spec = request.spec
        where = self.tiers.locate(spec.namespace, request.tokens, request.keys, touch=False)
        run = request.arrival_run
        record = request.record
        record.deep = run.l2_tokens + run.l3_tokens
        record.ready = max(0, min(run.total, self.tiers.landed_len(where.match)) - run.l1_tokens)
        request.considered_at = self.now
        if self.settings.wait is not WaitMode.BEST_EFFORT and self.settings.l3_kind is not None:
            return self._wait_for_l3(request, where)
        return self.now

    def _wait_for_l3(self, request: _Request, where: Any) -> float:
        """When the request may start under the wait mode (reads the L3 run now)."""
        spec = request.spec
        times = [done for _, done in where.inflight]
        tokens = where.inflight_tokens
        if where.l3_tokens > 0:
            _, done = self.tiers.stage_l2(spec.namespace, request.tokens, request.keys)
            if done is not None:
                times.append(done)
                tokens += where.l3_tokens
        if not times:
            return self.now
        until = max(times)
        others_queued = len(self._queue) > 1  # a lane it leaves waits for none of them
        if not others_queued and not self.profile.load_beats_recompute(
            tokens, where.ready_len, until - self.now
        ):
            return self.now  # recomputing is faster: do not wait (the reads go on)
        if self.settings.wait is WaitMode.TIMEOUT:
            # SGLang times a prefetch from when it was issued: the request's arrival, or
            # now for reads issued now (what arrival staged into L2 was evicted while the
            # request queued; the adapter's arrival fetches wait in reserved host slots
            # and are not lost that way, so this is the pessimistic side)
            issued = spec.arrival if where.l3_tokens == 0 else self.now
            budget = self.settings.wait_budget(spec.input_length, others_queued)
            until = min(until, issued + budget)
        return max(self.now, until)

    def _start(self, request: _Request) -> None:
        spec = request.spec
        self._staged_for.pop(spec.request_id)  # started: its staging is used
        tiers = self.tiers
        tree = self.tree
        where = tiers.locate(spec.namespace, request.tokens, request.keys, touch=True)
        found = where.match
        served = found.total_len
        anchor = found.l1_node
        tree.lock(anchor)
        load_done = max(self.now, tiers.l1_wait(anchor))
        if self.settings.free_hits:
            load_done = self.now
        host = tiers.host_run(where)
        if host:
            load_done = max(load_done, tiers.load_l1(host, anchor, strict=True))
        new_tokens = len(request.tokens) - served
        if not tiers.make_room_l1(new_tokens, found.host_node if host else anchor):
            tiers.counters["l1_overflow_tokens"] += int(new_tokens - max(0.0, tiers.free_l1()))
        outcome = tree.insert(spec.namespace, request.tokens, range(len(request.tokens)))
        tree.lock(outcome.node)
        tree.unlock(anchor)
        request.node = outcome.node
        request.private = spec.input_length - len(request.tokens) + spec.output_length
        tiers.private_l1 += request.private
        self._account(request, found.l1_len, served)
        model = self.profile.model
        prefill = model.prefill_time(spec.input_length - served, served)
        compute = overlapped(prefill, load_done - self.now, model.layers)
        end = self.now + compute
        self._busy += compute
        request.record.ttft = end - spec.arrival
        self._push(end, _PREFILL_END, lambda: self._prefill_end(request))

    def _account(self, request: _Request, l1_len: int, served: int) -> None:
        run = request.arrival_run
        record = request.record
        l3_from = run.l1_tokens + run.l2_tokens
        l3_to = l3_from + run.l3_tokens
        record.l1_hit = l1_len
        record.l3_hit = max(0, min(served, l3_to) - max(l1_len, l3_from))
        record.l2_hit = served - l1_len - record.l3_hit

    def _prefill_end(self, request: _Request) -> None:
        self._free_lanes += 1
        if request.node is not None and request.node.parent is not None:
            self.tiers.write_through(request.node)
        self._push(
            self.now + self.profile.model.decode_time(request.spec.output_length),
            _FINISH,
            lambda: self._finish(request),
        )
        self._dispatch()

    def _finish(self, request: _Request) -> None:
        spec = request.spec
        if request.node is not None:
            self.tree.unlock(request.node)
            request.node = None
        self.tiers.private_l1 -= request.private
        self._pending -= 1
        if self.progress is not None:
            self.progress(1)
        event = FinishEvent(
            now=self.now,
            request_id=spec.request_id,
            namespace=spec.namespace,
            path=PathView(request.tokens, spec.namespace),
            session_id=spec.session_id,
        )
        request.keys = []
        self._execute(self.policy.on_finish(event))

    def _tick(self) -> None:
        self.tree.sweep()
        self._execute(self.policy.on_tick(TickEvent(self.now, self.view)))
        if self._pending > 0:
            self._push(self.now + self.settings.tick_s, _TICK, self._tick)
