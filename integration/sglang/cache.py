"""``HiRadixCache``: SGLang's ``BasePrefixCache`` over hiradix's tiered tree.

This adapter translates SGLang's objects (``Req``, ``RadixKey``, device index tensors)
into the core's types and back. It owns no threads: copies between tiers are submitted to
the transfer engine and their completions are polled from the scheduler's own calls
(``match_prefix``, ``evict``, ``flush_pending_backups``, ``check_hicache_events``).

Contract references are to SGLANG-0.5.23.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from array import array
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from hiradix.backends.host_slab import HostSlab
from hiradix.integration.sglang.agreed_step import AgreedStep, check_enabled
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

from hiradix.kv_copy import LayerEvents, LayerLoadGate, make_copier
from hiradix.metrics import PrometheusExporter, Stats, StatsSnapshot
from hiradix.policies.base import (
    ArrivalEvent,
    Cold,
    FinishEvent,
    GuardedPolicy,
    PathView,
    Stage,
    StagedForRequests,
    TickEvent,
    TierRun,
)
from hiradix.policies.registry import create_policy
from hiradix.policies.views import RadixTreeView
from hiradix.storage_tier import StorageTier, wait_ready
from hiradix.transfer import TransferEngine
from hiradix.tree import Node, RadixTree, Ticket, TierTtl, TtlRules
from hiradix.types import Tier
from hiradix.verify import PageVerifier, digest, mode_from_env

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from hiradix.config import HiradixConfig

logger = logging.getLogger(__name__)


def ttl_rules(config: HiradixConfig) -> TtlRules:
    """The tree's TTL rules from the config's ``ttl`` section."""

    def tier(rule: Any) -> TierTtl:
        return TierTtl(rule.seconds, rule.mode.value == "sliding")

    return TtlRules(
        device=tier(config.ttl.device), host=tier(config.ttl.host), max_age=config.ttl.max_age
    )


RETRY_LIMIT = 256  # paths waiting for host memory to drain to L3
MAX_BACKGROUND_PREFETCH = 64  # L3 lookups in flight for policy plans and requests
TICK_SECONDS = 1.0  # how often the prefetch policy's on_tick runs (agreed clock)


class HiRadixCache(BasePrefixCache):
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
        model_id: str = "model",
        tp_group: Any = None,
        shard: tuple[int, int] = (0, 1),
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
        self.shard = shard  # (this rank among all TP x PP ranks, how many)
        self.storage: StorageTier | None = None
        if self.slab is not None and config.store.kind.value != "none":
            self._init_store(model_id)
        self.policy = GuardedPolicy(create_policy(config.prefetch))
        self._last_tick = 0.0
        self._computed_tokens = 0
        self._last_flush = self.now
        self._plan_seq = 0
        self._announced: set[str] = set()
        self._step: AgreedStep | None = None
        self.reset()

    # SGLang reads these on the storage-prefetch path (SGLANG-0.5.23.md section 2)
    hicache_storage_pass_prefix_keys = False

    @property
    def wants_storage_prefetch(self) -> bool:
        """Whether the scheduler should call the storage-prefetch hooks on arrival: with an
        L3 store, and with a host tier whose prefetch policy wants arrival events (they
        ride on the same calls; without a store nothing is looked up)."""
        if self.storage is not None:
            return True
        return self.slab is not None and self.policy.name != "none"

    def _init_store(self, model_id: str) -> None:
        from hiradix.backends.base import make_key
        from hiradix.backends.lazy import LazyStore
        from hiradix.backends.registry import create_store

        from hiradix.breaker import CircuitBreaker

        store_cfg = self.config.store
        kind = store_cfg.kind.value
        rank, ranks = self.shard
        if kind == "nvme" and ranks > 1:  # a directory and a capacity share per rank
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
        ttl = self.config.ttl.store
        assert self.slab is not None
        self.storage = StorageTier(
            store,
            self.engine,
            self.slab,
            self.tree,
            stats=self.stats,
            model_id=model_id,
            tenant=self.config.namespace,
            make_key=lambda ns_hex, key_hex: make_key(prefix, ns_hex, key_hex),
            block_tokens=store_cfg.block_tokens,
            codec=self.config.compression.codec.value,
            level=self.config.compression.level,
            mac_key=store_cfg.mac_key(),
            ttl=ttl.seconds,
            sliding=ttl.mode.value == "sliding",
            presence_ttl=store_cfg.presence_ttl,
            write_queue_pages=store_cfg.write_queue_pages,
            breaker=CircuitBreaker(),
            clock=self._agreed_now,
        )
        self.storage.verifier = self.verifier
        self.storage.queued = lambda: len(self.waiting())
        logger.info(
            "hiradix: L3 %s store, %d-token pages, model id %s",
            kind,
            store_cfg.block_tokens,
            model_id,
        )

    def _tp_size(self) -> int:
        if self.tp_group is None:
            return 1
        return torch.distributed.get_world_size(group=self.tp_group)

    def _reduce_min(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=self.tp_group)
        return tensor.tolist()

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
            multi = self._tp_size() > 1
            self._step = AgreedStep(
                self.engine,
                self.clock,
                self._reduce_min if multi else None,
                digest=self._digest if multi and check_enabled() else None,
            )
        self.now = max(self.now, self._step.run())
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

    def _init_host_tier(self, forward_stream: Any) -> None:
        """Size and allocate the host slab from the config and the device pool's shape."""
        kv = self.token_to_kv_pool_allocator.get_kvcache()
        device_k = getattr(kv, "k_buffer", None)
        device_v = getattr(kv, "v_buffer", None)
        if not device_k or not device_v:
            logger.warning(
                "hiradix: host tier disabled: KV pool %s has no per-layer K/V buffers",
                type(kv).__name__,
            )
            return
        l1_bytes = sum(t.numel() * t.element_size() for t in (*device_k, *device_v))
        host_bytes = self.config.host.resolve_bytes(l1_bytes)
        if host_bytes <= 0:
            return
        per_token = l1_bytes // device_k[0].shape[0]
        slots = HostSlab.slots_for_bytes(host_bytes, per_token)
        if slots < self.page_size:
            logger.warning("hiradix: host tier of %d bytes holds no page; disabled", host_bytes)
            return
        k0, v0 = device_k[0], device_v[0]
        self.slab = HostSlab(
            slots,
            layers=len(device_k),
            heads=k0.shape[1],
            head_dim=k0.shape[2],
            v_head_dim=v0.shape[2],
            dtype=k0.dtype,
            page_size=self.page_size,
            pin_memory=k0.is_cuda,
        )
        self.tree.free_l2 = self.slab.free
        self._device_kv = [*device_k, *device_v]
        if k0.is_cuda and getattr(kv, "layer_transfer_counter", None) is None:
            self.load_gate = LayerLoadGate()
            kv.register_layer_transfer_counter(self.load_gate)
        self.engine = TransferEngine(
            make_copier(
                device_k,
                device_v,
                self.slab,
                **(
                    {"forward_stream": forward_stream}
                    if k0.is_cuda and forward_stream is not None
                    else {}
                ),
            )
        )
        self.stats.gauges["l2_total_slots"] = self.slab.num_slots
        logger.info(
            "hiradix: host tier %d slots (%.1f MiB, %d B/token, %s memory)",
            slots,
            slots * per_token / 2**20,
            per_token,
            "pinned" if k0.is_cuda else "plain",
        )

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
        self._pending_demote = []
        self._pending_save = []
        self._loaded_by_rid = {}
        self._staged_for = StagedForRequests()
        self._new_by_rid = {}
        if self.storage is not None:
            self.storage.reset()
        if self.slab is not None:
            self.slab.clear()
        self._empty_indices = torch.empty((0,), dtype=torch.int64, device=self.device)

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

    # ------------------------------------------------------------------ verify mode
    def _device_digests(self, device_idx: torch.Tensor) -> list[bytes]:
        """Digest of each page's KV (every layer, K and V) at ``device_idx``."""
        n = len(device_idx)
        if n == 0 or not self._device_kv:
            return []
        idx = device_idx.to(self._device_kv[0].device)
        rows = [t.index_select(0, idx).reshape(n, -1).view(torch.uint8) for t in self._device_kv]
        pages = torch.cat(rows, dim=1).reshape(n // self.page_size, -1).cpu().numpy()
        return [digest(row.tobytes()) for row in pages]

    def _verify_load(self, run: list[Node], device_idx: torch.Tensor, handle: Any) -> bool:
        """Verify mode: whether the pages loaded into ``device_idx`` are the KV written down
        for ``run``. On a mismatch the device slots are freed and the run's host copies
        dropped, so the request recomputes instead of reading wrong KV."""
        assert self.verifier is not None
        handle.wait()
        keys = [key for x in run for key in self.tree.page_keys(x)]
        if not self.verifier.check(keys, self._device_digests(device_idx), "load-back to L1"):
            return True
        self._free_device(device_idx)
        return False

    def _verify_record(self, node: Node) -> None:
        """Verify mode: remember the digests of ``node``'s device pages as they go down."""
        if self.verifier is not None and node.l1 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the forward that wrote them is done
            self.verifier.record(self.tree.page_keys(node), self._device_digests(node.l1))

    # ------------------------------------------------------------------ host tier
    def _qualifies(self, node: Node) -> bool:
        if self.write_policy == "write_through_selective":
            return node.hits >= self.config.write_through_hits
        return self.write_policy == "write_through"

    def _host_slots(self, node: Node) -> torch.Tensor | None:
        """Host slots for ``node``, evicting unpinned host leaves (never its parent)."""
        assert self.slab is not None
        need = len(node)
        slots = self.slab.alloc(need)
        if slots is None:
            parent = node.parent
            assert parent is not None
            # a parent known only on host must keep that copy (the path would break)
            keep = parent.l1 is None and parent.l2 is not None
            pin = self.tree.pin_l2(parent) if keep else None
            try:
                freed = self.tree.evict_l2(need - self.slab.free_slots)
                self.stats.add("l2_evicted_tokens", freed)
            finally:
                if pin is not None:
                    self.tree.unpin_l2(pin)
            slots = self.slab.alloc(need)
        if slots is None:
            self.stats.add("l2_full_skips")
        return slots

    def _demote_path(self, last: Node) -> bool:
        """Write the path down to ``last`` through to host memory, top-down; long nodes go
        in pieces of at most a quarter of the slab, so that no node is too big to demote.
        Returns False when host memory is full of pages still in flight (retry later: they
        drain to L3 and become evictable)."""
        assert self.slab is not None
        chunk = max(self.page_size, min(self.slab.num_slots // 4, 4096))
        if self.storage is not None and chunk >= self.storage.block:
            chunk -= chunk % self.storage.block  # pieces never split an L3 page
        for whole in self.tree.path(last):
            if whole.l2 is not None:
                continue
            if whole.l1 is None or not self._qualifies(whole):
                return True
            for node in self.tree.split_long(whole, chunk):
                if node.l2 is not None:
                    continue
                if not self.tree.host_parent_ok(node):
                    return True
                slots = self._host_slots(node)
                if slots is None:
                    return False
                ticket = Ticket()
                self.tree.attach_l2(node, slots, ticket)
                self.tree.lock(node)  # device slots stay put while the copy reads them
                self.engine.demote(
                    node.l1, slots, lambda ok, n=node, t=ticket: self._demoted(n, t, ok)
                )
                self._verify_record(node)
        return True

    def _demoted(self, node: Node, ticket: Ticket, ok: bool) -> None:
        size = len(node)
        self.tree.unlock(node)
        self.tree.finish_ticket(node, ticket, ok)
        if ok:
            self.stats.add("l1_to_l2_tokens", size)
            self.stats.add("d2h_bytes", size * self.slab.bytes_per_token if self.slab else 0)
            if self.storage is not None:
                self._pending_save.append(node)
        else:
            self.stats.add("copy_failures")

    def _write_back(self, node: Node) -> bool:
        """Write-back policy: give an L1 victim a host copy right before it is dropped."""
        if self.slab is None:
            return False
        slots = self._host_slots(node)
        if slots is None:
            return False
        assert self.engine.copier is not None
        self.engine.copier.device_to_host(node.l1, slots).wait()
        self._verify_record(node)
        self.tree.attach_l2(node, slots, None)
        if self.storage is not None:
            self._pending_save.append(node)
        self.stats.add("l1_to_l2_tokens", len(node))
        self.stats.add("d2h_bytes", len(node) * self.slab.bytes_per_token)
        return True

    def _service(self) -> None:
        """The agreed step's housekeeping: queued demotions, L3 writes, TTL, gauges."""
        if self._pending_demote:
            pending, self._pending_demote = self._pending_demote, []
            retry = []
            for node in pending:
                if node.parent is not None and node.l1 is not None and not self._demote_path(node):
                    retry.append(node)
            self._pending_demote = retry[:RETRY_LIMIT] + self._pending_demote
        if self._pending_save:
            pending_save, self._pending_save = self._pending_save, []
            assert self.storage is not None
            for node in _deepest(pending_save):
                if node.parent is not None and node.l2_ready:
                    self.storage.save_path(node)
        self._tick()
        before = dict(self.tree.expired_tokens)
        self.tree.sweep()
        self.stats.add("l1_expired_tokens", self.tree.expired_tokens["l1"] - before["l1"])
        self.stats.add("l2_expired_tokens", self.tree.expired_tokens["l2"] - before["l2"])
        gauges = self.stats.gauges
        gauges["l1_tokens"] = self.tree.l1_total()
        gauges["l1_protected_tokens"] = self.tree.protected_tokens
        gauges["l2_used_slots"] = self.slab.used_slots if self.slab is not None else 0
        gauges["l2_tokens"] = self.tree.l2_tokens
        gauges["in_flight"] = self.engine.in_flight
        if self.verifier is not None:
            self.stats.counters["verify_checked_pages"] = self.verifier.checked
            self.stats.counters["verify_unchecked_pages"] = self.verifier.unchecked
            self.stats.counters["verify_mismatches"] = self.verifier.mismatches
        if self.exporter is not None:
            self.exporter.export(self.stats)

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

    def _load_run(self, run: list[Node], anchor: Node) -> bool:
        """Copy the host-ready ``run`` (a chain hanging below the device-resident
        ``anchor``) to new device slots and attach them. Later forwards see the KV: on CUDA
        they wait for the copy (per layer through the load gate, else one event); on CPU
        the copy is done on return. The host copies stay pinned until the copy has read
        them. ``False`` when the device slots cannot be had (or, in verify mode, when what
        landed is not what went down: the host copies are then dropped)."""
        total = sum(len(x) for x in run)
        pins = [self.tree.pin_l2(x) for x in run]
        handle: Any = None
        rejected = False
        try:
            allocator = self.token_to_kv_pool_allocator
            if allocator.available_size() < total:
                self.tree.lock(anchor)
                try:
                    self.evict(EvictParams(num_tokens=total - allocator.available_size()))
                finally:
                    self.tree.unlock(anchor)
            device_idx = allocator.alloc(total)
            if device_idx is None:
                return False
            host_idx = torch.cat([x.l2 for x in run]) if len(run) > 1 else run[0].l2
            handle = self.engine.load(host_idx, device_idx)
            if isinstance(handle, LayerEvents) and self.load_gate is not None:
                self.load_gate.add(handle)  # attention on layer i waits for layer i only
            elif isinstance(handle, LayerEvents) and self.forward_stream is not None:
                self.forward_stream.wait_event(handle.events[-1])
            else:
                handle.wait()
            if self.verifier is not None and not self._verify_load(run, device_idx, handle):
                rejected = True
                return False
            offset = 0
            for x in run:
                self.tree.attach_l1(x, device_idx[offset : offset + len(x)])
                offset += len(x)
        finally:
            if handle is not None and not handle.done():
                self.engine.track(handle, lambda ok: self._unpin(pins))
            else:
                self._unpin(pins)
            if rejected:
                for x in run:
                    if x.parent is not None and x.l2 is not None:
                        self.tree.evict_host_copy(x)
        self.stats.add("l2_to_l1_tokens", total)
        self.stats.add("h2d_bytes", total * self.slab.bytes_per_token)
        return True

    def _unpin(self, pins: list[Any]) -> None:
        for pin in pins:
            self.tree.unpin_l2(pin)

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

    def release_aborted_request(self, handle: Any) -> None:
        rid = getattr(handle, "rid", None)
        self._loaded_by_rid.pop(rid, None)
        self._staged_for.pop(rid)
        self._new_by_rid.pop(rid, None)
        self._l3_by_rid.pop(rid, None)
        self._l3_to_report.pop(rid, None)
        if self.storage is not None and rid is not None:
            self.storage.forget(rid)

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
        tokens = array("q", matched_prefix_tokens)
        tokens.extend(new_input_tokens)
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
        view = PathView(array("q", req.full_untruncated_fill_ids), namespace)
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


def _deepest(nodes: list[Node]) -> list[Node]:
    """Drop nodes that are ancestors of another node in the list (their path is saved
    with the descendant's)."""
    ancestors: set[int] = set()
    for node in nodes:
        cur = node.parent
        while cur is not None and id(cur) not in ancestors:
            ancestors.add(id(cur))
            cur = cur.parent
    seen: set[int] = set()
    out = []
    for node in nodes:
        if id(node) not in ancestors and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def _is_prefix(plan_tokens: Any, tokens: array) -> bool:
    n = len(plan_tokens)
    return 0 < n <= len(tokens) and array("q", plan_tokens) == tokens[:n]
