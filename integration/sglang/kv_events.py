"""SGLang's KV events for every hiradix tier (``--kv-events-config``).

Cache-aware routers (SGLang's router, Dynamo's KV router) learn where prefixes live from
the ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events that SGLang's
scheduler publishes: once per step it drains ``tree_cache.take_events()`` on the one rank
that publishes (pipeline, attention-TP and attention-CP rank 0; the scheduler sets
``CacheInitParams.enable_kv_cache_events`` only there, so other ranks record nothing).

:class:`KvEvents` (a mixin of ``HiRadixCache``) records them with SGLang's own
``KVCacheEventRecorder`` (its queue, coalescing and ``take``) and event types:

- one block per page (``block_size`` = page size), hashed exactly as SGLang's
  ``RadixCache`` hashes it: the SHA-256 page chain of ``get_hash_str`` (seeded by the
  ``cache_salt`` as SGLang seeds its event chain), its first 64 bits, then
  ``namespaced_block_hash`` with SGLang's namespace seed (a registered LoRA's
  ``extra_key``; with ``format: dynamo`` the ``extra_key`` and ``cache_salt``). A hash
  depends only on the page's whole prefix and namespace, so node splits never change it;
- per tier a medium: L1 ``GPU``, L2 ``CPU_PINNED``, the NVMe store ``DISK``, Redis (and
  any other store) ``EXTERNAL``;
- a page is reported stored in a medium when its first copy arrives there and removed
  when the last leaves (evicted, expired, dropped), so a consumer never sees a page
  removed twice from a medium without being stored again;
- L3 events say what this instance wrote, found or read, and when it learnt a page is
  gone (a lookup or a read found it missing) or estimates that it expired (the store's
  TTL after this instance last wrote, found or read it). The L3 view is bounded
  (``MAX_L3_PAGES``; the oldest are reported removed). See the README for what a router
  may conclude from it.

Everything here runs on the scheduler thread: the tree calls the listener from its
mutations, the L3 tier from store completions applied at the agreed step.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from sglang.srt.disaggregation.kv_events import (
    BlockRemoved,
    BlockStored,
    StorageMedium,
    kv_event_namespace_seed,
    namespaced_block_hash,
)
from sglang.srt.mem_cache.events import KVCacheEventRecorder
from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64

from hiradix.tree import Node, RadixTree
from hiradix.types import Tier

logger = logging.getLogger(__name__)

#: L3 pages this instance vouches for, per store (the oldest are reported removed)
MAX_L3_PAGES = 1 << 18
#: page hashes kept for nodes (recomputed from the parent's when evicted from this cache)
MAX_CACHED_PAGES = 1 << 21

_TIER_MEDIUM = {Tier.L1: StorageMedium.GPU, Tier.L2: StorageMedium.CPU}


@dataclass(slots=True)
class _NodeHashes:
    pages: list[int]  # each page's SGLang hash, 64 bits, before namespacing
    last_hex: str  # the last page's full digest: what the next page chains from


def _namespace_parts(namespace: Hashable) -> tuple[str | None, str | None]:
    """``(extra_key, cache_salt)`` of a tree namespace (``HiRadixCache._namespace``)."""
    if isinstance(namespace, tuple) and len(namespace) == 2:
        return namespace[0], namespace[1]
    return None, None


def _chain_seed(cache_salt: str | None) -> str | None:
    """What SGLang's event hash chain starts from (``compute_node_event_hash_values``):
    the salt's digest, or nothing (``extra_key`` enters only the namespace seed)."""
    if cache_salt is None:
        return None
    return hashlib.sha256(b"sglang-cache-salt-v1\0" + cache_salt.encode("utf-8")).hexdigest()


def store_medium(source: Any) -> StorageMedium:
    """The medium of an L3 tier's store: ``DISK`` for local NVMe files, else
    ``EXTERNAL`` (Redis, shared by every instance)."""
    store = getattr(source, "store", None)
    name = getattr(store, "description", None) or type(store).__name__
    return StorageMedium.DISK if "nvme" in str(name).lower() else StorageMedium.EXTERNAL


class TierEventLog:
    """The tree's and the L3 tier's listener (``hiradix/tier_events.py``): turns pages
    arriving in and leaving each tier into SGLang events on ``recorder``."""

    def __init__(
        self,
        recorder: KVCacheEventRecorder,
        tree: RadixTree,
        *,
        current_store: Callable[[], Any],
        now: Callable[[], float],
    ):
        self.recorder = recorder
        self.page_size = recorder.page_size
        self.tree = tree
        self.current_store = current_store
        self.now = now
        self._held: dict[StorageMedium, dict[int, int]] = {m: {} for m in _TIER_MEDIUM.values()}
        self._nodes: OrderedDict[int, _NodeHashes] = OrderedDict()
        self._cached_pages = 0
        self._l3: OrderedDict[int, float] = OrderedDict()  # hash -> estimated expiry
        self._l3_source: Any = None
        self._l3_medium = StorageMedium.EXTERNAL

    # ------------------------------------------------------------------ hashes
    def _event_seed(self, extra_key: str | None, cache_salt: str | None) -> bytes | None:
        """SGLang's namespace seed (``KVCacheEventRecorder._namespace_seed``)."""
        if self.recorder.dynamo_format:
            return kv_event_namespace_seed(extra_key=extra_key, cache_salt=cache_salt)
        lora = self.recorder.lora_names.get(extra_key) is not None
        return kv_event_namespace_seed(extra_key=extra_key if lora else None, cache_salt=None)

    def _lora_name(self, extra_key: str | None) -> str | None:
        names = self.recorder.lora_names
        return names.resolve(extra_key) if self.recorder.dynamo_format else names.get(extra_key)

    def _remember(self, node_id: int, entry: _NodeHashes) -> None:
        old = self._nodes.pop(node_id, None)
        if old is not None:
            self._cached_pages -= len(old.pages)
        self._nodes[node_id] = entry
        self._cached_pages += len(entry.pages)
        while self._cached_pages > MAX_CACHED_PAGES and len(self._nodes) > 1:
            _, dropped = self._nodes.popitem(last=False)
            self._cached_pages -= len(dropped.pages)

    def _hashes(self, node: Node) -> _NodeHashes:
        """``node``'s page hashes, chained from its ancestors' (computed once per node; a
        node cut by a split keeps its id and the tail of its list)."""
        missing: list[Node] = []
        cur: Node | None = node
        found: _NodeHashes | None = None
        while cur is not None and len(cur) > 0:  # the roots hold no pages
            found = self._nodes.get(cur.id)
            if found is not None:
                break
            missing.append(cur)
            cur = cur.parent
        _, salt = _namespace_parts(node.namespace)
        prior = found.last_hex if found is not None else _chain_seed(salt)
        entry = found
        for item in reversed(missing):
            digests = get_hash_str(item.tokens, prior, page_size=self.page_size)
            assert isinstance(digests, list)
            entry = _NodeHashes([hash_str_to_int64(d) for d in digests], digests[-1])
            self._remember(item.id, entry)
            prior = entry.last_hex
        assert entry is not None
        pages = len(node) // self.page_size
        if len(entry.pages) > pages:  # split since: the lower part keeps the tail
            entry = _NodeHashes(entry.pages[-pages:], entry.last_hex)
            self._remember(node.id, entry)
        elif found is entry:
            self._nodes.move_to_end(node.id)
        return entry

    def _token_hashes(self, namespace: Hashable, tokens: array, pages: int) -> list[int]:
        """The first ``pages`` page hashes of ``tokens`` (L3 events: the path may have left
        the tree). One native call over the prefix."""
        _, salt = _namespace_parts(namespace)
        digests = get_hash_str(
            tokens[: pages * self.page_size], _chain_seed(salt), page_size=self.page_size
        )
        assert isinstance(digests, list)
        return [hash_str_to_int64(d) for d in digests]

    def _emit_stored(
        self,
        blocks: list[int],
        new: list[bool],
        parent: int | None,
        tokens: array,
        namespace: Hashable,
        medium: StorageMedium,
    ) -> None:
        """``BlockStored`` for the pages whose ``new`` flag says they are new to
        ``medium``: one per run of consecutive new pages, which is what the recorder's
        coalescing makes of SGLang's one event per page. ``blocks``: the pages' hashes,
        ``tokens`` theirs, ``parent`` the hash of the page before the first."""
        extra_key, salt = _namespace_parts(namespace)
        lora_name = self._lora_name(extra_key)
        size = self.page_size
        i, n = 0, len(blocks)
        while i < n:
            if not new[i]:
                i += 1
                continue
            j = i + 1
            while j < n and new[j]:
                j += 1
            self.recorder.enqueue(
                BlockStored(
                    block_hashes=blocks[i:j],
                    parent_block_hash=blocks[i - 1] if i else parent,
                    token_ids=tokens[i * size : j * size].tolist(),
                    block_size=size,
                    lora_id=None,
                    medium=medium,
                    cache_salt=salt,
                    lora_name=lora_name,
                )
            )
            i = j

    def _namespaced(self, raw: list[int], namespace: Hashable) -> list[int]:
        """The published hashes of pages whose SGLang hashes are ``raw`` (``raw`` itself
        when the namespace adds nothing; never modified)."""
        seed = self._event_seed(*_namespace_parts(namespace))
        if seed is None:
            return raw
        return [namespaced_block_hash(value, namespace_seed=seed) for value in raw]

    # ------------------------------------------------------------------ L1 and L2
    def arrived(self, node: Node, tier: Tier) -> None:
        medium = _TIER_MEDIUM[tier]
        held = self._held[medium]
        blocks = self._namespaced(self._hashes(node).pages, node.namespace)
        new = []
        for block in blocks:
            count = held.get(block, 0)
            held[block] = count + 1
            new.append(count == 0)
        parent = node.parent
        parent_block = None
        if parent is not None and len(parent):
            last = self._hashes(parent).pages[-1:]
            parent_block = self._namespaced(last, node.namespace)[0]
        self._emit_stored(blocks, new, parent_block, node.tokens, node.namespace, medium)

    def left(self, node: Node, tier: Tier) -> None:
        medium = _TIER_MEDIUM[tier]
        held = self._held[medium]
        removed = []
        for block in self._namespaced(self._hashes(node).pages, node.namespace):
            count = held.get(block, 0)
            if count == 1:
                del held[block]
                removed.append(block)
            elif count > 1:
                held[block] = count - 1
            # count 0: the pages never arrived (a host copy that failed)
        if removed:
            self.recorder.enqueue(BlockRemoved(block_hashes=removed, medium=medium))

    # ------------------------------------------------------------------ L3
    def _is_current(self, source: Any) -> bool:
        """Whether ``source`` is the cache's store now; a store switched away from takes
        back what was reported for it (this instance no longer reads it)."""
        current = self.current_store()
        if current is not self._l3_source:
            self._forget_l3(len(self._l3))
            self._l3_source = current
            self._l3_medium = store_medium(current)
        return source is not None and source is current

    def _forget_l3(self, count: int) -> None:
        removed = [self._l3.popitem(last=False)[0] for _ in range(min(count, len(self._l3)))]
        if removed:
            self.recorder.enqueue(BlockRemoved(block_hashes=removed, medium=self._l3_medium))

    def l3_present(
        self, source: Any, namespace: Hashable, tokens: array, blocks: Sequence[int]
    ) -> None:
        if not blocks or not self._is_current(source):
            return
        per_block = source.block // self.page_size
        wanted = sorted(set(blocks))
        raw = self._token_hashes(namespace, tokens, (wanted[-1] + 1) * per_block)
        ttl = getattr(source, "ttl", None)
        until = self.now() + ttl if ttl else float("inf")
        l3 = self._l3
        published = self._namespaced(raw, namespace)
        size = self.page_size
        for b in wanted:
            lo, hi = b * per_block, (b + 1) * per_block
            blocks = published[lo:hi]
            new = []
            for block in blocks:
                new.append(block not in l3)
                l3[block] = until
                l3.move_to_end(block)
            parent = published[lo - 1] if lo else None
            page_tokens = tokens[lo * size : hi * size]
            self._emit_stored(blocks, new, parent, page_tokens, namespace, self._l3_medium)
        self._forget_l3(len(l3) - MAX_L3_PAGES)

    def l3_absent(self, source: Any, namespace: Hashable, tokens: array, block: int) -> None:
        if not self._is_current(source):
            return
        per_block = source.block // self.page_size
        raw = self._token_hashes(namespace, tokens, (block + 1) * per_block)
        removed = []
        for value in self._namespaced(raw[block * per_block :], namespace):
            if self._l3.pop(value, None) is not None:
                removed.append(value)
        if removed:
            self.recorder.enqueue(BlockRemoved(block_hashes=removed, medium=self._l3_medium))

    def store_cleared(self) -> None:
        """The store is being emptied (an operator's clear): report its pages removed."""
        self._is_current(None)
        self._forget_l3(len(self._l3))

    def expire(self, now: float) -> None:
        """Report the L3 pages whose estimated expiry passed (oldest first: estimates are
        in order, each being the agreed clock plus the store's TTL)."""
        self._is_current(None)  # notices a store attached or detached since
        expired = 0
        for until in self._l3.values():
            if until > now:
                break
            expired += 1
        self._forget_l3(expired)

    def cleared(self) -> None:
        """The tree was reset (flush): consumers drop everything this instance reported;
        what the store still holds is reported again when written, found or read."""
        for held in self._held.values():
            held.clear()
        self._nodes.clear()
        self._cached_pages = 0
        self._l3.clear()


class KvEvents:
    """Mixin of :class:`~hiradix.integration.sglang.cache.HiRadixCache`: KV events."""

    _kv_log: TierEventLog | None = None

    def _init_kv_events(self: Any, params: Any) -> None:
        """SGLang's recorder, on if the scheduler asked for events on this rank."""
        enabled = bool(getattr(params, "enable_kv_cache_events", False)) and not self.disable
        if enabled and self.is_eagle:
            logger.warning(
                "hiradix: KV events are not recorded with EAGLE (bigram keys): a cache-aware "
                "router sees no blocks from this server"
            )
            enabled = False
        self.kv_events = KVCacheEventRecorder(
            enabled=enabled,
            page_size=self.page_size,
            dynamo_format=bool(getattr(params, "dynamo_kv_event_format", False)),
            lora_names=getattr(params, "kv_event_lora_names", None),
        )
        self._kv_log = None
        if enabled:
            self._kv_log = TierEventLog(
                self.kv_events,
                self.tree,
                current_store=lambda: self.storage,
                now=lambda: self.now,
            )
            self.tree.listener = self._kv_log
            logger.info("hiradix: KV events on (every tier: GPU, CPU_PINNED, DISK/EXTERNAL)")

    def _kv_events_cleared(self: Any) -> None:
        if self._kv_log is not None:
            self._kv_log.cleared()
        self.kv_events.record_all_cleared()

    def take_events(self: Any) -> list:
        """The events since the last call (SGLang's publisher drains them every step)."""
        if self._kv_log is not None:
            self._kv_log.expire(self.now)
        return self.kv_events.take()
