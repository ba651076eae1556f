"""Host-slot lifecycle (issue 12's three defects): a slot is handed back only when nothing
reads or writes it any more, pins survive splits, and the tree never changes inside a
lookup or an eviction. Each test failed on the code before the fix."""

from __future__ import annotations

import time
from array import array

import pytest
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang_sim import Scheduler, SimReq, make_pools
from test_tree import FakeClock, make_tree, seq

from hiradix.config import parse_config
from hiradix.kv_copy import LayerEvents
from hiradix.policies.base import FinishEvent, PathView
from hiradix.tree import Ticket, TierTtl, TtlRules

pytestmark = pytest.mark.usefixtures("sglang_context")


def make_cache(store: dict, size: int = 256):
    pools = make_pools(size=size)
    config = parse_config({"host": {"size": "1MiB"}, "store": store})
    cache = HiRadixCache(pools.params(1), config, model_id="test-model")
    return cache, pools, Scheduler(cache, pools)


def test_expiry_keeps_host_slots_a_device_to_host_copy_still_writes():
    """Defect 1: a node's host copy expires while its child's copy is still in flight:
    the child's slots must not go back to the slab (a later demotion or L3 fetch would be
    given them while the copy writes into them)."""
    clock = FakeClock()
    tree, pool, host = make_tree(ttl=TtlRules(host=TierTtl(1.0, sliding=False)), clock=clock)
    a = seq(1, 2, 3, 4)
    parent = tree.insert(None, a, pool.alloc(None, a)).node
    tree.attach_l2(parent, host.alloc(None, a), None)
    b = seq(1, 2, 3, 4, 5, 6)
    child = tree.insert(None, b, pool.alloc(None, b)).node
    ticket = Ticket()
    child_slots = host.alloc(None, b[4:])
    tree.attach_l2(child, child_slots, ticket)  # the copy into these slots is in flight
    tree.evict_l1(6)  # device copies go; the host copies stay
    clock.now += 2.0
    tree.match(None, b)  # lazy expiry on lookup: the parent's host copy is due
    assert parent.l2 is None
    assert not set(child_slots) & host.freed, "slots handed back while a copy writes them"
    tree.finish_ticket(child, ticket, True)
    assert set(child_slots) <= host.freed or child.l2 is not None
    tree.check_invariants()


def test_pin_of_a_split_node_releases_both_pieces():
    """Defect 2: a node pinned by a reader (an L3 write, a load) is split by a lookup
    meanwhile; releasing the pin must release both pieces, or the upper one is never
    evicted again (and its slots leak)."""
    tree, pool, host = make_tree()
    a = seq(1, 2, 3, 4, 5, 6, 7, 8)
    node = tree.insert(None, a, pool.alloc(None, a)).node
    tree.attach_l2(node, host.alloc(None, a), None)
    pin = tree.pin_l2(node)
    tree.match(None, seq(1, 2, 3, 4, 99))  # splits the pinned node after 4 tokens
    upper = node.parent
    assert upper is not None and len(upper) == 4 and len(node) == 4
    tree.unpin_l2(pin)
    assert not upper.l2_pins and not node.l2_pins
    tree.evict_l1(8)
    assert tree.evict_l2(8) == 8, "a piece of the split node stayed pinned"
    assert tree.l2_tokens == 0
    tree.check_invariants()


class _Event:
    """A CUDA event of a copy still reading its source."""

    def __init__(self) -> None:
        self.finished = False

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True


class _Stream:
    def wait_event(self, event: _Event) -> None:
        """The forward stream would wait on the device; the host does not."""


def test_load_keeps_its_host_copy_until_the_copy_has_read_it():
    """Defect 1: a load-back unpinned its host slots as soon as the copy was submitted; on
    CUDA the copy reads them later, and host eviction could hand them to an L3 fetch."""
    cache, _, sched = make_cache({"kind": "none"})
    prompt = list(range(100, 164))
    sched.run(SimReq("a", prompt))
    for _ in range(3):
        cache.step()
    cache.evict(EvictParams(num_tokens=256))
    found = cache.tree.match((None, None), array("q", prompt), touch=False)
    run = []
    cur = found.host_node
    while cur is not found.l1_node:
        run.append(cur)
        cur = cur.parent
    run.reverse()
    assert run, "nothing on host to load"
    event = _Event()
    copy = cache.engine.load

    def load(host_idx, device_idx):  # the data moves, but the event says "still reading"
        copy(host_idx, device_idx).wait()
        return LayerEvents([event])

    cache.engine.load = load
    cache.forward_stream = _Stream()  # as on CUDA: the forward waits, the host goes on
    cache.verifier = None  # verify mode waits for the copy itself
    assert cache._load_run(run, found.l1_node)
    assert all(x.l2_pins for x in run), "host copy unpinned while the copy still reads it"
    event.finished = True
    cache.step()
    assert not any(x.l2_pins for x in run)


def test_nothing_changes_the_tree_inside_evict_or_match():
    """Defect 3: completions ran inside ``evict`` and ``match_prefix``; a callback there
    could stage a path to the device (allocating the slots SGLang had just asked ``evict``
    to free) or split the nodes a caller was walking. Now they wait for the step."""
    cache, _, _ = make_cache({"kind": "memory"})
    ran = []
    cache.engine.submit_io(lambda: 1, lambda result, error: ran.append(result))
    deadline = time.monotonic() + 5
    while not cache.engine.in_flight or cache.engine.ready()[1] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    cache.evict(EvictParams(num_tokens=1))
    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3]))))
    assert ran == [], "a completion ran inside evict or match_prefix"
    cache.step()
    assert ran == [1]


def test_policy_hears_an_arrival_that_misses_l3():
    """Issue 16 item 5: with a store configured the policy heard an arrival only when the
    store held some of the prompt."""
    cache, _, _ = make_cache({"kind": "memory"})
    heard = []
    cache._on_arrival = lambda rid, ns, tokens, l3: heard.append((rid, l3)) or 0  # type: ignore[method-assign]
    from types import SimpleNamespace

    prompt = list(range(500, 564))
    handle = SimpleNamespace(rid="miss", attempt_id=0)
    assert cache.prefetch_from_storage(handle, None, prompt, matched_prefix_tokens=[])
    deadline = time.monotonic() + 5
    while not heard:
        assert time.monotonic() < deadline, "the policy never heard the arrival"
        cache.step()
        time.sleep(0.001)
    assert heard == [("miss", 0)]


def test_namespace_roots_of_gone_tenants_are_pruned():
    """Issue 16 item 4: one namespace root per ``cache_salt`` was kept forever."""
    tree, pool, _ = make_tree()
    for salt in range(50):
        tokens = seq(1, 2, 3)
        tree.insert(("lora", salt), tokens, pool.alloc(salt, tokens))
    assert len(tree.ns_roots) == 50
    tree.evict_l1(1_000)
    assert tree.ns_roots == {} and not tree.root.children
    held = tree.insert(("lora", 99), seq(4, 5), pool.alloc(99, seq(4, 5))).node
    tree.lock(held)
    tree.check_invariants()


def test_policy_forgets_requests_aborted_before_they_finish():
    """Issue 16 item 4: per-request maps of the session and pattern policies leaked for
    requests aborted while queued (``release_aborted_request`` never told the policy)."""
    from types import SimpleNamespace

    for policy in ("session", "pattern"):
        pools = make_pools(size=256)
        config = parse_config({"host": {"size": "1MiB"}, "prefetch": {"policy": policy}})
        cache = HiRadixCache(pools.params(1), config, model_id="m")
        inner = cache.policy.policy
        kept = inner._by_request if policy == "session" else inner._requests
        ns = (None, None)
        for i in range(20):  # earlier turns: the session policy knows these conversations
            path = PathView(array("q", range(10_000 * i, 10_000 * i + 600)), ns)
            inner.on_finish(FinishEvent(cache.now, f"seed{i}", ns, path))
        for i in range(20):
            handle = SimpleNamespace(rid=f"r{i}", attempt_id=0)
            prompt = list(range(10_000 * i, 10_000 * i + 650))
            cache.prefetch_from_storage(handle, None, prompt, matched_prefix_tokens=[])
        assert kept, f"{policy}: nothing kept per request (the test would prove nothing)"
        for i in range(20):
            cache.release_aborted_request(SimpleNamespace(rid=f"r{i}", attempt_id=0))
        assert not kept, f"{policy} kept {len(kept)} aborted requests"


def test_refused_l3_writes_are_counted_and_written_again():
    """Issue 16 item 13: pages the store refused (``put_many`` -> False, e.g. a full disk)
    were marked written and counted in ``l2_to_l3_tokens``; they were never retried."""
    cache, _, sched = make_cache({"kind": "memory", "block_tokens": 16})
    storage = cache.storage
    real_put = storage.store.put_many
    refuse = [True]

    def put_many(items, ttl):
        if refuse[0]:
            return [False] * len(items)
        return real_put(items, ttl)

    storage.store.put_many = put_many

    def settle() -> None:
        for _ in range(10):
            cache.flush_pending_backups()
            cache.engine.drain()
            cache.step()

    sched.run(SimReq("a", list(range(7000, 7064))))
    settle()
    counters = cache.stats.counters
    assert counters["l2_to_l3_tokens"] == 0
    assert counters["l3_dropped_writes"] == 4
    assert not storage._written
    refuse[0] = False
    leaf = cache.tree.match((None, None), array("q", range(7000, 7064)), touch=False).host_node
    storage.save_path(leaf)  # the next write-through of the path tries again
    settle()
    assert counters["l2_to_l3_tokens"] == 64 and len(storage._written) == 4


def test_pages_the_store_lost_are_written_again():
    """Issue 16 item 4: ``_written`` was never invalidated, so pages that Redis or the NVMe
    store evicted or expired were never written again by a long-running server."""
    from types import SimpleNamespace

    cache, _, sched = make_cache({"kind": "memory", "block_tokens": 16})
    storage = cache.storage
    prompt = list(range(8000, 8064))

    def settle() -> None:
        for _ in range(10):
            cache.flush_pending_backups()
            cache.engine.drain()
            cache.step()

    sched.run(SimReq("a", prompt))
    settle()
    assert len(storage._written) == 4
    keys = storage.block_keys((None, None), array("q", prompt), 4)
    store_keys = [storage._store_key((None, None), k) for k in keys]
    storage.store.delete_many(store_keys[1:])  # the store evicted three of them
    handle = SimpleNamespace(rid="lookup", attempt_id=0)
    assert cache.prefetch_from_storage(handle, None, prompt, matched_prefix_tokens=[])
    settle()
    assert keys[1] not in storage._written  # learned from the lookup: not there any more
    leaf = cache.tree.match((None, None), array("q", prompt), touch=False).host_node
    storage.save_path(leaf)
    settle()
    assert storage.store.exists_many(store_keys[1:2]) == [True]
