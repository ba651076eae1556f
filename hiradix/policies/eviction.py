"""Eviction orders: pure functions from a node to a sort key; the smallest key goes first.

Every order ends with the node id so that ties break the same way on every TP rank
(the tree's recency is a logical tick, never a wall clock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class EvictableView(Protocol):
    """What an eviction order may read of a node."""

    id: int
    last_access: int
    created_tick: int
    hits: int
    priority: int


EvictionOrder = Callable[[EvictableView], tuple]


def lru(node: EvictableView) -> tuple:
    return (node.last_access, node.id)


def lfu(node: EvictableView) -> tuple:
    return (node.hits, node.last_access, node.id)


def fifo(node: EvictableView) -> tuple:
    return (node.created_tick, node.id)


def priority(node: EvictableView) -> tuple:
    return (node.priority, node.last_access, node.id)


_ORDERS: dict[str, EvictionOrder] = {}


def register_eviction_order(name: str, order: EvictionOrder) -> None:
    """Add an order under ``name``; a duplicate name raises ``ValueError``."""
    if name in _ORDERS:
        raise ValueError(f"eviction order {name!r} is already registered")
    _ORDERS[name] = order


def get_eviction_order(name: str) -> EvictionOrder:
    """The order registered as ``name``; an unknown name raises, listing the valid ones."""
    try:
        return _ORDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; allowed: {', '.join(sorted(_ORDERS))}"
        ) from None


for _name, _order in (("lru", lru), ("lfu", lfu), ("fifo", fifo), ("priority", priority)):
    register_eviction_order(_name, _order)
