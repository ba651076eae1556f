"""The L3 store registry: a small name table from ``StoreConfig.kind`` to a factory.

Built-ins: ``memory``, ``nvme``, ``redis`` (``none`` means "no L3" and creates nothing).
Out-of-tree stores either call :func:`register_store` or are named in the config as
``"package.module:Class"``; such a class is built with ``Class.from_config(store_config,
clock=clock)`` if it has that classmethod, else ``Class(store_config, clock=clock)``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

from hiradix.backends.base import PageStore

logger = logging.getLogger(__name__)

__all__ = ["StoreFactory", "create_store", "register_store", "registered_stores"]

#: ``factory(store_config, clock) -> PageStore``
StoreFactory = Callable[[Any, Callable[[], float]], PageStore]

_FACTORIES: dict[str, StoreFactory] = {}


def register_store(name: str, factory: StoreFactory) -> None:
    """Add a store kind. A duplicate name raises ``ValueError``."""
    if name in _FACTORIES or name == "none":
        raise ValueError(f"store kind {name!r} is already registered")
    _FACTORIES[name] = factory


def registered_stores() -> list[str]:
    return sorted(_FACTORIES)


def _memory(cfg: Any, clock: Callable[[], float]) -> PageStore:
    from hiradix.backends.memory_store import MemoryStore

    return MemoryStore(cfg.memory.size_bytes, clock=clock)


def _nvme(cfg: Any, clock: Callable[[], float]) -> PageStore:
    from hiradix.backends.nvme_store import NvmeStore

    return NvmeStore(
        cfg.nvme.path,
        cfg.nvme.size_bytes,
        fsync=cfg.nvme.fsync,
        clock=clock,
        group_access=cfg.nvme.group_access,
    )


def _redis(cfg: Any, clock: Callable[[], float]) -> PageStore:
    from hiradix.backends.redis_store import RedisStore

    return RedisStore(cfg.redis, clock=clock)


register_store("memory", _memory)
register_store("nvme", _nvme)
register_store("redis", _redis)


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load store class {spec!r}: {exc}") from exc
    return obj


def create_store(store_config: Any, *, clock: Callable[[], float] = time.time) -> PageStore | None:
    """Build the store that ``store_config.kind`` names; ``None`` for kind ``none``.

    Unknown kinds raise ``ValueError`` listing the valid ones. Creating a store does
    not necessarily contact the medium (Redis connects lazily).
    """
    kind = str(getattr(store_config.kind, "value", store_config.kind))
    if kind == "none":
        return None
    if ":" in kind:
        cls = _load_object(kind)
        if hasattr(cls, "from_config"):
            store = cls.from_config(store_config, clock=clock)
        else:
            store = cls(store_config, clock=clock)
        if not isinstance(store, PageStore):
            raise ValueError(f"{kind!r} did not build a PageStore (got {type(store).__name__})")
        return store
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ValueError(
            f"unknown store kind {kind!r}; valid: "
            f"{['none', *registered_stores(), 'package.module:Class']}"
        )
    return factory(store_config, clock)
