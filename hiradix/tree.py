"""The tiered radix tree: one tree of token prefixes that knows where each node's KV lives.

Single-threaded and non-blocking: every method runs on the engine's scheduler thread, never
takes a lock and never does IO. Copies between tiers are done elsewhere (the transfer
engine); the tree only records residency and hands slots back through callbacks.

Residency per node (see DESIGN.md):

- ``l1``: device slot indices (an opaque, sliceable sequence owned by the engine's pool);
- ``l2``: host slot indices in hiradix's slab, with ``l2_ticket`` set while the copy that
  fills them is still in flight;
- L3 presence is not a node field: it is asked of the store for the tokens past the local
  match (see ``page_keys``).

Invariants (checked by ``check_invariants`` in tests):

- L1 and L2 residency are prefix-closed: a node is resident in a tier only if its parent is;
- a locked node is never evicted from L1; every L1 token of the tree is counted once in
  either ``evictable_tokens`` (lock count 0) or ``protected_tokens``;
- a node with neither L1 nor L2 residency is not kept in the tree.
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from hiradix import tree_inspect, tree_ttl
from hiradix.policies.eviction import EvictionOrder, get_eviction_order
from hiradix.tier_events import TierListener
from hiradix.tree_nodes import (
    Clock,
    FreeCallback,
    InsertOutcome,
    LeafQueue,
    Node,
    Pin,
    Ticket,
    TierTtl,
    TreeMatch,
    TtlRules,
    chain_page_keys,
    common_prefix_len,
)
from hiradix.types import PageKey, Tier

logger = logging.getLogger(__name__)

NO_TTL = TtlRules()

__all__ = [  # the tree and the value types callers import from here (tree_nodes.py)
    "InsertOutcome",
    "Node",
    "Pin",
    "RadixTree",
    "Ticket",
    "TierTtl",
    "TreeMatch",
    "TtlRules",
    "chain_page_keys",
    "common_prefix_len",
]


class RadixTree:
    """Tiered radix tree over page-aligned token sequences, partitioned by namespace."""

    def __init__(
        self,
        page_size: int = 1,
        *,
        eviction: str | EvictionOrder = "lru",
        ttl: TtlRules = NO_TTL,
        clock: Clock = time.monotonic,
        free_l1: FreeCallback = lambda values: None,
        free_l2: FreeCallback = lambda slots: None,
        key_seed: Callable[[Hashable], bytes] = lambda ns: repr(ns).encode(),
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.order = get_eviction_order(eviction) if isinstance(eviction, str) else eviction
        self.ttl = ttl
        self.clock = clock
        self.free_l1 = free_l1
        self.free_l2 = free_l2
        self.key_seed = key_seed
        self.expired_tokens = {"l1": 0, "l2": 0}
        #: told when pages arrive in or leave a tier (KV events; ``tier_events.py``)
        self.listener: TierListener | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every node without handing any slot back (the owner clears its pools)."""
        self._next_id = 0
        self._tick = 0
        self.root = self._new_node(array("q"), None)
        self.root.lock_ref = 1
        self.ns_roots: dict[Hashable, Node] = {}
        self.evictable_tokens = 0
        self.protected_tokens = 0
        self.l2_tokens = 0
        self.l1_leaves = LeafQueue(self.order)
        self.l2_leaves = LeafQueue(self.order)

    def _new_node(self, tokens: array, parent: Node | None) -> Node:
        node = Node(self._next_id, tokens, parent, self._tick, self.clock())
        self._next_id += 1
        return node

    def _ns_root(self, namespace: Hashable, create: bool) -> Node | None:
        node = self.ns_roots.get(namespace)
        if node is None and create:
            node = self._new_node(array("q"), self.root)
            node.namespace = namespace
            node.lock_ref = 1  # namespace roots are never evicted
            self.root.children[("ns", namespace)] = node
            self.ns_roots[namespace] = node
        return node

    def _child_key(self, tokens: array, pos: int) -> Hashable:
        if self.page_size == 1:
            return tokens[pos]
        return tuple(tokens[pos : pos + self.page_size])

    def is_root(self, node: Node) -> bool:
        return node.parent is None or node.parent is self.root

    # ------------------------------------------------------------------ lookup
    def match(self, namespace: Hashable, tokens: array, *, touch: bool = True) -> TreeMatch:
        """Longest cached prefix of ``tokens`` (page-aligned by the caller): the device run,
        then the host-only run after it. Splits a node where the match ends inside it, and
        expires what is due on the way (lazy TTL)."""
        start = self._ns_root(namespace, create=False)
        if start is None:
            return TreeMatch(0, self.root, 0, self.root)
        if touch:
            self._tick += 1
        tick = self._tick
        now = self.clock() if self.ttl.enabled else 0.0
        node = l1_node = host_node = start
        pos = l1_len = host_len = 0
        n = len(tokens)
        while pos < n:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            if (
                self.ttl.enabled
                and tree_ttl.expire_if_due(self, child, now)
                and child.parent is None
            ):
                break  # expired and removed with its subtree
            matched = common_prefix_len(child.tokens, tokens, pos)
            matched -= matched % self.page_size
            if matched == 0:
                break
            if matched < len(child.tokens):
                child = self._split(child, matched)
            if touch:
                child.last_access = tick
                if self.ttl.enabled:
                    child.accessed_at = now
                self._reranked(child)
            pos += matched
            node = child
            if child.l1 is not None:
                l1_len, l1_node = pos, child
            elif child.l2_ready:
                host_len, host_node = pos - l1_len, child
            else:
                break
            if matched < len(child.tokens):
                break
        if host_len == 0:
            host_node = l1_node
        return TreeMatch(l1_len, l1_node, host_len, host_node)

    def touch(self, namespace: Hashable, tokens: array) -> None:
        """Bump recency along the cached path of ``tokens`` (no TTL work beyond a lookup)."""
        self.match(namespace, tokens)

    # ------------------------------------------------------------------ insert
    def insert(
        self,
        namespace: Hashable,
        tokens: array,
        values: Any,
        *,
        inserted_len: int = 0,
        priority: int = 0,
    ) -> InsertOutcome:
        """Record that ``values[i]`` holds the device KV of ``tokens[i]``. Nodes already on
        device keep their slots (``prefix_len`` tells the caller which of its slots are now
        duplicates); nodes known only on host adopt the caller's slots."""
        node = self._ns_root(namespace, create=True)
        assert node is not None
        self._tick += 1
        tick = self._tick
        now = self.clock()
        n = len(tokens)
        pos = prefix_len = 0
        new_nodes: list[Node] = []
        for child, matched in self._descend(node, tokens):
            child.last_access = tick
            child.accessed_at = now
            child.priority = max(child.priority, priority)
            if child.l1 is None:
                self._attach_l1(child, values[pos : pos + matched], now)
                new_nodes.append(child)
            else:
                prefix_len = pos + matched
            pos += matched
            if pos > inserted_len:
                child.hits += 1
            self._reranked(child)
            node = child
        if pos < n:
            child = self._new_node(tokens[pos:], node)
            child.priority = priority
            child.hits = 1
            node.children[self._child_key(tokens, pos)] = child
            self._attach_l1(child, values[pos:n], now)
            new_nodes.append(child)
            node = child
        return InsertOutcome(prefix_len, node, tuple(new_nodes))

    def _descend(self, node: Node, tokens: array) -> Iterator[tuple[Node, int]]:
        """Walk down from ``node`` along ``tokens``, yielding ``(child, tokens matched in
        it)``; a match that ends inside a node splits it there. The caller advances its own
        position by the matched length after each step."""
        pos, n = 0, len(tokens)
        while pos < n:
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                return
            matched = common_prefix_len(child.tokens, tokens, pos)
            matched -= matched % self.page_size
            if matched == 0:
                return
            if matched < len(child.tokens):
                child = self._split(child, matched)
            yield child, matched
            pos += matched
            node = child

    def _attach_l1(self, node: Node, values: Any, now: float) -> None:
        node.l1 = values
        node.l1_at = now
        if node.lock_ref > 0:
            self.protected_tokens += len(node)
        else:
            self.evictable_tokens += len(node)
        self._update_leaf(node)
        if node.parent is not None:
            self._update_leaf(node.parent)
        if self.listener is not None:
            self.listener.arrived(node, Tier.L1)

    def attach_l1(self, node: Node, values: Any) -> None:
        """Give a host-only node device slots (load-back); its parent must be on device."""
        if node.l1 is not None:
            raise ValueError(f"{node!r} is already on device")
        self._attach_l1(node, values, self.clock())

    # ------------------------------------------------------------------ split
    def _split(self, child: Node, at: int) -> Node:
        """Cut ``child`` after ``at`` tokens; returns the new upper part."""
        parent = child.parent
        assert parent is not None
        upper = self._new_node(child.tokens[:at], parent)
        upper.namespace = child.namespace
        for attr in (
            "lock_ref",
            "hits",
            "priority",
            "last_access",
            "created_tick",
            "created_at",
            "accessed_at",
            "l1_at",
            "l2_at",
            "l2_ticket",
        ):
            setattr(upper, attr, getattr(child, attr))
        upper.l2_pins = list(child.l2_pins)
        for pin in upper.l2_pins:  # the reader holds both pieces now
            pin.nodes.append(upper)
        if upper.l2_ticket is not None:
            upper.l2_ticket.nodes.append(upper)
        if child.l1 is not None:
            upper.l1, child.l1 = child.l1[:at], child.l1[at:]
        if child.l2 is not None:
            upper.l2, child.l2 = child.l2[:at], child.l2[at:]
        if child.keys is not None:
            pages = at // self.page_size
            upper.keys, child.keys = child.keys[:pages], child.keys[pages:]
        child.tokens = child.tokens[at:]
        parent.children[self._child_key(upper.tokens, 0)] = upper
        upper.children[self._child_key(child.tokens, 0)] = child
        child.parent = upper
        # leaf sets: the upper part has a resident child, so it is not a leaf of any tier
        return upper

    # ------------------------------------------------------------------ locks
    def lock(self, node: Node) -> int:
        """Pin ``node`` and its ancestors on device; returns the change in evictable tokens."""
        delta = 0
        while node is not self.root and node is not None:
            if node.lock_ref == 0 and node.l1 is not None:
                self.evictable_tokens -= len(node)
                self.protected_tokens += len(node)
                delta -= len(node)
            node.lock_ref += 1
            self.l1_leaves.discard(node)
            node = node.parent  # type: ignore[assignment]
        return delta

    def unlock(self, node: Node) -> int:
        delta = 0
        while node is not self.root and node is not None:
            if node.lock_ref <= 0:
                raise ValueError(f"unlock of an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.l1 is not None:
                self.evictable_tokens += len(node)
                self.protected_tokens -= len(node)
                delta += len(node)
                self._update_leaf(node)
            node = node.parent  # type: ignore[assignment]
        return delta

    # ------------------------------------------------------------------ leaves
    def _update_leaf(self, node: Node) -> None:
        if node.parent is None or node.parent is self.root:
            return
        if (
            node.l1 is not None
            and node.lock_ref == 0
            and not any(c.l1 is not None for c in node.children.values())
        ):
            self.l1_leaves.add(node)
        else:
            self.l1_leaves.discard(node)
        if (
            node.l2_ready
            and not node.l2_pins
            and not any(c.l2 is not None for c in node.children.values())
        ):
            self.l2_leaves.add(node)
        else:
            self.l2_leaves.discard(node)

    # ------------------------------------------------------------------ eviction
    def evict_l1(self, num_tokens: int, *, demote: Callable[[Node], bool] | None = None) -> int:
        """Drop device copies of unlocked leaves, in the eviction order, until
        ``num_tokens`` are freed; nodes with a host copy stay in the tree as host-only.
        ``demote`` (write-back) may give a victim a host copy just before it goes."""

        def drop(node: Node) -> int:
            if demote is not None and node.l2 is None and self.host_parent_ok(node):
                demote(node)
            return self._drop_l1(node)

        return self._evict(self.l1_leaves, drop, num_tokens)

    def _evict(self, leaves: LeafQueue, drop: Callable[[Node], int], num_tokens: int) -> int:
        """Drop the first leaves in the eviction order until ``num_tokens`` are freed; a
        parent that becomes a leaf takes its place in the queue."""
        freed = 0
        while freed < num_tokens and leaves:
            node = leaves.first()
            freed += drop(node)
            leaves.discard(node)  # a no-op unless the drop kept it (never loop on a victim)
        return freed

    def _reranked(self, node: Node) -> None:
        if node in self.l1_leaves:
            self.l1_leaves.refresh(node)
        if node in self.l2_leaves:
            self.l2_leaves.refresh(node)

    def set_cold(self, node: Node) -> None:
        """Put ``node`` first in line for eviction (a policy's ``Cold`` plan)."""
        node.last_access = -1
        self._reranked(node)

    def host_parent_ok(self, node: Node) -> bool:
        """Whether ``node`` may get a host copy: its parent must be resident somewhere, so
        that a lookup reaching it finds a contiguous device run, then a host run."""
        parent = node.parent
        return parent is not None and (
            parent.parent is None
            or parent.parent is self.root
            or parent.l2 is not None
            or parent.l1 is not None
        )

    def split_long(self, node: Node, max_tokens: int) -> list[Node]:
        """Cut ``node`` into page-aligned pieces of at most ``max_tokens``; returns the
        pieces top-down (the last one is ``node`` itself, now shorter)."""
        max_tokens -= max_tokens % self.page_size
        if max_tokens <= 0 or len(node) <= max_tokens:
            return [node]
        pieces = []
        while len(node) > max_tokens:
            pieces.append(self._split(node, max_tokens))
        pieces.append(node)
        return pieces

    def pin_l2(self, node: Node) -> Pin:
        """Keep ``node``'s host copy while a reader uses it; release with ``unpin_l2``."""
        pin = Pin()
        pin.nodes.append(node)
        node.l2_pins.append(pin)
        self.l2_leaves.discard(node)
        return pin

    def unpin_l2(self, pin: Pin) -> None:
        """Release ``pin`` on every piece it holds (pieces split off since included)."""
        nodes, pin.nodes = pin.nodes, []
        for node in nodes:
            node.l2_pins.remove(pin)
            if node.parent is not None:
                self._update_leaf(node)
            else:
                self._release_detached_l2(node)

    def _release_detached_l2(self, node: Node) -> None:
        """Hand back the host slots of a node that left the tree once nobody uses them."""
        if node.parent is None and node.l2 is not None and not node.l2_busy:
            self.free_l2(node.l2)
            node.l2 = None

    def finish_ticket(self, node: Node, ticket: Ticket, ok: bool) -> None:
        """The host write behind ``ticket`` (covering ``node`` and every piece split off
        it meanwhile) completed; on failure every piece drops its host slots."""
        ticket.done = True
        ticket.failed = not ok
        pieces, ticket.nodes = ticket.nodes, []
        for piece in pieces:
            if piece.l2_ticket is not ticket:
                continue  # the piece lost its host copy meanwhile
            piece.l2_ticket = None
            if piece.parent is None:
                self._release_detached_l2(piece)
            elif ok:
                self._update_leaf(piece)
                self._update_leaf(piece.parent)
                if self.listener is not None:
                    self.listener.arrived(piece, Tier.L2)
        if not ok:
            for piece in pieces:
                if piece.parent is not None and piece.l2 is not None:
                    self._drop_host_subtree(piece)

    def _drop_l1(self, node: Node) -> int:
        size = len(node)
        self.free_l1(node.l1)
        node.l1 = None
        self.evictable_tokens -= size
        self.l1_leaves.discard(node)
        if self.listener is not None:
            self.listener.left(node, Tier.L1)
        self._after_drop(node)
        return size

    def _after_drop(self, node: Node) -> None:
        """A tier let ``node`` go: unlink it if no tier holds it any more."""
        if node.l1 is None and node.l2 is None:
            self._remove(node)
        else:
            self._update_leaf(node)
            if node.parent is not None:
                self._update_leaf(node.parent)

    def evict_l2(self, num_tokens: int) -> int:
        """Drop host copies of leaves that no load is reading, until ``num_tokens`` are
        freed; nodes still on device keep their device copy."""
        return self._evict(self.l2_leaves, self._drop_l2, num_tokens)

    def _drop_l2(self, node: Node) -> int:
        if node.l2_busy:  # read or written now: it goes later (eviction, expiry, release)
            return 0
        size = len(node)
        self.free_l2(node.l2)
        node.l2 = None
        node.l2_ticket = None
        self.l2_tokens -= size
        self.l2_leaves.discard(node)
        if self.listener is not None:  # (a failed copy's drop: never arrived, not counted)
            self.listener.left(node, Tier.L2)
        self._after_drop(node)
        return size

    def insert_host(
        self, namespace: Hashable, tokens: array, start: int, slots: Any
    ) -> tuple[int, list[Any]]:
        """Record host copies fetched from L3 for ``tokens[start:]`` (``slots[i]`` holds
        ``tokens[start + i]``) below the cached path of ``tokens[:start]``. Returns the
        number of tokens newly recorded and the slot pieces the caller must free (already
        cached, or all of them when the path to ``start`` is no longer in the tree)."""
        node = self._ns_root(namespace, create=True)
        assert node is not None
        n = len(tokens)
        pos = 0
        unused: list[Any] = []
        for child, matched in self._descend(node, tokens):
            if pos + matched > start:
                unused.append(slots[max(pos, start) - start : pos + matched - start])
            pos += matched
            node = child
        if pos < start:
            return 0, [slots]
        if pos >= n:
            return 0, unused
        self._tick += 1
        child = self._new_node(tokens[pos:n], node)
        node.children[self._child_key(tokens, pos)] = child
        child.l2 = slots[pos - start :]
        self.l2_tokens += len(child)
        self._update_leaf(child)
        self._update_leaf(node)
        if self.listener is not None:
            self.listener.arrived(child, Tier.L2)
        return n - pos, unused

    def attach_l2(self, node: Node, slots: Any, ticket: Ticket | None) -> None:
        """Record host slots for ``node`` (filled when ``ticket`` completes)."""
        if node.l2 is not None:
            raise ValueError(f"{node!r} already has host slots")
        node.l2 = slots
        node.l2_ticket = ticket
        if ticket is not None:
            ticket.nodes.append(node)
        node.l2_at = self.clock()
        self.l2_tokens += len(node)
        self._update_leaf(node)
        if node.parent is not None:
            self._update_leaf(node.parent)
        if ticket is None and self.listener is not None:  # else when the copy completes
            self.listener.arrived(node, Tier.L2)

    def evict_host_copy(self, node: Node) -> None:
        """Drop the host copies of ``node`` and of its subtree (e.g. a copy that failed
        verification); copies that a reader holds go when it lets them go."""
        self._drop_host_subtree(node)

    def _drop_host_subtree(self, node: Node) -> None:
        for child in list(node.children.values()):
            self._drop_host_subtree(child)
        if node.l2 is not None and node.parent is not None:
            self._drop_l2(node)

    def _remove(self, node: Node) -> None:
        """Unlink a node without residency, with its (non-resident) subtree."""
        parent = node.parent
        if parent is None:
            return
        for child in list(node.children.values()):
            self._release_subtree(child)
        node.children.clear()
        parent.children.pop(self._child_key(node.tokens, 0), None)
        node.parent = None
        self.l1_leaves.discard(node)
        self.l2_leaves.discard(node)
        self._update_leaf(parent)
        if parent.parent is self.root and not parent.children and parent.lock_ref == 1:
            # an emptied namespace root that no request holds: one per cache_salt or LoRA
            # would otherwise be kept forever
            del self.ns_roots[parent.namespace]
            self.root.children.pop(("ns", parent.namespace), None)
            parent.parent = None

    def _release_subtree(self, node: Node) -> None:
        for child in list(node.children.values()):
            self._release_subtree(child)
        if self.listener is not None:  # while the node's path can still be read
            if node.l2 is not None and node.l2_ready:
                self.listener.left(node, Tier.L2)
            if node.l1 is not None:
                self.listener.left(node, Tier.L1)
        if node.l1 is not None:  # cannot happen while L1 is prefix-closed; be safe
            self.free_l1(node.l1)
            self.evictable_tokens -= len(node)
            node.l1 = None
        self.l1_leaves.discard(node)
        self.l2_leaves.discard(node)
        node.parent = None
        if node.l2 is not None:
            self.l2_tokens -= len(node)
            # slots read or written now are handed back by unpin_l2 / finish_ticket
            self._release_detached_l2(node)

    # ------------------------------------------------------------------ TTL (tree_ttl.py)
    def sweep(self, max_nodes: int = 64) -> int:
        """Bounded expiry pass over current leaves; returns how many nodes it changed."""
        return tree_ttl.sweep(self, max_nodes)

    # ------------------------------------------------------------------ paths and keys
    def path(self, node: Node) -> list[Node]:
        """Nodes from the namespace root (exclusive) down to ``node``."""
        out = []
        while node.parent is not None and node.parent is not self.root:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def path_l1(self, node: Node) -> list[Any]:
        values = []
        while node.parent is not None and node.parent is not self.root:
            values.append(node.l1)
            node = node.parent
        values.reverse()
        return values

    def page_keys(self, node: Node) -> list[PageKey]:
        """Content keys of ``node``'s pages, chained from its ancestors' (computed once)."""
        missing = []
        cur = node
        while cur.keys is None and cur.parent is not None and cur.parent is not self.root:
            missing.append(cur)
            cur = cur.parent
        if cur.keys is None:  # a namespace root (or the root): no pages of its own
            cur.keys = []
        for item in reversed(missing):
            parent = item.parent
            assert parent is not None and parent.keys is not None
            prev = parent.keys[-1] if parent.keys else self.seed_key(item.namespace)
            item.keys = chain_page_keys(prev, item.tokens, self.page_size)
        assert node.keys is not None
        return node.keys

    def seed_key(self, namespace: Hashable) -> PageKey:
        return PageKey(hashlib.blake2b(self.key_seed(namespace), digest_size=16).digest())

    # ------------------------------------------------------------------ inspection
    def iter_nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children.values())

    def l1_total(self) -> int:
        return self.evictable_tokens + self.protected_tokens

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the tree's bookkeeping is inconsistent (tests only)."""
        tree_inspect.check_invariants(self)

    def state_digest(self) -> list[tuple[str, int]]:
        """Named integers that equal trees share (see ``tree_inspect.state_digest``)."""
        return tree_inspect.state_digest(self)

    def dump(self, limit: int = 200) -> str:
        return tree_inspect.dump(self, limit)
