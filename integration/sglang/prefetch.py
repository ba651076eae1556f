"""L3 prefetch and prefetch policies of ``HiRadixCache`` (a mixin): SGLang's
storage-prefetch hooks (``prefetch_from_storage`` on arrival, ``check_prefetch_progress``
at admission), the policy's events and plans, and staging paths up the tiers.

Decisions here read only agreed state and the agreed clock (``HiRadixCache.now``), so
every TP rank takes the same ones (``agreed_step.py``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from array import array
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from hiradix.policies.base import (
    ArrivalEvent,
    Cold,
    FinishEvent,
    PathView,
    Stage,
    TickEvent,
    TierRun,
)
from hiradix.policies.views import RadixTreeView
from hiradix.storage_tier import StorageTier, wait_ready
from hiradix.tree import Node
from hiradix.types import Tier

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req


logger = logging.getLogger(__name__)


MAX_BACKGROUND_PREFETCH = 64  # L3 lookups in flight for policy plans and requests
TICK_SECONDS = 1.0  # how often the prefetch policy's on_tick runs (agreed clock)


class StoragePrefetch:
    """Mixin of :class:`~hiradix.integration.sglang.cache.HiRadixCache`: L3 prefetch and policies."""

    hicache_storage_pass_prefix_keys = False

    @property
    def wants_storage_prefetch(self) -> bool:
        """Whether the scheduler should call the storage-prefetch hooks on arrival: with an
        L3 store, and with a host tier whose prefetch policy wants arrival events (they
        ride on the same calls; without a store nothing is looked up)."""
        if self.storage is not None:
            return True
        return self.slab is not None and self.policy.name != "none"

    def _init_store(self, model_id: str, config: Any = None) -> None:
        """Build ``self.storage`` for ``config``'s store (default: the cache's config; a
        store attached at run time brings its own, ``store_admin.py``)."""
        from hiradix.backends.base import make_key
        from hiradix.backends.lazy import LazyStore
        from hiradix.backends.registry import create_store

        from hiradix.breaker import CircuitBreaker

        config = self.config if config is None else config
        store_cfg = config.store
        kind = store_cfg.kind.value
        rank, ranks = self.shard
        # a directory and a capacity share per rank that holds other KV (the factory
        # counts pipeline stages only for replicated KV: every TP rank reads the writer's)
        if kind == "nvme" and ranks > 1:
            nvme = store_cfg.nvme
            store_cfg = dataclasses.replace(
                store_cfg,
                nvme=dataclasses.replace(
                    nvme,
                    path=os.path.join(nvme.path, f"rank{rank}of{ranks}"),
                    size_bytes=max(1, nvme.size_bytes // ranks),
                ),
            )
        prefix = store_cfg.redis.key_prefix if kind == "redis" else "hiradix:"
        store = LazyStore(lambda: create_store(store_cfg), f"{kind} store")
        ttl = config.ttl.store
        assert self.slab is not None
        self.storage = StorageTier(
            store,
            self.engine,
            self.slab,
            self.tree,
            stats=self.stats,
            model_id=model_id,
            tenant=config.namespace,
            make_key=lambda ns_hex, key_hex: make_key(prefix, ns_hex, key_hex),
            block_tokens=store_cfg.block_tokens,
            codec=config.compression.codec.value,
            level=config.compression.level,
            mac_key=store_cfg.mac_key(),
            ttl=ttl.seconds,
            sliding=ttl.mode.value == "sliding",
            presence_ttl=store_cfg.presence_ttl,
            write_queue_pages=store_cfg.write_queue_pages,
            breaker=CircuitBreaker(),
            clock=self._agreed_now,
            # replicated KV (MLA): rank 0 of the TP group writes, every rank reads
            writer=not self.kv_replicated or self._group_rank() == 0,
        )
        self.storage.verifier = self.verifier
        self.storage.queued = lambda: len(self.waiting())
        logger.info(
            "hiradix: L3 %s store, %d-token pages, model id %s",
            kind,
            store_cfg.block_tokens,
            model_id,
        )

    def _stage_for_request(self, rid: str, namespace: Hashable, tokens: array) -> None:
        """Stage an arriving request's prefix to the device, by the engines' rule
        (:class:`~hiradix.policies.base.StagedForRequests`)."""
        ahead = sum(self._new_by_rid.get(r.rid, 0) for r in self.waiting() if r.rid != rid)
        found = self.tree.match(namespace, tokens, touch=False)
        now = self.now
        pool = self.token_to_kv_pool_allocator.size
        if not self._staged_for.fits(found.host_len, now=now, l1_tokens=pool, queued_new=ahead):
            self.stats.add("policy_plans_skipped")
            return
        staged = self._stage_l1(namespace, tokens, found)
        if staged:
            self._staged_for.add(rid, staged, now)

    def _stage_l1(self, namespace: Hashable, tokens: array, found: Any = None) -> int:
        """A policy's ``Stage(tier=L1)``: bring the host-ready run of the path that
        follows its device-resident part up now, evicting unlocked device leaves for room
        as a load-back would (locked nodes never move; the policy bounds how much it
        stages); what is still in L3 is staged into host memory and comes up at
        admission (load-back). ``found``: the path's current match, if the caller has it."""
        if found is None:
            found = self.tree.match(namespace, tokens, touch=False)
        run: list[Node] = []
        cur = found.host_node
        while cur is not found.l1_node:  # the host-only run, deepest first
            run.append(cur)
            cur = cur.parent
        run.reverse()
        ready: list[Node] = []
        for x in run:
            if not x.l2_ready:
                break
            ready.append(x)
        if self.slab is None or not ready:
            return 0
        if not self._load_run(ready, found.l1_node):
            self.stats.add("policy_plans_skipped")
            return 0
        self.tree.match(namespace, tokens, touch=True)  # staged for use: as recent as a use
        staged = sum(len(x) for x in ready)
        self.stats.add("policy_l1_staged_tokens", staged)
        return staged

    # ------------------------------------------------------------------ L3 prefetch hooks
    def is_backuped(self, node: Any) -> bool:
        return True  # hiradix looks L3 up for whatever follows the local match

    def is_root(self, node: Any) -> bool:
        return node is self.tree.root or self.tree.is_root(node)

    def get_last_hash_value(self, node: Any) -> None:
        return None

    def get_prefix_hash_values(self, node: Any) -> None:
        return None

    def prefetch_from_storage(
        self,
        handle: Any,
        last_host_node: Any,
        new_input_tokens: Any,
        last_hash: Any = None,
        prefix_keys: Any = None,
        *,
        matched_prefix_tokens: Any = (),
        extra_key: Any = None,
        cache_salt: Any = None,
        storage_hit_end: Any = None,
        **kwargs: Any,
    ) -> bool:
        """Arrival: look up in L3 what follows the request's local (L1 + L2) match."""
        if self.disable or (self.storage is None and self.slab is None):
            return False
        raw = array("q", matched_prefix_tokens)
        raw.extend(new_input_tokens)
        # the tree's keys (EAGLE: bigrams), which L3 page keys hash too; SGLang's matched
        # length is in the tree's units already
        tokens = tree_tokens(raw, self.is_eagle)
        local = len(matched_prefix_tokens)
        namespace = (extra_key, cache_salt or None)
        rid = handle.rid
        if self.storage is None:  # host tier only: the policy hears the arrival
            self._on_arrival(rid, namespace, tokens, 0)
            return False

        def decide(present_tokens: int) -> int:
            return self._on_arrival(rid, namespace, tokens, present_tokens)

        if self.storage.prefetch(rid, namespace, tokens, local, decide):
            return True
        self._on_arrival(rid, namespace, tokens, 0)  # nothing to look up: the policy still hears
        return False

    # ------------------------------------------------------------------ prefetch policy
    def _announce(self, hook: str) -> None:
        if hook not in self._announced:
            self._announced.add(hook)
            try:
                import setproctitle

                title = setproctitle.getproctitle()
            except ImportError:  # optional: only for the log line
                title = "?"
            logger.info(
                "hiradix: prefetch policy %s: first %s callback in pid %d (%s)",
                self.policy.name,
                hook,
                os.getpid(),
                title,
            )

    def _on_arrival(self, rid: str, namespace: Hashable, tokens: array, l3_tokens: int) -> int:
        """The policy sees the arrival with each tier's run; returns how many of the
        ``l3_tokens`` present in the store to fetch for this request now."""
        self._announce("on_arrival")
        found = self.tree.match(namespace, tokens, touch=False)
        view = PathView(tokens, namespace)
        event = ArrivalEvent(
            self.now, rid, namespace, view, TierRun(found.l1_len, found.host_len, l3_tokens)
        )
        self.stats.add("policy_events")
        local = found.total_len
        self._new_by_rid[rid] = max(0, len(tokens) - local - l3_tokens)
        # without a prefetch policy a request still reads its own L3 hit at admission;
        # a policy decides what to fetch (and stage) for it
        take = l3_tokens if self.policy.name == "none" else 0
        for plan in self.policy.on_arrival(event):
            if (
                isinstance(plan, Stage)
                and plan.namespace == namespace
                and _is_prefix(plan.tokens, tokens)
            ):
                take = max(take, len(plan.tokens) - local)
                self.stats.add("policy_plans")
                if plan.tier is Tier.L1:  # its host run goes up while it waits to be scheduled
                    self._stage_for_request(rid, namespace, array("q", plan.tokens))
            else:
                self._execute(plan)
        return take

    def _execute(self, plan: Any) -> None:
        """Carry out a plan about some path: stage it from L3 into host memory in the
        background (bounded) and, for ``tier=L1``, its host-ready run onto the device
        (free device slots only); or let it go cold."""
        self.stats.add("policy_plans")
        tokens = array("q", plan.tokens)
        if isinstance(plan, Cold):
            found = self.tree.match(plan.namespace, tokens, touch=False)
            if found.host_len or found.l1_len:
                self.tree.set_cold(found.host_node)  # first in line for eviction
            return
        if not isinstance(plan, Stage):
            self.stats.add("policy_plans_skipped")
            return
        if plan.tier is Tier.L1:
            self._stage_l1(plan.namespace, tokens)
        if self.storage is None:
            return
        if len(self.storage.prefetches) >= MAX_BACKGROUND_PREFETCH:
            self.stats.add("policy_plans_skipped")
            return
        found = self.tree.match(plan.namespace, tokens, touch=False)
        self._plan_seq += 1
        key = f"plan:{self._plan_seq}"
        if self.storage.prefetch(key, plan.namespace, tokens, found.total_len):
            self.storage.forget(key)  # nobody waits on it: pages land when they arrive

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        if self.disable:
            return
        self._announce("on_finish")
        namespace = (req.extra_key, req.cache_salt)
        view = PathView(tree_tokens(req.full_untruncated_fill_ids, self.is_eagle), namespace)
        self.stats.add("policy_events")
        for plan in self.policy.on_finish(FinishEvent(self.now, req.rid, namespace, view)):
            self._execute(plan)

    def _tick(self) -> None:
        now = self.now
        if now - self._last_tick < TICK_SECONDS:
            return
        self._last_tick = now
        caps = {
            Tier.L1: float(self.token_to_kv_pool_allocator.size),
            Tier.L2: float(self.slab.num_slots if self.slab is not None else 0),
            Tier.L3: float("inf") if self.storage is not None else 0.0,
        }
        self.stats.add("policy_events")
        for plan in self.policy.on_tick(TickEvent(now, RadixTreeView(self.tree, caps))):
            self._execute(plan)

    def check_prefetch_progress(self, handle: Any) -> bool:
        """Admission gate: whether the request may be scheduled now (per the wait mode).
        It reads only agreed state (the prefetch's progress as applied at the last step,
        the agreed clock), so every TP rank answers the same without a collective."""
        if self.storage is None:
            return True
        state = self.storage.prefetches.get(handle.rid)
        prefetch = self.config.prefetch
        # never wait on a losing tier, unless others are queued to use the time
        others = self.storage.others_queued()
        budget = prefetch.wait_budget(len(state.tokens), others) if state is not None else 0.0
        worth = others or self.storage.cost.fetching
        ready = wait_ready(prefetch.wait.value if worth else "best_effort", state, budget, self.now)
        if state is None:
            return True
        if not ready:
            return False
        self.storage.prefetches.pop(handle.rid, None)
        if state.done:
            added = self.storage.materialize(state)
            if added:
                self._l3_by_rid[handle.rid] = added
                self._l3_to_report[handle.rid] = added
        else:
            state.abandoned = True
        return True

    def pop_prefetch_loaded_tokens(self, handle: Any) -> int:
        return self._l3_to_report.pop(getattr(handle, "rid", None), 0)


def pack_bigrams(raw: Any, n: int) -> array:
    """EAGLE's bigram keys ``(raw[i], raw[i + 1])`` for ``i < n``, one int64 each."""
    return array("q", ((raw[i] << 32) | (raw[i + 1] & 0xFFFFFFFF) for i in range(n)))


def tree_tokens(raw: Any, is_eagle: bool) -> array:
    """Raw token ids as the tree keys them (``HiRadixCache._tokens``, not page-aligned):
    as they are, or with EAGLE one packed bigram per adjacent pair. L3 page keys hash these,
    so a lookup finds what write-through stored."""
    if not is_eagle:
        return array("q", raw)
    return pack_bigrams(raw, max(0, len(raw) - 1))


def _is_prefix(plan_tokens: Any, tokens: array) -> bool:
    n = len(plan_tokens)
    return 0 < n <= len(tokens) and array("q", plan_tokens) == tokens[:n]
