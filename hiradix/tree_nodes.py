"""The tree's value types: nodes, their completion tickets and pins, TTL rules, lookup and
insert results, and the eviction leaf queue (``tree.py`` holds the tree that uses them)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedList

from hiradix.policies.eviction import EvictionOrder
from hiradix.types import PageKey

Clock = Callable[[], float]
FreeCallback = Callable[[Any], None]


class LeafQueue:
    """The evictable leaves of one tier, kept sorted by the eviction order (node id breaks
    ties, so every TP rank picks the same victims): O(log n) to add, remove, re-rank and
    take the next victim, and no rebuild per eviction call."""

    __slots__ = ("_keys", "_nodes", "_order", "_sorted")

    def __init__(self, order: EvictionOrder):
        self._order = order
        self._sorted: SortedList = SortedList()
        self._keys: dict[int, tuple] = {}
        self._nodes: dict[int, Node] = {}

    def __contains__(self, node: object) -> bool:
        return isinstance(node, Node) and node.id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __iter__(self) -> Iterator[Node]:
        return (self._nodes[key[-1]] for key in self._sorted)

    def add(self, node: Node) -> None:
        if node.id not in self._keys:
            key = (self._order(node), node.id)
            self._keys[node.id] = key
            self._nodes[node.id] = node
            self._sorted.add(key)

    def discard(self, node: Node) -> None:
        key = self._keys.pop(node.id, None)
        if key is not None:
            del self._nodes[node.id]
            self._sorted.remove(key)

    def refresh(self, node: Node) -> None:
        """Re-rank ``node`` after a field its order reads changed."""
        if node.id in self._keys:
            self.discard(node)
            self.add(node)

    def first(self) -> Node:
        return self._nodes[self._sorted[0][-1]]

    def clear(self) -> None:
        self._sorted.clear()
        self._keys.clear()
        self._nodes.clear()


class Ticket:
    """Completion flag of the host write that fills a node's slots, shared by every piece
    a split makes of that node (``nodes``): until it is done the slots are being written,
    so no piece's slots may be handed back, even if the piece leaves the tree."""

    __slots__ = ("done", "failed", "nodes")

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self.nodes: list[Node] = []


class Pin:
    """A reader's hold on host copies (a load-back, an L3 write, a demotion that adds a
    child), shared by every piece a split makes of a pinned node (``nodes``): releasing
    the pin releases all of them, and slots of a piece that left the tree meanwhile are
    handed back only then."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: list[Node] = []


@dataclass(frozen=True, slots=True)
class TierTtl:
    """Time to live of one tier: ``seconds=None`` keeps pages until evicted."""

    seconds: float | None = None
    sliding: bool = True


@dataclass(frozen=True, slots=True)
class TtlRules:
    device: TierTtl = TierTtl()
    host: TierTtl = TierTtl()
    max_age: float | None = None

    @property
    def enabled(self) -> bool:
        return (
            self.device.seconds is not None
            or self.host.seconds is not None
            or self.max_age is not None
        )


class Node:
    __slots__ = (
        "accessed_at",
        "children",
        "created_at",
        "created_tick",
        "hits",
        "id",
        "keys",
        "l1",
        "l1_at",
        "l2",
        "l2_at",
        "l2_pins",
        "l2_ticket",
        "last_access",
        "lock_ref",
        "namespace",
        "parent",
        "priority",
        "tokens",
    )

    def __init__(self, node_id: int, tokens: array, parent: Node | None, tick: int, now: float):
        self.id = node_id
        self.parent = parent
        self.children: dict[Hashable, Node] = {}
        self.tokens = tokens
        self.l1: Any = None
        self.l2: Any = None
        self.l2_ticket: Ticket | None = None
        self.l2_pins: list[Pin] = []  # readers of the host copy: it must stay
        self.lock_ref = 0
        self.hits = 0
        self.priority = 0
        self.last_access = tick
        self.created_tick = tick
        self.created_at = now
        self.accessed_at = now
        self.l1_at = now
        self.l2_at = now
        self.keys: list[PageKey] | None = None
        self.namespace: Hashable = parent.namespace if parent is not None else None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def l2_ready(self) -> bool:
        return self.l2 is not None and (self.l2_ticket is None or self.l2_ticket.done)

    @property
    def l2_busy(self) -> bool:
        """Whether the host slots are being read or written (they cannot be handed back)."""
        return bool(self.l2_pins) or (self.l2_ticket is not None and not self.l2_ticket.done)

    def __repr__(self) -> str:
        return (
            f"Node(id={self.id}, len={len(self.tokens)}, l1={self.l1 is not None}, "
            f"l2={self.l2 is not None}, lock={self.lock_ref})"
        )


@dataclass(frozen=True, slots=True)
class TreeMatch:
    """Result of a lookup. ``l1_node`` ends the device-resident prefix; ``host_node`` ends
    the run after it that is only on host (equal to ``l1_node`` when there is none);
    ``node`` is the deepest node matched (page keys of what follows chain from it)."""

    l1_len: int
    l1_node: Node
    host_len: int
    host_node: Node

    @property
    def total_len(self) -> int:
        return self.l1_len + self.host_len


@dataclass(frozen=True, slots=True)
class InsertOutcome:
    prefix_len: int  # tokens already on device before this insert (caller frees its copies)
    node: Node  # where the inserted key ends
    new_nodes: tuple[Node, ...]  # nodes that gained device residency (candidates to demote)


def common_prefix_len(a: array, b: array, b_off: int) -> int:
    """Length of the common prefix of ``a`` and ``b[b_off:]``, galloping over C-level slice
    compares so that long shared prefixes cost no per-token Python work."""
    n = min(len(a), len(b) - b_off)
    lo, step = 0, 64
    while lo < n:
        hi = min(lo + step, n)
        if a[lo:hi] != b[b_off + lo : b_off + hi]:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if a[lo:mid] == b[b_off + lo : b_off + mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        lo = hi
        step *= 2
    return n


def chain_page_keys(prev: bytes, tokens: Sequence[int] | array, page_size: int) -> list[PageKey]:
    """SHA-256-strength chain is not needed inside one tree; BLAKE2b-128 is collision-safe
    for content addressing and several times faster than SHA-256 in CPython."""
    raw = tokens.tobytes() if isinstance(tokens, array) else array("q", tokens).tobytes()
    step = page_size * 8
    keys: list[PageKey] = []
    for off in range(0, len(raw), step):
        prev = hashlib.blake2b(prev + raw[off : off + step], digest_size=16).digest()
        keys.append(PageKey(prev))
    return keys
