"""``HiRadixCache``: SGLang's ``BasePrefixCache`` over hiradix's tiered tree.

This adapter translates SGLang's objects (``Req``, ``RadixKey``, device index tensors)
into the core's types and back. It owns no threads: copies between tiers are submitted to
the transfer engine and their completions are polled from the scheduler's own calls
(``match_prefix``, ``evict``, ``flush_pending_backups``, ``check_hicache_events``).

Contract references are to SGLANG-0.5.23.md.
"""

from __future__ import annotations

import logging
import sys
import time
from array import array
from typing import TYPE_CHECKING, Any, Hashable, Optional

import torch
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

from hiradix.tree import Node, RadixTree, TierTtl, TtlRules

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


class HiRadixCache(BasePrefixCache):
    """Prefix cache for SGLang whose tree spans device, host and store tiers."""

    sliding_window_size = None

    def __init__(
        self,
        params: CacheInitParams,
        config: HiradixConfig,
        *,
        clock: Any = time.monotonic,
    ):
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        self.is_eagle = params.is_eagle
        self.config = config
        self.clock = clock
        allocator = self.token_to_kv_pool_allocator
        dev = getattr(allocator, "device", "cpu") if allocator is not None else "cpu"
        self.device = torch.device(dev) if isinstance(dev, (str, torch.device)) else torch.device("cpu")
        if params.enable_metrics:
            self.init_metrics_collector()
        self.tree = RadixTree(
            self.page_size,
            eviction=config.eviction_policy.value,
            ttl=ttl_rules(config),
            clock=clock,
            free_l1=self._free_device,
        )
        self.stats_l1_hit_tokens = 0
        self.stats_l1_evicted_tokens = 0
        self.reset()

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
        """Drop every device reference without freeing (the scheduler clears its pools)."""
        self.tree.reset()
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
        kv.cache_inserted_len = max(kv.cache_inserted_len, n)
        if outcome.prefix_len > kv.cache_protected_len:
            self.token_to_kv_pool_allocator.free_segment(
                row[kv.cache_protected_len : outcome.prefix_len], start_pos=kv.cache_protected_len
            )
        self._on_inserted(outcome.new_nodes)
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
        self._on_inserted(outcome.new_nodes)
        return InsertResult(prefix_len=outcome.prefix_len, last_device_node=outcome.node)

    def _on_inserted(self, new_nodes: tuple[Node, ...]) -> None:
        """Hook for tiers below L1 (write-through demotion)."""

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        start = time.perf_counter()
        freed = self.tree.evict_l1(params.num_tokens)
        self.stats_l1_evicted_tokens += freed
        self.update_eviction_metrics(freed, start)
        return EvictResult(num_tokens_evicted=freed)

    def inc_lock_ref(self, node: Node) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        return IncLockRefResult(delta=self.tree.lock(node))

    def dec_lock_ref(
        self, node: Node, params: Optional[DecLockRefParams] = None
    ) -> DecLockRefResult:
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

    def init_load_back(self, params: InitLoadBackParams) -> Optional[tuple[int, Any]]:
        # No host tier in this class: match_prefix never reports host hits.
        return 0, params.best_match_node

    def ready_to_load_host_cache(self) -> int:
        return -1

    def check_hicache_events(self) -> None:
        return None

    def pop_prefetch_loaded_tokens(self, handle: Any) -> int:
        return 0
