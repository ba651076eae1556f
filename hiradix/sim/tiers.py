"""The simulated tier hierarchy: the real ``RadixTree`` plus a virtual transfer engine.

L1 and L2 residency live in the tree exactly as in the SGLang adapter; their "slots" are
``range`` objects (sliceable, sized, free to make), so capacity is counted in tokens by
the tree itself (``l1_total()``, ``l2_tokens``). L3 is a dict of page keys (the tree's
own chained keys) written through from L2, with the config's store TTL. Copies are
completion events at virtual times on FIFO links (:class:`~hiradix.sim.cost.Link`).

Host-only nodes (an L3 read landing in L2) need a tree call the tree does not have yet;
:func:`add_host_child` builds one from the tree's node primitives (see its docstring).
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from hiradix.sim.cost import LinkPool, Profile
from hiradix.tree import Node, RadixTree, Ticket, TreeMatch, common_prefix_len
from hiradix.types import PageKey

logger = logging.getLogger(__name__)

Schedule = Callable[[float, Callable[[], None]], None]


def add_host_child(tree: RadixTree, parent: Node, tokens: array) -> Node:
    """A new node under ``parent`` holding ``tokens`` (no residency yet; the caller attaches
    host slots at once). Stand-in for a ``RadixTree.insert_host`` the L3 read path needs:
    it uses the tree's own node constructor and child keys, and refreshes the parent's
    leaf status, which ``attach_l2`` does not do for a parent."""
    child = tree._new_node(tokens, parent)
    parent.children[tree._child_key(tokens, 0)] = child
    return child


@dataclass(frozen=True, slots=True)
class Located:
    """Where a token path stands: the tree match, the in-flight host nodes after it (with
    their completion times), and how many tokens after those L3 holds."""

    match: TreeMatch
    inflight: tuple[tuple[Node, float], ...]
    inflight_tokens: int
    l3_tokens: int
    end_node: Node  # last node of match + in-flight run

    @property
    def ready_len(self) -> int:
        return self.match.total_len

    @property
    def l3_start(self) -> int:
        return self.match.total_len + self.inflight_tokens


class Tiers:
    """Tree + capacities + L3 + links, for one simulated run (single-threaded)."""

    def __init__(
        self,
        tree: RadixTree,
        profile: Profile,
        *,
        l1_tokens: float,
        l2_tokens: float,
        l3_kind: str | None,
        l3_ttl: float | None,
        l3_sliding: bool,
        write_queue_tokens: float,
        schedule: Schedule,
        clock: Callable[[], float],
        instances: int = 1,
        read_batch_tokens: int = 0,
    ):
        self.tree = tree
        self.profile = profile
        self.l1_capacity = l1_tokens
        self.l2_capacity = l2_tokens if l2_tokens > 0 else 0.0
        self.l3_kind = l3_kind
        self.l3_ttl = l3_ttl
        self.l3_sliding = l3_sliding
        self.write_queue_tokens = write_queue_tokens
        self.schedule = schedule
        self.clock = clock
        kind = l3_kind or "memory"
        self.links = {
            name: LinkPool(name, profile.link_spec(name, kind), instances)
            for name in ("d2h", "h2d", "l3_write", "l3_read")
        }
        # an L3 read lands in batches (the stores read pipelined batches of pages), each
        # usable as soon as it is in host memory; 0: the whole run lands at once
        self.read_batch_tokens = read_batch_tokens
        self.l3: dict[PageKey, float] = {}  # page key -> time it was written / last read
        self.private_l1 = 0  # device tokens held by running requests outside the tree
        self.ticket_done: dict[Ticket, float] = {}
        self.l1_ready: dict[int, float] = {}  # node id -> when its device load completes
        self.counters = {
            "l1_evicted_tokens": 0,
            "l2_evicted_tokens": 0,
            "l2_full_skips": 0,
            "l3_dropped_writes": 0,
            "l1_overflow_tokens": 0,
            "stage_skipped": 0,
            "staged_l2_tokens": 0,
            "staged_l1_tokens": 0,
            "cold_nodes": 0,
        }
        self._l3_queue_tokens = 0

    # ------------------------------------------------------------------ capacity
    @property
    def page(self) -> int:
        return self.tree.page_size

    def free_l1(self) -> float:
        return self.l1_capacity - self.tree.l1_total() - self.private_l1

    def make_room_l1(self, tokens: int, anchor: Node | None) -> bool:
        """Evict unlocked device leaves until ``tokens`` fit (``anchor`` is kept)."""
        short = tokens - self.free_l1()
        if short <= 0:
            return True
        if anchor is not None:
            self.tree.lock(anchor)
        try:
            self.counters["l1_evicted_tokens"] += self.tree.evict_l1(math.ceil(short))
        finally:
            if anchor is not None:
                self.tree.unlock(anchor)
        return self.free_l1() >= tokens

    def make_room_l2(self, tokens: int, keep: Node | None) -> int:
        """Evict unpinned host leaves for ``tokens``; how many tokens fit now."""
        if self.l2_capacity <= 0:
            return 0
        short = tokens - (self.l2_capacity - self.tree.l2_tokens)
        if short > 0:
            pin = self.tree.pin_l2(keep) if keep is not None and keep.parent is not None else None
            try:
                self.counters["l2_evicted_tokens"] += self.tree.evict_l2(int(short))
            finally:
                if pin is not None:
                    self.tree.unpin_l2(pin)
        return int(min(tokens, self.l2_capacity - self.tree.l2_tokens))

    # ------------------------------------------------------------------ L3
    def l3_has(self, key: PageKey, now: float) -> bool:
        stamp = self.l3.get(key)
        if stamp is None:
            return False
        if self.l3_ttl is not None and now - stamp >= self.l3_ttl:
            del self.l3[key]
            return False
        if self.l3_sliding:
            self.l3[key] = now
        return True

    def l3_run(self, keys: list[PageKey], start: int, end: int) -> int:
        """Tokens from ``start`` (page-aligned) L3 holds contiguously, up to ``end``."""
        if self.l3_kind is None:
            return 0
        now = self.clock()
        page = self.page
        count = 0
        for index in range(start // page, end // page):
            if not self.l3_has(keys[index], now):
                break
            count += 1
        return count * page

    # ------------------------------------------------------------------ lookup
    def locate(
        self, namespace: Hashable, tokens: array, keys: list[PageKey], *, touch: bool
    ) -> Located:
        """Match ``tokens``, then walk the in-flight host nodes after the match, then count
        the L3 run after those."""
        tree = self.tree
        found = tree.match(namespace, tokens, touch=touch)
        node = found.host_node
        pos = found.total_len
        inflight: list[tuple[Node, float]] = []
        while pos < len(tokens):
            child = node.children.get(tree._child_key(tokens, pos))
            if child is None or child.l1 is not None or child.l2 is None or child.l2_ready:
                break
            matched = common_prefix_len(child.tokens, tokens, pos)
            matched -= matched % self.page
            if matched == 0:
                break
            if matched < len(child):
                child = tree._split(child, matched)
            ticket = child.l2_ticket
            inflight.append((child, self.ticket_done.get(ticket, self.clock()) if ticket else 0.0))
            pos += matched
            node = child
        l3 = self.l3_run(keys, pos, len(tokens))
        return Located(found, tuple(inflight), pos - found.total_len, l3, node)

    # ------------------------------------------------------------------ L3 -> L2
    def stage_l2(
        self,
        namespace: Hashable,
        tokens: array,
        keys: list[PageKey],
        *,
        max_backlog: float = math.inf,
    ) -> tuple[Located, float | None]:
        """Start reading the L3 run of ``tokens`` into L2; returns the location before the
        read and the read's completion time (None when nothing was started)."""
        where = self.locate(namespace, tokens, keys, touch=False)
        size = where.l3_tokens
        parent = where.end_node
        if size <= 0:
            return where, None
        if not (self.tree.is_root(parent) or parent.l2 is not None or parent.l1 is not None):
            self.counters["stage_skipped"] += 1  # nothing resident to hang the copy under
            return where, None
        now = self.clock()
        link = self.links["l3_read"].pick(now)  # one instance's path reads the whole run
        if link.backlog(now) > max_backlog:
            self.counters["stage_skipped"] += 1
            return where, None
        fits = self.make_room_l2(size, parent)
        size = min(size, fits - fits % self.page)
        if size <= 0:
            self.counters["l2_full_skips"] += 1
            return where, None
        start = where.l3_start
        batch = self.read_batch_tokens if self.read_batch_tokens > 0 else size
        batch = max(self.page, batch - batch % self.page)
        done = now
        for offset in range(start, start + size, batch):
            piece = tokens[offset : min(offset + batch, start + size)]
            node = add_host_child(self.tree, parent, piece)
            ticket = Ticket()
            self.tree.attach_l2(node, range(len(piece)), ticket)
            self.tree._update_leaf(parent)  # attach_l2 leaves the parent's leaf status stale
            done = link.submit(now, self.profile.bytes_for(len(piece)))
            self.ticket_done[ticket] = done
            self.schedule(done, self._landed(node, ticket))
            parent = node
        self.counters["staged_l2_tokens"] += size
        return where, done

    def _landed(self, node: Node, ticket: Ticket) -> Callable[[], None]:
        def landed() -> None:
            self.ticket_done.pop(ticket, None)
            self.tree.finish_ticket(node, ticket, True)

        return landed

    # ------------------------------------------------------------------ L2 -> L1
    def load_l1(self, nodes: list[tuple[Node, float]], anchor: Node, *, strict: bool) -> float:
        """Give the host run ``nodes`` (node, host-ready time) device slots and queue the
        copy; returns when the last byte lands (now when nothing moves). ``strict``: a
        request needs them (overflow allowed and counted); else a prefetch (all or none)."""
        now = self.clock()
        total = sum(len(node) for node, _ in nodes)
        if total == 0:
            return now
        if not self.make_room_l1(total, anchor):
            if not strict:
                self.counters["stage_skipped"] += 1
                return now
            self.counters["l1_overflow_tokens"] += int(total - max(0.0, self.free_l1()))
        ready = max(t for _, t in nodes)
        done = self.links["h2d"].submit(now, self.profile.bytes_for(total), not_before=ready)
        for node, _ in nodes:
            self.tree.attach_l1(node, range(len(node)))
            self.l1_ready[node.id] = done
        if not strict:
            self.counters["staged_l1_tokens"] += total
        return done

    def host_run(self, where: Located) -> list[tuple[Node, float]]:
        """The ready host-only nodes of a location (after its device prefix)."""
        found = where.match
        if found.host_len == 0:
            return []
        out = []
        for node in self.tree.path(found.host_node):
            if node.l1 is None:
                out.append((node, 0.0))
        return out

    def landed_len(self, found: Any) -> int:
        """Tokens of a match whose KV has landed in L1 or L2 by now: a node given device
        slots ahead of its copy counts only once the copy is done, or if its host copy is
        ready (a node still on its way from L3 does not count)."""
        now = self.clock()
        landed = 0
        for node in self.tree.path(found.host_node):
            on_device = node.l1 is not None and self.l1_ready.get(node.id, 0.0) <= now
            in_host = node.l2 is not None and node.l2_ready
            if not (on_device or in_host):
                break
            landed += len(node)
        return min(landed, found.total_len)

    def l1_wait(self, node: Node) -> float:
        """Latest completion of device loads still landing on the path to ``node``."""
        latest = 0.0
        if not self.l1_ready:
            return latest
        for item in self.tree.path(node):
            latest = max(latest, self.l1_ready.get(item.id, 0.0))
        return latest

    # ------------------------------------------------------------------ write-through
    def write_through(self, last: Node) -> None:
        """Copy the path to ``last`` down to L2 (then L3), top-down, as the adapter does."""
        if self.l2_capacity <= 0:
            return
        for node in self.tree.path(last):
            if node.l2 is not None:
                continue
            if node.l1 is None or not self.tree.host_parent_ok(node):
                return
            size = len(node)
            if self.make_room_l2(size, node.parent) < size:
                self.counters["l2_full_skips"] += 1
                return
            ticket = Ticket()
            self.tree.attach_l2(node, range(size), ticket)
            self.tree.lock(node)  # device slots stay while the copy reads them
            done = self.links["d2h"].submit(self.clock(), self.profile.bytes_for(size))
            self.ticket_done[ticket] = done
            keys = list(self.tree.page_keys(node)) if self.l3_kind is not None else []
            self.schedule(done, self._demoted(node, ticket, keys))

    def _demoted(self, node: Node, ticket: Ticket, keys: list[PageKey]) -> Callable[[], None]:
        def done() -> None:
            self.ticket_done.pop(ticket, None)
            self.tree.unlock(node)
            self.tree.finish_ticket(node, ticket, True)
            if keys:
                self._write_l3(keys)

        return done

    def _write_l3(self, keys: list[PageKey]) -> None:
        tokens = len(keys) * self.page
        if self._l3_queue_tokens + tokens > self.write_queue_tokens:
            self.counters["l3_dropped_writes"] += len(keys)
            return
        self._l3_queue_tokens += tokens
        done = self.links["l3_write"].submit(self.clock(), self.profile.bytes_for(tokens))

        def written() -> None:
            self._l3_queue_tokens -= tokens
            now = self.clock()
            for key in keys:
                self.l3[key] = now

        self.schedule(done, written)

    # ------------------------------------------------------------------ cold
    def cold(self, namespace: Hashable, tokens: array) -> None:
        """Make the private tail of a path (below its last branching node) evict first."""
        found = self.tree.match(namespace, tokens, touch=False)
        node: Any = found.host_node
        first = True
        while node is not None and not self.tree.is_root(node):
            if node.hits > 1 and not first:
                break  # used by other requests: not this path's own
            first = False
            parent = node.parent
            self.tree.set_cold(node)  # before every logical tick: first in LRU/LFU order
            self.counters["cold_nodes"] += 1
            if parent is None or len(parent.children) > 1:
                break
            node = parent
