"""``HiRadixCache``: SGLang's ``BasePrefixCache`` over hiradix's tiered tree.

This adapter translates SGLang's objects (``Req``, ``RadixKey``, device index tensors)
into the core's types and back. It owns no threads: copies between tiers and store IO are
submitted to the transfer engine, and their completions are applied only at the agreed
step (:meth:`HiRadixCache.step`, ``agreed_step.py``), which the scheduler reaches through
``check_hicache_events`` and ``flush_pending_backups`` on every rank alike; never inside
``match_prefix`` or ``evict``. The mixins: ``host_tier.py`` (L2), ``prefetch.py`` (L3),
``store_admin.py`` (switching the store), ``kv_events.py`` (SGLang's KV events).

Contract references are to SGLANG-0.5.23.md.
"""

from __future__ import annotations

import logging
import sys
import time
from array import array
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from hiradix.backends.host_slab import HostSlab
from hiradix.integration.sglang.agreed_step import AgreedStep, check_enabled, relay_down
from hiradix.integration.sglang.host_tier import HostTier
from hiradix.integration.sglang.kv_events import KvEvents
from hiradix.integration.sglang.prefetch import StoragePrefetch
from hiradix.integration.sglang.store_admin import StoreAdmin
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixKey

from hiradix.identity import ModelIdentity
from hiradix.kv_copy import LayerLoadGate
from hiradix.metrics import PrometheusExporter, Stats, StatsSnapshot
from hiradix.policies.base import (
    AbortEvent,
    GuardedPolicy,
    StagedForRequests,
)
from hiradix.policies.registry import create_policy
from hiradix.storage_tier import StorageTier
from hiradix.transfer import TransferEngine
from hiradix.tree import Node, RadixTree, TierTtl, TtlRules
from hiradix.verify import PageVerifier, mode_from_env

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from hiradix.config import HiradixConfig

logger = logging.getLogger(__name__)

PP_STORE_REFUSED = (
    "hiradix: an L3 store is not supported with pipeline parallelism (--pp-size > 1): "
    "the stages share the first stage's verdict on every IO completion, and a store lookup "
    "can find a page on one stage and miss it on another. The host tier works with PP; "
    "set store.kind: none in the hiradix config"
)


def ttl_rules(config: HiradixConfig) -> TtlRules:
    """The tree's TTL rules from the config's ``ttl`` section."""

    def tier(rule: Any) -> TierTtl:
        return TierTtl(rule.seconds, rule.mode.value == "sliding")

    return TtlRules(
        device=tier(config.ttl.device), host=tier(config.ttl.host), max_age=config.ttl.max_age
    )


class HiRadixCache(HostTier, StoragePrefetch, StoreAdmin, KvEvents, BasePrefixCache):
    """Prefix cache for SGLang whose tree spans device, host and store tiers."""

    sliding_window_size = None

    def __init__(
        self,
        params: CacheInitParams,
        config: HiradixConfig,
        *,
        clock: Any = time.monotonic,
        forward_stream: Any = None,
        metric_labels: dict[str, str] | None = None,
        model_id: str | ModelIdentity = "model",
        tp_group: Any = None,
        tp_rank: int | None = None,
        shard: tuple[int, int] = (0, 1),
        pp_group: Any = None,
    ):
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        self.is_eagle = params.is_eagle
        self.config = config
        self.clock = clock  # this rank's own clock: read only by ``step``
        #: the agreed time (MIN over TP ranks of their clocks at the last step): every TTL,
        #: policy event and wait decision reads this, never a rank's own clock
        self.now = clock()
        allocator = self.token_to_kv_pool_allocator
        dev = getattr(allocator, "device", "cpu") if allocator is not None else "cpu"
        self.device = (
            torch.device(dev) if isinstance(dev, (str, torch.device)) else torch.device("cpu")
        )
        self.stats = Stats()
        verify = mode_from_env()
        self.verifier: PageVerifier | None = None if verify == "off" else PageVerifier(verify)
        self._device_kv: list[torch.Tensor] = []
        self.kv_replicated = False  # the same KV on every TP rank (MLA): one rank writes L3
        self.exporter: PrometheusExporter | None = None
        if params.enable_metrics:
            self.init_metrics_collector()
            self.exporter = PrometheusExporter(metric_labels)
        self.tree = RadixTree(
            self.page_size,
            eviction=config.eviction_policy.value,
            ttl=ttl_rules(config),
            clock=self._agreed_now,
            free_l1=self._free_device,
        )
        self._init_kv_events(params)  # SGLang's KV events, every tier (kv_events.py)
        self.write_policy = config.write_policy.value
        self.forward_stream = forward_stream
        self.slab: HostSlab | None = None
        self.load_gate: LayerLoadGate | None = None
        self.engine = TransferEngine()
        if not self.disable and allocator is not None:
            self._init_host_tier(forward_stream)
        self._pending_demote: list[Node] = []
        self._pending_save: list[Node] = []
        self._loaded_by_rid: dict[str, int] = {}
        # device tokens staged for arriving requests not yet admitted (bounded, so that
        # staging for a deep queue never evicts what the queue's head was staged)
        self._staged_for = StagedForRequests()
        # tokens of each waiting request that no tier held at its arrival, and SGLang's
        # waiting queue (the plugin sets it): what the prefills queued ahead will insert
        self._new_by_rid: dict[str, int] = {}
        self.waiting: Callable[[], Sequence[Any]] = tuple
        self._l3_by_rid: dict[str, int] = {}
        self._l3_to_report: dict[str, int] = {}
        self.tp_group = tp_group
        self.tp_rank = tp_rank  # this rank in ``tp_group`` (None: asked of the group)
        self.shard = shard  # (this rank among all TP x PP ranks, how many)
        # pipeline stages: the first stage's verdict is relayed down (``_pp_forward``)
        self.pp_group = pp_group
        self.pp_rank = int(getattr(params, "pp_rank", 0) or 0)
        self.pp_size = int(getattr(params, "pp_size", 1) or 1)
        self._pp_sends: list[Any] = []
        #: what seeds the L3 page keys (``hiradix/identity.py``); a weight update moves it
        #: to a new weights epoch (``new_weights_epoch``)
        self.identity = model_id if isinstance(model_id, ModelIdentity) else None
        self.model_id = model_id.key() if isinstance(model_id, ModelIdentity) else model_id
        self.resets = 0  # times the tree was reset (flush_cache): read by the epoch hooks
        self.weights_epoch = 0  # weight updates seen since start
        #: the tree still holds KV of weights older than ``model_id`` (an update without a
        #: flush): no L3 store, one attached later included, reads or writes until ``reset``
        self.tree_stale = False
        self.storage: StorageTier | None = None
        self._store_ops = []  # attach/detach/clear requests, applied at the next step
        self._retired_stores = []  # stores switched away from, until their jobs are applied
        self._store_since = {}
        if self.slab is not None and config.store.kind.value != "none":
            if self.pp_size > 1:
                raise ValueError(PP_STORE_REFUSED)
            self._init_store(self.model_id)
        self.policy = GuardedPolicy(create_policy(config.prefetch))
        self._last_tick = 0.0
        self._computed_tokens = 0
        self._last_flush = self.now
        self._plan_seq = 0
        self._announced: set[str] = set()
        self._step: AgreedStep | None = None
        if self._agreeing():
            # ranks were built at different moments: until the first step agrees on a
            # clock, every rank reads the same constant
            self.now = 0.0
            self._last_flush = self.now
        self.reset()

    # SGLang reads these on the storage-prefetch path (SGLANG-0.5.23.md section 2)
    def _tp_size(self) -> int:
        if self.tp_group is None:
            return 1
        return torch.distributed.get_world_size(group=self.tp_group)

    def _group_rank(self) -> int:
        if self.tp_rank is not None:
            return self.tp_rank
        if self.tp_group is None:
            return 0
        return torch.distributed.get_rank(group=self.tp_group)

    def _reduce_min(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=self.tp_group)
        return tensor.tolist()

    def _agreeing(self) -> bool:
        """Whether other ranks (TP, or pipeline stages) must take the same decisions."""
        return self._tp_size() > 1 or self.pp_size > 1

    def _pp_forward(self, vector: list[int]) -> list[int]:
        return relay_down(vector, self.pp_group, self.pp_rank, self.pp_size, self._pp_sends)

    def _agreed_now(self) -> float:
        return self.now

    # ------------------------------------------------------------------ the agreed step
    def step(self) -> None:
        """The one place where finished IO changes the tree (``agreed_step.py``): once per
        scheduler iteration (SGLang's ``_process_hicache_events``, which every TP rank
        reaches in the same order) and after each batch result (``flush_pending_backups``).
        Completions are applied as the ranks agreed, then the housekeeping that changes
        what ``match_prefix`` returns or ``evict`` picks (demotions, L3 writes, policy
        ticks, TTL expiry) runs on the agreed clock. Nothing else polls: a lookup or an
        eviction never sees the tree change under it."""
        if self.disable:
            return
        if self._step is None:
            multi = self._agreeing()
            piped = self.pp_size > 1 and self.pp_group is not None
            self._step = AgreedStep(
                self.engine,
                self.clock,
                self._reduce_min if self._tp_size() > 1 else None,
                digest=self._digest if multi and check_enabled() else None,
                forward=self._pp_forward if piped else None,
                first_stage=self.pp_rank == 0 or not piped,
            )
        self.now = max(self.now, self._step.run())
        if self._store_ops or self._retired_stores:
            self.apply_store_ops()  # a store switch: every rank between the same two steps
        self._service()

    def _digest(self) -> list[tuple[str, int]]:
        """The consensus checker's view of this rank: tree shape and residency, host slab,
        queued work."""
        fields = self.tree.state_digest()
        fields.append(("l2_used_slots", self.slab.used_slots if self.slab is not None else 0))
        fields.append(("pending_demotions", len(self._pending_demote)))
        if self.storage is not None:
            fields.append(("l3_lookups", len(self.storage.prefetches)))
        return fields

    # ------------------------------------------------------------------ helpers
    def _free_device(self, values: torch.Tensor) -> None:
        self.token_to_kv_pool_allocator.free_segment(values, start_pos=0)

    def _namespace(self, key: RadixKey) -> Hashable:
        return (key.extra_key, key.cache_salt)

    def _tokens(self, key: RadixKey) -> array:
        """Page-aligned token ids of ``key`` (EAGLE bigrams packed into one int64 each)."""
        key, _ = key.maybe_to_bigram_view(self.is_eagle)
        key = key.page_aligned(self.page_size)
        n = len(key)
        if key.is_bigram:
            raw = key.token_ids
            return array("q", ((raw[i] << 32) | (raw[i + 1] & 0xFFFFFFFF) for i in range(n)))
        raw = key.token_ids
        if not isinstance(raw, array) or raw.typecode != "q":
            raw = array("q", raw)
        return raw if len(raw) == n else raw[:n]

    @property
    def root_node(self) -> Node:
        return self.tree.root

    # ------------------------------------------------------------------ BasePrefixCache
    def reset(self) -> None:
        """Drop every device reference without freeing (the scheduler clears its pools).
        Copies in flight finish first, so no slot is written after it is handed out again."""
        self.engine.drain()
        self.tree.reset()
        self._kv_events_cleared()
        self._pending_demote = []
        self._pending_save = []
        self._loaded_by_rid = {}
        self._staged_for = StagedForRequests()
        self._new_by_rid = {}
        if self.storage is not None:
            self.storage.reset()
        self.tree_stale = False
        if self.slab is not None:
            self.slab.clear()
        self.resets += 1
        self._empty_indices = torch.empty((0,), dtype=torch.int64, device=self.device)

    def new_weights_epoch(
        self, weights: str, weight_version: str, *, stale: bool, why: str = "weights changed"
    ) -> None:
        """The weights changed (``weight_epochs.py`` calls this on every TP rank at the same
        point of the request stream): the page namespace takes the new ``weights`` and
        ``weight_version``, so L3 pages of the old weights are never read again, and what
        was written or found absent is forgotten. ``stale``: the tree was not reset with
        the update (SGLang's flush refused or skipped) and still holds the old weights'
        KV; L3 is then neither read nor written until the next ``reset``."""
        if self.identity is not None:
            self.identity = self.identity.with_weights(weights, weight_version)
            self.model_id = self.identity.key()
        else:
            base = self.model_id.split("#weights=", 1)[0]
            self.model_id = f"{base}#weights={weights}/version={weight_version}"
        if self.verifier is not None:
            self.verifier.forget()  # old digests describe another model
        self.tree_stale = self.tree_stale or stale
        if self.storage is not None:
            self.storage.new_epoch(self.model_id, suspend=stale)
        self.weights_epoch += 1
        logger.log(
            logging.WARNING if stale else logging.INFO,
            "hiradix: weights epoch %d after %s: weights %s, version %s%s",
            self.weights_epoch,
            why,
            weights,
            weight_version,
            "; the cache was not flushed: L3 is off until the next flush_cache" if stale else "",
        )

    def _empty_match(self) -> MatchResult:
        root = self.tree.root
        return MatchResult(
            device_prefix_len=0, last_device_node=root, last_host_node=root, best_match_node=root
        )

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if self.disable or len(params.key) == 0:
            return self._empty_match()
        tokens = self._tokens(params.key)
        if len(tokens) == 0:
            return self._empty_match()
        found = self.tree.match(self._namespace(params.key), tokens)
        return MatchResult(
            device_prefix_len=found.l1_len,
            last_device_node=found.l1_node,
            last_host_node=found.host_node,
            best_match_node=found.host_node,
            host_hit_length=found.host_len,
        )

    def touch_prefix(self, key: RadixKey) -> None:
        if self.disable or len(key) == 0:
            return
        tokens = self._tokens(key)
        if len(tokens):
            self.tree.touch(self._namespace(key), tokens)

    def checkpoint(self, req: Req, *, up_to: int, **kwargs: Any) -> None:
        """Insert row positions [0, up_to) page-aligned, repoint the row at the tree's
        copy, free the request's duplicate slots, and move the request's lock."""
        if self.disable:
            return
        token_ids = req.full_untruncated_fill_ids[:up_to]
        kv = req.kv
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx, : len(token_ids)]
        key = RadixKey(token_ids, req.extra_key, is_bigram=self.is_eagle, cache_salt=req.cache_salt)
        tokens = self._tokens(key)
        n = len(tokens)
        values = row[:n].to(dtype=torch.int64, copy=True)
        outcome = self.tree.insert(
            self._namespace(key),
            tokens,
            values,
            inserted_len=kv.cache_inserted_len,
            priority=req.priority or 0,
        )
        if kv.cache_inserted_len == 0:
            self._count_admission(req)
        kv.cache_inserted_len = max(kv.cache_inserted_len, n)
        if outcome.prefix_len > kv.cache_protected_len:
            self.token_to_kv_pool_allocator.free_segment(
                row[kv.cache_protected_len : outcome.prefix_len], start_pos=kv.cache_protected_len
            )
        self._on_inserted(outcome.node)
        node = outcome.node
        indices = self.path_device_indices(node)
        if len(indices) != n:
            raise RuntimeError(f"hiradix: path holds {len(indices)} device slots, key has {n}")
        if n > kv.cache_protected_len:
            self.req_to_token_pool.write(
                (kv.req_pool_idx, slice(kv.cache_protected_len, n)),
                indices[kv.cache_protected_len :],
            )
        kv.cache_protected_len = n
        self.unlock(req.lock)
        req.lock = self.lock(node)
        req.last_node = node

    def insert(self, params: InsertParams) -> InsertResult:
        """Plain insert of (key, device indices), as SGLang's ``RadixCache.insert``: the
        caller frees its own slots for the ``prefix_len`` already cached."""
        if self.disable:
            return InsertResult(prefix_len=0)
        tokens = self._tokens(params.key)
        values = params.value
        if values is None:
            values = torch.tensor(tokens, dtype=torch.int64)
        outcome = self.tree.insert(
            self._namespace(params.key),
            tokens,
            values[: len(tokens)],
            inserted_len=params.inserted_len,
            priority=params.priority or 0,
        )
        self._on_inserted(outcome.node)
        return InsertResult(prefix_len=outcome.prefix_len, last_device_node=outcome.node)

    def _count_admission(self, req: Req) -> None:
        """Per-tier hit accounting, once per request at its first checkpoint."""
        loaded = self._loaded_by_rid.pop(req.rid, 0)
        self._new_by_rid.pop(req.rid, None)
        staged = self._staged_for.pop(req.rid)  # admitted: its staging is used
        if staged:  # brought up from host memory for it while it waited
            loaded = min(req.prefix_len, loaded + staged)
        from_l3 = min(loaded, self._l3_by_rid.pop(req.rid, 0))
        self.stats.add("prompt_tokens", len(req.origin_input_ids))
        self.stats.add("l1_hit_tokens", max(0, req.prefix_len - loaded))
        self.stats.add("l2_hit_tokens", loaded - from_l3)
        self.stats.add("l3_hit_tokens", from_l3)
        self._computed_tokens += max(0, len(req.origin_input_ids) - req.prefix_len)

    def _on_inserted(self, node: Node) -> None:
        """Queue the inserted path for write-through; ``flush_pending_backups`` submits it."""
        if self.slab is not None and self.write_policy != "write_back":
            self._pending_demote.append(node)

    def flush_pending_backups(self) -> None:
        if self.disable:
            return
        self.step()
        now = self.now
        if self._computed_tokens and self.storage is not None and now - self._last_flush < 5.0:
            # a batch that prefilled these tokens just ended: an online prefill speed
            self.storage.cost.observe_prefill(self._computed_tokens, now - self._last_flush)
        self._computed_tokens = 0
        self._last_flush = now

    def stats_snapshot(self) -> StatsSnapshot:
        """Counters and gauges of this cache (Python API; Prometheus mirrors them)."""
        return self.stats.snapshot()

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        start = time.perf_counter()
        demote = self._write_back if self.write_policy == "write_back" else None
        freed = self.tree.evict_l1(params.num_tokens, demote=demote)
        self.stats.add("l1_evicted_tokens", freed)
        self.update_eviction_metrics(freed, start)
        return EvictResult(num_tokens_evicted=freed)

    def inc_lock_ref(self, node: Node) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        return IncLockRefResult(delta=self.tree.lock(node))

    def dec_lock_ref(self, node: Node, params: DecLockRefParams | None = None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        return DecLockRefResult(delta=self.tree.unlock(node))

    def path_device_indices(self, node: Node) -> torch.Tensor:
        values = self.tree.path_l1(node)
        if not values:
            return self._empty_indices
        if len(values) == 1:
            return values[0]
        return torch.cat(values)

    def evictable_size(self) -> int:
        return self.tree.evictable_tokens

    def full_evictable_size(self) -> int:
        return self.tree.evictable_tokens

    def protected_size(self) -> int:
        return self.tree.protected_tokens

    def full_protected_size(self) -> int:
        return self.tree.protected_tokens

    def total_size(self) -> int:
        return self.tree.l1_total()

    def pretty_print(self) -> None:
        print(self.tree.dump(), file=sys.stderr)
        print(
            f"#tokens: l1={self.tree.l1_total()} (evictable={self.tree.evictable_tokens} "
            f"protected={self.tree.protected_tokens}) l2={self.tree.l2_tokens}",
            file=sys.stderr,
        )

    def supports_prefix_sharing(self) -> bool:
        return not self.disable

    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, Any] | None:
        """Bring the host-only run ending at ``best_match_node`` back to device. Returns
        ``(tokens, node)``, ``(0, device anchor)`` when the run changed since the match, or
        ``None`` when device memory cannot be had now (the scheduler retries)."""
        node: Node = params.best_match_node
        run: list[Node] = []
        cur = node
        while cur.l1 is None and cur.parent is not None and cur.parent is not self.tree.root:
            run.append(cur)
            cur = cur.parent
        anchor = cur
        run.reverse()
        total = sum(len(x) for x in run)
        if (
            self.slab is None
            or total == 0
            or total != params.host_hit_length
            or node.parent is None
        ):
            return 0, anchor
        if any(not x.l2_ready for x in run):
            return 0, anchor
        if not self._load_run(run, anchor):
            return None
        if params.req is not None:
            rid = params.req.rid
            self._loaded_by_rid[rid] = self._loaded_by_rid.get(rid, 0) + total
        return total, node

    def release_aborted_request(self, handle: Any) -> None:
        rid = getattr(handle, "rid", None)
        self._loaded_by_rid.pop(rid, None)
        self._staged_for.pop(rid)
        self._new_by_rid.pop(rid, None)
        self._l3_by_rid.pop(rid, None)
        self._l3_to_report.pop(rid, None)
        if self.storage is not None and rid is not None:
            self.storage.forget(rid)
        if rid is not None:  # the policy forgets what it kept for the request
            for plan in self.policy.on_abort(AbortEvent(self.now, rid)):
                self._execute(plan)

    def ready_to_load_host_cache(self) -> int:
        return -1

    def check_hicache_events(self) -> None:
        self.step()

    def release_host_resources(self) -> None:
        self.engine.shutdown()
        if self.storage is not None:
            try:
                self.storage.store.close()
            except Exception as exc:  # noqa: BLE001 - shutdown must not fail on a dead store
                logger.debug("hiradix: closing the L3 store: %r", exc)
