"""An in-process L3 store: a dict with LRU eviction and per-key expiry.

For tests, the simulator and single-process demos. Blobs live in this process only, so
it is not shared between instances and does not survive restarts.

Expiry is lazy on read plus a bounded sweep of the least recently used entries on every
write; :meth:`MemoryStore.gc` sweeps everything. One small lock guards the dict because
several transfer worker threads call the store at once; no IO happens under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from hiradix.backends.base import PageStore, StoreKey, StoreStats, check_ttl, split_key

logger = logging.getLogger(__name__)

__all__ = ["MemoryStore"]

_NEVER = float("inf")
_SWEEP_PER_WRITE = 8


class MemoryStore(PageStore):
    """``capacity_bytes`` of blobs (sum of blob lengths), least recently used evicted."""

    name = "memory"

    def __init__(self, capacity_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (blob, expiry); order = recency of use, oldest first.
        self._entries: OrderedDict[StoreKey, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self.expirations = 0

    def put_many(self, items: Sequence[tuple[StoreKey, bytes]], ttl: float | None) -> list[bool]:
        check_ttl(ttl)
        results: list[bool] = []
        with self._lock:
            now = self._clock()
            self._sweep_locked(now, _SWEEP_PER_WRITE)
            expiry = _NEVER if ttl is None else now + ttl
            for key, blob in items:
                blob = bytes(blob)
                if len(blob) > self.capacity_bytes:
                    results.append(False)
                    continue
                self._remove_locked(key)
                while self._bytes + len(blob) > self.capacity_bytes:
                    self._remove_locked(next(iter(self._entries)))
                    self.evictions += 1
                self._entries[key] = (blob, expiry)
                self._bytes += len(blob)
                results.append(True)
        return results

    def get_many(
        self, keys: Sequence[StoreKey], refresh_ttl: float | None = None
    ) -> list[bytes | None]:
        check_ttl(refresh_ttl)
        out: list[bytes | None] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                entry = self._live_locked(key, now)
                if entry is None:
                    out.append(None)
                    continue
                self._entries.move_to_end(key)
                if refresh_ttl is not None:
                    self._entries[key] = (entry[0], now + refresh_ttl)
                out.append(entry[0])
        return out

    def exists_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        with self._lock:
            now = self._clock()
            return [self._live_locked(key, now) is not None for key in keys]

    def delete_many(self, keys: Sequence[StoreKey]) -> int:
        with self._lock:
            now = self._clock()
            deleted = 0
            for key in keys:
                if self._live_locked(key, now) is not None:
                    deleted += 1
                self._remove_locked(key)
            return deleted

    def scan(self, namespace: str | None = None) -> Iterator[StoreKey]:
        with self._lock:
            now = self._clock()
            keys = [k for k, (_, exp) in self._entries.items() if exp > now]
        for key in keys:
            if namespace is None or split_key(key)[0] == namespace:
                yield key

    def stats(self) -> StoreStats:
        by_ns: dict[str, tuple[int, int]] = {}
        with self._lock:
            now = self._clock()
            items = [(k, len(b)) for k, (b, exp) in self._entries.items() if exp > now]
        for key, size in items:
            ns = split_key(key)[0]
            pages, nbytes = by_ns.get(ns, (0, 0))
            by_ns[ns] = (pages + 1, nbytes + size)
        return StoreStats(pages=len(items), bytes=sum(s for _, s in items), by_namespace=by_ns)

    def gc(self, max_items: int | None = None) -> int:
        with self._lock:
            return self._sweep_locked(self._clock(), max_items, full=True)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def describe(self) -> str:
        return f"memory store ({self.capacity_bytes} bytes)"

    # -- internals (caller holds the lock) ---------------------------------------------

    def _live_locked(self, key: StoreKey, now: float) -> tuple[bytes, float] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] <= now:
            self._remove_locked(key)
            self.expirations += 1
            return None
        return entry

    def _remove_locked(self, key: StoreKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    def _sweep_locked(self, now: float, max_items: int | None, full: bool = False) -> int:
        """Expire due entries, looking at the least recently used ones first.

        Bounded sweeps look at ``max_items`` entries; a full sweep looks at all of them
        and stops after removing ``max_items``.
        """
        due: list[StoreKey] = []
        for looked, (key, (_, expiry)) in enumerate(self._entries.items()):
            if not full and max_items is not None and looked >= max_items:
                break
            if expiry <= now:
                due.append(key)
                if max_items is not None and len(due) >= max_items:
                    break
        for key in due:
            self._remove_locked(key)
        self.expirations += len(due)
        return len(due)
