"""A fault-injecting wrapper around any :class:`PageStore`.

Used by the tests, the simulator, demos and stress runs to check that the rest of
hiradix degrades to misses instead of failing requests: it adds latency, raises
``StoreUnavailable`` at a given rate (or always while ``down`` is set), silently drops
writes (reporting success, like a store that lost the page later) and flips bytes in
returned payloads (which the page codec must catch). Decisions come from a seeded
``random.Random``, so a run is reproducible for a given sequence of calls.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from hiradix.backends.base import PageStore, StoreKey, StoreStats

from hiradix.errors import StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = ["FaultyStore"]


class FaultyStore(PageStore):
    """Wraps ``inner``; every rate is a probability in [0, 1] per call (errors) or per
    item (dropped writes, corrupted reads). ``down`` can be flipped at any time.

    Counters: ``injected_errors``, ``dropped_writes``, ``corrupted_reads``.
    """

    name = "faulty"

    def __init__(
        self,
        inner: PageStore,
        *,
        latency_s: float = 0.0,
        error_rate: float = 0.0,
        drop_write_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        seed: int = 0,
        down: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for label, rate in (
            ("error_rate", error_rate),
            ("drop_write_rate", drop_write_rate),
            ("corrupt_rate", corrupt_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {rate}")
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.inner = inner
        self.latency_s = latency_s
        self.error_rate = error_rate
        self.drop_write_rate = drop_write_rate
        self.corrupt_rate = corrupt_rate
        self.down = down
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()  # Random is not safe to share across threads
        self.injected_errors = 0
        self.dropped_writes = 0
        self.corrupted_reads = 0

    def _random(self) -> float:
        with self._rng_lock:
            return self._rng.random()

    def _enter(self) -> None:
        if self.latency_s:
            self._sleep(self.latency_s)
        if self.down or (self.error_rate and self._random() < self.error_rate):
            self.injected_errors += 1
            raise StoreUnavailable(f"injected fault ({'down' if self.down else 'error'})")

    def _corrupt(self, blob: bytes) -> bytes:
        if not blob:
            return blob
        with self._rng_lock:
            pos = self._rng.randrange(len(blob))
            bit = 1 << self._rng.randrange(8)
        data = bytearray(blob)
        data[pos] ^= bit
        self.corrupted_reads += 1
        return bytes(data)

    def put_many(self, items: Sequence[tuple[StoreKey, bytes]], ttl: float | None) -> list[bool]:
        self._enter()
        keep = [not (self.drop_write_rate and self._random() < self.drop_write_rate) for _ in items]
        self.dropped_writes += keep.count(False)
        stored = iter(self.inner.put_many([it for it, k in zip(items, keep) if k], ttl))
        # A dropped write reports success: the caller must cope with the page vanishing.
        return [next(stored) if k else True for k in keep]

    def get_many(
        self, keys: Sequence[StoreKey], refresh_ttl: float | None = None
    ) -> list[bytes | None]:
        self._enter()
        blobs = self.inner.get_many(keys, refresh_ttl)
        if not self.corrupt_rate:
            return blobs
        return [
            self._corrupt(b) if b is not None and self._random() < self.corrupt_rate else b
            for b in blobs
        ]

    def exists_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        self._enter()
        return self.inner.exists_many(keys)

    def delete_many(self, keys: Sequence[StoreKey]) -> int:
        self._enter()
        return self.inner.delete_many(keys)

    def scan(self, namespace: str | None = None) -> Iterator[StoreKey]:
        self._enter()
        return self.inner.scan(namespace)

    def stats(self) -> StoreStats:
        self._enter()
        return self.inner.stats()

    def gc(self, max_items: int | None = None) -> int:
        self._enter()
        return self.inner.gc(max_items)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return f"faulty({self.inner.describe()})"
