"""A store that is built on first use, so that a store that is down at start-up (a Redis
Cluster that cannot be reached) degrades to misses and is picked up once it returns."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from hiradix.errors import StoreUnavailable


class LazyStore:
    """Forwards every call to the store ``factory`` builds; a failed build raises
    ``StoreUnavailable`` and is retried on the next call (the caller's circuit breaker
    spaces the retries)."""

    def __init__(self, factory: Callable[[], Any], describe: str):
        self._factory = factory
        self._store: Any = None
        self._lock = threading.Lock()  # one-time construction only
        self.description = describe

    def _get(self) -> Any:
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    try:
                        self._store = self._factory()
                    except StoreUnavailable:
                        raise
                    except OSError as exc:
                        raise StoreUnavailable(f"{self.description}: {exc}") from exc
                store = self._store
        return store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
