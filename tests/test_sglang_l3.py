"""L3 tiering in-process: SGLang's real pools, hiradix's cache, and real stores (NVMe files
in a temp dir, a real redis-server). Two caches over one store stand for two servers."""

from __future__ import annotations

import random
import time

import pytest
from hiradix.backends.faults import FaultyStore
from hiradix.integration.sglang.cache import HiRadixCache
from sglang_sim import Scheduler, SimReq, idle_total, make_pools, settle

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")


def server(store, *, size=512, host="4MiB", block=16, wait="wait_complete", **extra):
    pools = make_pools(size=size)
    config = parse_config(
        {
            "host": {"size": host},
            "store": {**store, "block_tokens": block},
            "prefetch": {"wait": wait},
            **extra,
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id="test-model")
    return cache, pools, Scheduler(cache, pools)


def test_second_server_reuses_first_servers_pages(store_cfg):
    cache_a, _, sched_a = server(store_cfg)
    prompt = [random.Random(1).randrange(1000) for _ in range(100)]
    sched_a.run(SimReq("a", prompt))
    settle(cache_a)
    assert cache_a.stats.counters["l2_to_l3_tokens"] >= 96

    cache_b, pools_b, sched_b = server(store_cfg)
    req = SimReq("b", prompt)
    hit = sched_b.run(req)  # verify_prefix checks every loaded KV value
    assert hit == 96 and req.storage_hit == 96
    settle(cache_b)
    snap = cache_b.stats_snapshot().counters
    assert snap["l3_hit_tokens"] == 96 and snap["l3_to_l2_tokens"] == 96
    assert idle_total(cache_b, pools_b) == pools_b.size
    cache_b.tree.check_invariants()
    # another namespace (LoRA) never sees those pages
    other = SimReq("c", prompt, extra_key="lora-x")
    assert server(store_cfg)[2].run(other) == 0


def test_tiny_l1_and_l2_large_l3_serves_from_l3(store_cfg):
    cache, pools, sched = server(
        store_cfg, size=192, host=16 * 1024
    )  # host: 1 KiB/token -> 16 tokens... small
    rng = random.Random(2)
    prompts = [[rng.randrange(1000) for _ in range(80)] for _ in range(8)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"w{i}", p))
        settle(cache)
    hits = [sched.run(SimReq(f"r{i}", p)) for i, p in enumerate(prompts)]
    assert sum(hits) > 0
    assert cache.stats.counters["l3_hit_tokens"] > 0
    assert idle_total(cache, pools) == pools.size
    assert cache.slab.used_slots == cache.tree.l2_tokens


def test_store_outage_degrades_to_misses_and_recovers(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p")}}
    cache_a, _, sched_a = server(store)
    prompt = list(range(500, 580))
    sched_a.run(SimReq("a", prompt))
    settle(cache_a)

    cache, pools, sched = server(store)
    faulty = FaultyStore(cache.storage.store, down=True)
    cache.storage.store = faulty
    cache.storage.breaker.base_backoff = 0.05
    for i in range(4):  # every request completes, with no L3 hit
        assert sched.run(SimReq(f"down{i}", prompt[:40] + [i] * 10)) in (0, 32, 40)
    assert cache.stats.counters["l3_errors"] > 0
    assert idle_total(cache, pools) == pools.size
    faulty.down = False
    breaker = cache.storage.breaker
    assert breaker.opens >= 1
    time.sleep(max(0.0, breaker.retry_at - time.monotonic()) + 0.01)  # past the backoff
    # The writes queued during the outage compete with the next lookup for the breaker's
    # single half-open probe; let them run first, so the lookup meets a closed breaker.
    settle(cache)
    req = SimReq("up", prompt)
    assert sched.run(req) == 80 and req.storage_hit == 40  # the 40 tokens past the local match


def test_corrupt_pages_are_misses_deleted_and_counted(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p")}}
    cache_a, _, sched_a = server(store)
    prompt = list(range(700, 764))
    sched_a.run(SimReq("a", prompt))
    settle(cache_a)

    cache, _, sched = server(store)
    inner = cache.storage.store
    cache.storage.store = FaultyStore(inner, corrupt_rate=1.0)
    req = SimReq("b", prompt)
    cache.storage.insert_late = False
    sched.arrive(req)
    assert req.storage_hit == 0  # never served
    assert cache.stats.counters["l3_corrupt_pages"] == 1
    # the bad page was deleted from the store
    from array import array

    first = cache.storage.block_keys((None, None), array("q", prompt), 1)[0]
    assert inner.exists_many([cache.storage._store_key((None, None), first)]) == [False]
    sched.admit(req)  # recomputed; its write-through heals the store
    sched.release(req)
    settle(cache)
    assert inner.exists_many([cache.storage._store_key((None, None), first)]) == [True]


def test_slow_store_is_skipped_for_recompute(tmp_path):
    """Cost awareness: once the store is measured slower than recomputing, requests stop
    waiting for it and recompute (counted), instead of getting slower."""
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p")}}
    cache_a, _, sched_a = server(store)
    prompts = [[1000 + 97 * i + j for j in range(64)] for i in range(6)]
    for i, p in enumerate(prompts):
        sched_a.run(SimReq(f"a{i}", p))
    settle(cache_a)

    cache, pools, sched = server(store)
    cache.storage.store = FaultyStore(cache.storage.store, latency_s=0.25)
    cost = cache.storage.cost
    cost.observe_prefill(50_000, 1.0)  # what the flushes measure on a real server
    sched.run(SimReq("learn", prompts[0]))  # the first fetch measures the slow store
    sched.run(SimReq("decide", prompts[1]))  # its lookup finds loading slower: recompute
    assert not cost.fetching
    assert cache.stats.counters["recompute_instead_of_load"] == 1
    started = time.monotonic()
    for i, p in enumerate(prompts[2:5]):
        req = SimReq(f"b{i}", p)
        sched.run(req)
        assert req.prefix_len == 0  # recomputed
    assert time.monotonic() - started < 0.5  # none of them waited for the 250 ms store
    assert idle_total(cache, pools) == pools.size


def test_host_slots_reserved_for_fetches_never_leak(store_cfg):
    """Fetched pages go straight into host slots reserved when the fetch starts; every
    way a fetch can end gives back what it does not hand to the tree."""
    from array import array

    cache_a, _, sched_a = server(store_cfg)
    prompts = [[2000 + 131 * i + j for j in range(64)] for i in range(4)]
    for i, p in enumerate(prompts):
        sched_a.run(SimReq(f"a{i}", p))
    settle(cache_a)

    cache, pools, sched = server(store_cfg)
    storage = cache.storage
    ns = (None, None)

    def balanced() -> bool:
        return cache.slab.used_slots == cache.tree.l2_tokens

    assert storage.prefetch("done-then-forgotten", ns, array("q", prompts[0]), 0)
    cache.engine.drain()
    assert storage.prefetches["done-then-forgotten"].ready == 4
    assert cache.slab.used_slots == 64  # reserved, not yet in the tree
    storage.forget("done-then-forgotten")
    assert balanced() and cache.slab.used_slots == 0

    assert storage.prefetch("forgotten-in-flight", ns, array("q", prompts[1]), 0)
    storage.forget("forgotten-in-flight")
    cache.engine.drain()  # finished after its request left: the pages land in the tree
    assert balanced() and cache.slab.used_slots == cache.tree.l2_tokens == 64
    cache.tree.evict_l2(64)
    assert balanced() and cache.slab.used_slots == 0

    storage.store = FaultyStore(storage.store, corrupt_rate=1.0)  # no page verifies
    assert storage.prefetch("corrupt", ns, array("q", prompts[2]), 0)
    cache.engine.drain()
    assert storage.prefetches["corrupt"].ready == 0
    storage.forget("corrupt")
    assert balanced() and cache.slab.used_slots == 0
    storage.store = storage.store.inner

    req = SimReq("admitted", prompts[3])
    assert sched.run(req) == 64 and req.storage_hit == 64
    settle(cache)
    assert balanced() and cache.tree.l2_tokens >= 64
    assert idle_total(cache, pools) == pools.size
    cache.tree.check_invariants()


def test_pages_framed_from_any_host_slots_hold_those_rows(store_cfg):
    """Write-through frames a page straight from the slab: whether its host slots are
    one ascending run, reversed, a permutation of a run or scattered, the page holds
    exactly those rows in that order."""
    import torch

    from hiradix.codec import decode_page
    from hiradix.storage_tier import _run_start

    cache, _, _ = server(store_cfg)
    storage, slab = cache.storage, cache.slab
    slab.k.copy_(torch.randn(slab.k.shape).to(slab.k.dtype))
    slab.v.copy_(torch.randn(slab.v.shape).to(slab.v.dtype))
    run = torch.arange(32, 48)
    cases = {
        "run": run,
        "reversed": run.flip(0),
        "permuted run": torch.tensor([32, 34, 33, *range(35, 48)]),  # same ends as the run
        "scattered": torch.arange(0, 160, 10),
    }
    assert _run_start(cases["run"]) == 32
    for name, slots in cases.items():
        if name != "run":
            assert _run_start(slots) is None, name
        meta = storage._meta((None, None), bytes(16))
        blob = storage._encode(slots, meta)
        expected = torch.stack((slab.k[:, slots], slab.v[:, slots]))
        assert decode_page(blob, meta) == expected.view(torch.uint8).numpy().tobytes(), name


def test_losing_store_is_still_read_while_others_are_queued(store_cfg):
    """Recomputing beats this store for one request alone; with other requests queued
    the pages are read anyway (they land while the server prefills the others), and the
    request waits for them."""
    from array import array

    cache_a, _, sched_a = server(store_cfg)
    prompt = [3000 + j for j in range(64)]
    sched_a.run(SimReq("a", prompt))
    settle(cache_a)

    cache, _, _ = server(store_cfg)
    storage = cache.storage
    cost = storage.cost
    cost.observe_prefill(100_000, 1.0)  # recomputing 64 tokens: 0.6 ms
    cost.observe_fetch(0, 0.05)  # a 50 ms round trip
    cost.observe_fetch(2**20, 0.1)
    ns = (None, None)
    storage.prefetch("alone", ns, array("q", prompt), 0)
    cache.engine.drain()
    assert storage.prefetches["alone"].ready == 0
    assert cache.stats.counters["recompute_instead_of_load"] == 1
    assert not cost.fetching  # alone, it is not waited on either

    storage.queued = lambda: 3
    storage.prefetch("queued", ns, array("q", prompt), 0)
    cache.engine.drain()
    assert storage.prefetches["queued"].ready == 4
    assert cache.stats.counters["recompute_instead_of_load"] == 1
    storage.forget("queued")
    storage.forget("alone")
    assert cache.slab.used_slots == cache.tree.l2_tokens
