"""HiRadixCache against SGLang's real CPU pools, allocator and release path (device tier)."""

from __future__ import annotations

import random

import pytest
from sglang_sim import Scheduler, SimReq, idle_total, make_pools

from hiradix.config import parse_config
from hiradix.integration.sglang.cache import HiRadixCache

pytestmark = pytest.mark.usefixtures("sglang_context")

DEVICE_ONLY = {"host": {"size": 0}, "store": {"kind": "none"}}


def make(page_size=1, size=512, **cfg):
    pools = make_pools(size=size, page_size=page_size)
    cache = HiRadixCache(pools.params(page_size), parse_config({**DEVICE_ONLY, **cfg}))
    return cache, pools, Scheduler(cache, pools, page_size)


@pytest.mark.parametrize("page_size", [1, 4])
def test_repeat_prefix_hits_and_serves_the_right_kv(page_size):
    cache, pools, sched = make(page_size)
    prompt = list(range(100, 160))
    assert sched.run(SimReq("a", prompt)) == 0
    # the same prompt again: everything page-aligned is cached (prompt + 4 outputs inserted)
    assert sched.run(SimReq("b", prompt)) == len(prompt) // page_size * page_size
    # a branch shares only the first 30 tokens
    branch = prompt[:30] + [7] * 20
    assert sched.run(SimReq("c", branch)) == 30 // page_size * page_size
    assert idle_total(cache, pools) == pools.size
    cache.tree.check_invariants()


def test_namespaces_are_isolated():
    cache, pools, sched = make()
    prompt = list(range(50))
    sched.run(SimReq("a", prompt, extra_key="lora-1"))
    assert sched.run(SimReq("b", prompt, extra_key="lora-2")) == 0
    assert sched.run(SimReq("c", prompt, extra_key="lora-1")) == 50


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "priority"])
def test_random_workload_under_memory_pressure(page_size, policy):
    """Many requests over a pool a few times smaller than the working set: every match
    serves the exact KV of its tokens and the idle invariant holds after every request."""
    cache, pools, sched = make(page_size, size=256, eviction_policy=policy)
    rng = random.Random(page_size)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(8, 64))] for _ in range(6)]
    hits = 0
    for i in range(150):
        ids = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
        hits += sched.run(SimReq(f"r{i}", ids))
        assert idle_total(cache, pools) == pools.size
    cache.tree.check_invariants()
    assert hits > 0


def test_locked_request_survives_eviction_by_others():
    cache, pools, sched = make(size=192)
    held = SimReq("held", list(range(60)))
    sched.admit(held)  # holds its lock and its row while others churn
    for i in range(20):
        sched.run(SimReq(f"o{i}", [1000 + i] * 2 + list(range(2000 + 50 * i, 2050 + 50 * i))))
    sched.verify_prefix(held)
    sched.release(held)
    assert sched.run(SimReq("again", list(range(60)))) == 60
    assert idle_total(cache, pools) == pools.size


def test_chunked_checkpoint_moves_the_lock():
    cache, pools, sched = make()
    req = SimReq("chunked", list(range(300, 380)))
    sched.admit(req)
    cache.checkpoint(req, up_to=40)  # an unfinished chunk is stashed
    assert req.kv.cache_protected_len == 40
    assert cache.protected_size() == 40
    sched.release(req)
    assert cache.protected_size() == 0
    assert idle_total(cache, pools) == pools.size
    assert sched.run(SimReq("next", list(range(300, 380)))) == 80


def test_flush_drops_everything_without_freeing():
    cache, pools, sched = make()
    sched.run(SimReq("a", list(range(40))))
    cache.reset()
    pools.req_to_token.clear()
    pools.allocator.clear()
    assert cache.evictable_size() == cache.protected_size() == 0
    assert idle_total(cache, pools) == pools.size
    assert sched.run(SimReq("b", list(range(40)))) == 0


def test_disabled_cache_caches_nothing():
    pools = make_pools()
    params = pools.params(1)
    params.disable = True
    cache = HiRadixCache(params, parse_config(DEVICE_ONLY))
    sched = Scheduler(cache, pools)
    sched.run(SimReq("a", list(range(40))))
    assert sched.run(SimReq("b", list(range(40)))) == 0
    assert not cache.supports_prefix_sharing()
    assert idle_total(cache, pools) == pools.size
