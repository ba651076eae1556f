"""Core tree: residency, locks, eviction, TTL and page keys, on plain Python values."""

from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hiradix.tree import RadixTree, Ticket, TierTtl, TtlRules, chain_page_keys


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlotPool:
    """Hands out unique slot ids and remembers which KV content each one holds."""

    def __init__(self) -> None:
        self.next = 0
        self.content: dict[int, tuple] = {}
        self.freed: set[int] = set()

    def alloc(self, ns, tokens) -> list[int]:
        out = []
        for i in range(len(tokens)):
            slot = self.next
            self.next += 1
            self.content[slot] = (ns, tuple(tokens[: i + 1]))
            out.append(slot)
        return out

    def free(self, slots) -> None:
        for slot in slots:
            assert slot not in self.freed, f"slot {slot} freed twice"
            self.freed.add(slot)


def make_tree(page_size=1, **kw):
    pool = SlotPool()
    host = SlotPool()
    tree = RadixTree(page_size, free_l1=pool.free, free_l2=host.free, **kw)
    return tree, pool, host


def seq(*tokens):
    return array("q", tokens)


def test_insert_match_and_split():
    tree, pool, _ = make_tree()
    a = seq(1, 2, 3, 4)
    out = tree.insert("ns", a, pool.alloc("ns", a))
    assert out.prefix_len == 0 and len(out.new_nodes) == 1
    m = tree.match("ns", seq(1, 2, 9))
    assert m.l1_len == 2 and m.host_len == 0 and m.host_node is m.l1_node
    assert [pool.content[s] for s in tree.path_l1(m.l1_node)[0]] == [
        ("ns", (1,)),
        ("ns", (1, 2)),
    ]
    # a second insert of a longer key reuses the first two pages
    b = seq(1, 2, 7, 8)
    out = tree.insert("ns", b, pool.alloc("ns", b))
    assert out.prefix_len == 2
    tree.check_invariants()
    assert tree.evictable_tokens == 6


def test_namespaces_never_share():
    tree, pool, _ = make_tree()
    a = seq(1, 2, 3)
    tree.insert(("lora1", None), a, pool.alloc("x", a))
    assert tree.match(("lora2", None), a).l1_len == 0
    assert tree.match((None, "salt"), a).l1_len == 0
    assert tree.match(("lora1", None), a).l1_len == 3


def test_page_alignment():
    tree, pool, _ = make_tree(page_size=4)
    a = seq(*range(12))
    tree.insert(None, a, pool.alloc(None, a))
    b = seq(0, 1, 2, 3, 4, 5, 99, 7)
    assert tree.match(None, b).l1_len == 4
    tree.check_invariants()


def test_locks_protect_from_eviction():
    tree, pool, _ = make_tree()
    a, b = seq(1, 2, 3), seq(5, 6)
    na = tree.insert(None, a, pool.alloc(None, a)).node
    tree.insert(None, b, pool.alloc(None, b))
    assert tree.lock(na) == -3
    assert (tree.evictable_tokens, tree.protected_tokens) == (2, 3)
    assert tree.evict_l1(10) == 2
    assert tree.match(None, a).l1_len == 3
    assert tree.unlock(na) == 3
    assert tree.evict_l1(10) == 3
    assert tree.l1_total() == 0 and ("ns", None) not in tree.root.children  # pruned when empty
    tree.check_invariants()


def test_lru_order_and_parent_becomes_leaf():
    tree, pool, _ = make_tree()
    for s in (seq(1, 2), seq(1, 3), seq(4)):
        tree.insert(None, s, pool.alloc(None, s))
    tree.match(None, seq(1, 2))  # most recent
    tree.evict_l1(1)
    assert tree.match(None, seq(1, 3)).l1_len == 1  # (1,3) went first
    assert tree.match(None, seq(4)).l1_len == 1


def test_host_copy_survives_device_eviction_and_is_reported():
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4)
    node = tree.insert(None, a, pool.alloc(None, a)).node
    ticket = Ticket()
    tree.lock(node)
    tree.attach_l2(node, host.alloc(None, a), ticket)
    assert tree.match(None, a).l1_len == 4
    tree.finish_ticket(node, ticket, ok=True)
    tree.unlock(node)
    tree.evict_l1(4)
    m = tree.match(None, seq(1, 2, 3, 4, 5))
    assert (m.l1_len, m.host_len) == (0, 4)
    assert m.host_node.l2 is not None and m.l1_node.l1 is None
    # load back
    tree.attach_l1(m.host_node, pool.alloc(None, a))
    assert tree.match(None, a).l1_len == 4
    tree.check_invariants()
    # dropping the host copy keeps the device copy
    tree.evict_l2(100)
    assert tree.match(None, a).l1_len == 4 and tree.l2_tokens == 0
    tree.check_invariants()


def test_insert_adopts_slots_of_host_only_node():
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4)
    node = tree.insert(None, a, pool.alloc(None, a)).node
    tree.attach_l2(node, host.alloc(None, a), None)
    tree.evict_l1(4)
    out = tree.insert(None, a, pool.alloc(None, a))
    assert out.prefix_len == 0 and out.new_nodes == (node,)
    assert tree.match(None, a).l1_len == 4
    tree.check_invariants()


def test_failed_host_write_rolls_back():
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4)
    node = tree.insert(None, a, pool.alloc(None, a)).node
    slots = host.alloc(None, a)
    ticket = Ticket()
    tree.attach_l2(node, slots, ticket)
    tree.finish_ticket(node, ticket, ok=False)
    assert node.l2 is None and tree.l2_tokens == 0 and set(slots) <= host.freed
    tree.check_invariants()


def test_ttl_sliding_and_absolute_on_fake_clock():
    clock = FakeClock()
    tree, pool, _ = make_tree(ttl=TtlRules(device=TierTtl(10.0, sliding=True)), clock=clock)
    a = seq(1, 2, 3)
    tree.insert(None, a, pool.alloc(None, a))
    clock.now += 8
    assert tree.match(None, a).l1_len == 3  # refreshes
    clock.now += 8
    assert tree.match(None, a).l1_len == 3
    clock.now += 10.5
    assert tree.match(None, a).l1_len == 0
    assert tree.expired_tokens["l1"] == 3
    tree.check_invariants()

    clock2 = FakeClock()
    tree2, pool2, _ = make_tree(ttl=TtlRules(device=TierTtl(10.0, sliding=False)), clock=clock2)
    tree2.insert(None, a, pool2.alloc(None, a))
    clock2.now += 8
    assert tree2.match(None, a).l1_len == 3
    clock2.now += 3  # 11 s after the write: absolute TTL ignores the hit
    assert tree2.match(None, a).l1_len == 0


def test_ttl_never_expires_locked_and_max_age_sweep():
    clock = FakeClock()
    tree, pool, _ = make_tree(ttl=TtlRules(max_age=5.0), clock=clock)
    a, b = seq(1, 2), seq(3, 4)
    na = tree.insert(None, a, pool.alloc(None, a)).node
    tree.insert(None, b, pool.alloc(None, b))
    tree.lock(na)
    clock.now += 6
    assert tree.sweep() == 1  # b expired, a is locked
    assert tree.match(None, a).l1_len == 2 and tree.match(None, b).l1_len == 0
    tree.unlock(na)
    assert tree.match(None, a).l1_len == 0
    tree.check_invariants()


def test_page_keys_chain_and_split():
    tree, pool, _ = make_tree(page_size=2)
    a = seq(1, 2, 3, 4, 5, 6)
    node = tree.insert("n", a, pool.alloc("n", a)).node
    keys = tree.page_keys(node)
    assert len(keys) == 3
    assert keys == chain_page_keys(tree.seed_key("n"), a, 2)
    tree.match("n", seq(1, 2, 3, 4, 9, 9))  # splits the node after two pages
    upper = tree.match("n", seq(1, 2, 3, 4)).l1_node
    assert tree.page_keys(upper) == keys[:2]
    assert tree.page_keys(upper.children[(5, 6)]) == keys[2:]
    # other namespace, same tokens: different keys
    other = tree.insert("m", a, pool.alloc("m", a)).node
    assert tree.page_keys(other)[0] != keys[0]


class TreeMachine(RuleBasedStateMachine):
    """Random inserts, lookups, locks and evictions against content-tagged slots: a match
    must only ever return slots holding exactly the KV of the tokens it reports."""

    def __init__(self) -> None:
        super().__init__()
        self.tree, self.pool, self.host = make_tree(page_size=2)
        self.locked: list = []

    tokens = st.lists(st.integers(0, 3), min_size=0, max_size=12)
    namespaces = st.sampled_from([None, "a"])

    @rule(ns=namespaces, toks=tokens)
    def insert(self, ns, toks):
        toks = toks[: len(toks) // 2 * 2]
        a = array("q", toks)
        slots = self.pool.alloc(ns, a)
        out = self.tree.insert(ns, a, slots)
        self.pool.free(slots[: out.prefix_len])  # the caller frees its duplicates

    @rule(ns=namespaces, toks=tokens)
    def match(self, ns, toks):
        toks = toks[: len(toks) // 2 * 2]
        m = self.tree.match(ns, array("q", toks))
        values = [s for v in self.tree.path_l1(m.l1_node) for s in v] if m.l1_len else []
        assert len(values) == m.l1_len
        for i, slot in enumerate(values):
            assert slot not in self.pool.freed
            assert self.pool.content[slot] == (ns, tuple(toks[: i + 1]))

    @rule(ns=namespaces, toks=tokens)
    def lock(self, ns, toks):
        toks = toks[: len(toks) // 2 * 2]
        m = self.tree.match(ns, array("q", toks))
        if m.l1_len:
            self.tree.lock(m.l1_node)
            self.locked.append(m.l1_node)

    @rule()
    def unlock(self):
        if self.locked:
            self.tree.unlock(self.locked.pop(random.randrange(len(self.locked))))

    @rule(n=st.integers(1, 8))
    def evict(self, n):
        self.tree.evict_l1(n)

    @rule()
    def reset(self):
        """Flush: the tree forgets everything; the owner clears its pool."""
        self.tree.reset()
        self.pool = SlotPool()
        self.tree.free_l1 = self.pool.free
        self.locked = []

    @invariant()
    def consistent(self):
        self.tree.check_invariants()


TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_bad_page_size():
    with pytest.raises(ValueError, match="page_size"):
        RadixTree(0)


def test_insert_host_below_cached_path_and_duplicates():
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4)
    tree.insert(None, a, pool.alloc(None, a))
    full = seq(1, 2, 3, 4, 5, 6, 7, 8)
    slots = host.alloc(None, full[2:])  # fetched from tokens[2:]: 2 overlap the device path
    added, unused = tree.insert_host(None, full, 2, slots)
    assert added == 4 and [list(u) for u in unused] == [slots[:2]]
    m = tree.match(None, full)
    assert (m.l1_len, m.host_len) == (4, 4)
    tree.check_invariants()
    # a path that vanished takes nothing
    added, unused = tree.insert_host(None, seq(9, 9, 9, 9), 2, [100, 101])
    assert added == 0 and unused == [[100, 101]]


def test_pinned_host_copy_outlives_removal_of_its_path():
    """An L3 write reading host slots keeps them even if the path is dropped meanwhile."""
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4)
    parent = tree.insert(None, a, pool.alloc(None, a)).node
    child_tokens = seq(1, 2, 3, 4, 5, 6)
    child = tree.insert(None, child_tokens, pool.alloc(None, child_tokens)).node
    slots = host.alloc(None, child_tokens[4:])
    tree.attach_l2(child, slots, None)
    pin = tree.pin_l2(child)
    tree.evict_l1(2)  # the child's device copy goes; its host copy stays
    assert child.l1 is None and child.l2 is not None
    tree.evict_l1(4)  # the parent (device only) goes, taking the child out of the tree
    assert parent.parent is None and child.parent is None
    assert not set(slots) & host.freed  # still being read
    tree.unpin_l2(pin)
    assert set(slots) <= host.freed
    tree.check_invariants()


def test_split_long_pieces():
    tree, pool, _ = make_tree(page_size=2)
    a = seq(*range(10))
    node = tree.insert(None, a, pool.alloc(None, a)).node
    pieces = tree.split_long(node, 4)
    assert [len(p) for p in pieces] == [4, 4, 2] and pieces[-1] is node
    assert tree.match(None, a).l1_len == 10
    tree.check_invariants()
