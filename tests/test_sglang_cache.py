"""HiRadixCache against SGLang's real CPU pools, allocator and release path (device tier)."""

from __future__ import annotations

import random
import sys
import threading
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang_sim import Scheduler, SimReq, idle_total, make_pools

from hiradix.config import parse_config
from hiradix.policies.base import Stage
from hiradix.types import Tier

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
    _, _, sched = make()
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


# ---------------------------------------------------------------- host tier (L2)
def make_tiered(page_size=1, size=256, host="4MiB", **cfg):
    pools = make_pools(size=size, page_size=page_size)
    config = parse_config({"host": {"size": host}, "store": {"kind": "none"}, **cfg})
    cache = HiRadixCache(pools.params(page_size), config)
    return cache, pools, Scheduler(cache, pools, page_size)


def host_accounted(cache) -> bool:
    return cache.slab.used_slots == cache.tree.l2_tokens


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_host_tier_serves_evicted_prefixes_with_the_right_kv(page_size, policy):
    """L1 holds a fraction of the working set, L2 all of it: the second pass loads back
    from host, and every loaded page carries exactly the KV of its tokens."""
    cache, pools, sched = make_tiered(
        page_size, size=256, write_policy=policy, write_through_hits=1
    )
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(12)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"a{i}", p))
    assert cache.stats.counters["l1_to_l2_tokens"] > 0
    hits = [sched.run(SimReq(f"b{i}", p)) for i, p in enumerate(prompts)]
    aligned = 60 // page_size * page_size
    assert all(h == aligned for h in hits), hits
    snap = cache.stats_snapshot()
    assert snap.counters["l2_hit_tokens"] > 0 and snap.counters["l2_to_l1_tokens"] > 0
    assert idle_total(cache, pools) == pools.size
    assert host_accounted(cache)
    cache.tree.check_invariants()


def test_host_full_degrades_to_recompute():
    cache, pools, sched = make_tiered(size=256, host=96 * 2 * 2 * 2 * 4)  # 96 tokens of host
    rng = random.Random(5)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(10)]
    for rnd in range(2):
        for i, p in enumerate(prompts):
            sched.run(SimReq(f"{rnd}-{i}", p))
            assert idle_total(cache, pools) == pools.size
            assert host_accounted(cache)
    assert cache.slab.used_slots <= cache.slab.num_slots
    cache.tree.check_invariants()


def test_flush_with_host_tier_frees_every_slot():
    cache, pools, sched = make_tiered()
    for i in range(8):
        sched.run(SimReq(f"r{i}", list(range(i * 100, i * 100 + 50))))
    assert cache.slab.used_slots > 0
    cache.reset()
    pools.req_to_token.clear()
    pools.allocator.clear()
    assert cache.slab.used_slots == 0 and cache.tree.l2_tokens == 0
    assert idle_total(cache, pools) == pools.size


class ManualCopier:
    """Wraps the real CPU copier but completes device->host copies only when told to,
    so that tests can observe copies in flight (a fault-injection stand-in for CUDA)."""

    def __init__(self, inner):
        self.inner = inner
        self.pending = []

    def device_to_host(self, device_idx, host_idx):
        class Handle:
            finished = False
            fail = False

            def done(self):
                return self.finished

            def wait(self):
                self.finished = True

        handle = Handle()
        self.pending.append((handle, device_idx.clone(), host_idx))
        return handle

    def complete(self, fail=False):
        for handle, dev, host in self.pending:
            if not fail:
                self.inner.device_to_host(dev, host)
            handle.finished = True
        self.pending = []

    def host_to_device(self, host_idx, device_idx):
        return self.inner.host_to_device(host_idx, device_idx)


@pytest.mark.parametrize("fail", [False, True])
def test_in_flight_demotion_protects_device_slots(fail):
    from hiradix.transfer import _FAILED

    cache, pools, sched = make_tiered(size=256)
    manual = ManualCopier(cache.engine.copier)
    cache.engine.copier = manual
    sched.run(SimReq("a", list(range(80))))
    assert manual.pending, "a demotion should be in flight"
    # in flight: the node's device slots are protected, the idle invariant still holds
    assert cache.protected_size() == 84
    assert idle_total(cache, pools) == pools.size
    assert cache.evict(EvictParams(num_tokens=1000)).num_tokens_evicted == 0
    if fail:  # the copy reports failure: the host copy is rolled back
        cache.engine._copies = [(_FAILED, cb) for _, cb in cache.engine._copies]
        manual.pending = []
    else:
        manual.complete()
    cache.flush_pending_backups()
    assert cache.protected_size() == 0
    assert idle_total(cache, pools) == pools.size
    assert host_accounted(cache)
    if fail:
        assert cache.tree.l2_tokens == 0 and cache.stats.counters["copy_failures"] > 0
    else:
        assert cache.tree.l2_tokens == 84
    cache.tree.check_invariants()


def test_policy_stage_to_l1_loads_the_host_run_ahead_of_its_request():
    """A ``Stage(tier=L1)`` plan brings a host-only prefix to the device ahead of its
    request, evicting unlocked device leaves for room but never a locked one; the request
    then matches it on the device, with the right KV, and needs no load-back."""
    cache, pools, sched = make_tiered(size=256)
    rng = random.Random(11)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(8)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"a{i}", p))
    first = array("q", prompts[0])
    NS = (None, None)  # (extra_key, cache_salt) of a plain request
    found = cache.tree.match(NS, first, touch=False)
    assert found.l1_len == 0 and found.host_len == 60  # evicted to host by the later ones
    running = SimReq("running", prompts[-1])
    sched.arrive(running)
    sched.admit(running)  # holds its prefix locked on the device
    spare = pools.allocator.alloc(pools.allocator.available_size())  # no free slot left
    cache._execute(Stage(NS, first, Tier.L1, 0.0, 1))
    assert cache.stats.counters["policy_l1_staged_tokens"] == 60
    assert cache.tree.match(NS, first, touch=False).l1_len == 60
    sched.verify_prefix(running)  # its locked KV did not move
    pools.allocator.free(spare)
    sched.release(running)
    req = SimReq("b", prompts[0])
    loads = cache.stats.counters["l2_to_l1_tokens"]
    assert sched.run(req) == 60  # verify_prefix checks every staged value
    assert cache.stats.counters["l2_to_l1_tokens"] == loads  # no load-back needed
    assert idle_total(cache, pools) == pools.size
    assert host_accounted(cache)
    cache.tree.check_invariants()


def test_staging_for_waiting_requests_is_capped_at_a_quarter_of_the_pool():
    """Prefixes staged for requests still in the queue hold at most a quarter of the
    device pool: a deep queue cannot evict what was staged for its head."""
    cache, pools, sched = make_tiered(size=256)  # cap: 64 tokens
    rng = random.Random(12)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(8)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"a{i}", p))
    NS = (None, None)
    first, second = array("q", prompts[0]), array("q", prompts[1])
    assert cache.tree.match(NS, first, touch=False).host_len == 60
    assert cache.tree.match(NS, second, touch=False).host_len == 60
    cache._stage_for_request("r0", NS, first)
    cache._stage_for_request("r1", NS, second)  # 60 + 60 > 64: skipped
    assert cache.tree.match(NS, first, touch=False).l1_len == 60
    assert cache.tree.match(NS, second, touch=False).l1_len == 0
    req = SimReq("r0", prompts[0])
    assert sched.run(req) == 60  # admitted: its staging no longer counts
    cache._stage_for_request("r1", NS, second)
    assert cache.tree.match(NS, second, touch=False).l1_len == 60
    assert idle_total(cache, pools) == pools.size
    cache.tree.check_invariants()


def test_no_staging_for_a_request_behind_more_new_tokens_than_the_pool():
    """When the prompts queued ahead of a request will insert more new tokens than the
    device pool holds, staging its prefix now would be evicted before it runs: skipped."""
    cache, _, sched = make_tiered(size=256)
    rng = random.Random(14)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(8)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"a{i}", p))
    NS = (None, None)
    first = array("q", prompts[0])
    assert cache.tree.match(NS, first, touch=False).host_len == 60
    queue = [SimpleNamespace(rid=f"q{i}") for i in range(3)]
    cache.waiting = lambda: queue
    cache._new_by_rid.update({"q0": 100, "q1": 100, "q2": 100})  # 300 new > 256
    skipped = cache.stats.counters.get("policy_plans_skipped", 0)
    cache._stage_for_request("r", NS, first)
    assert cache.tree.match(NS, first, touch=False).l1_len == 0
    assert cache.stats.counters["policy_plans_skipped"] == skipped + 1
    queue.pop()  # 200 new tokens ahead: it fits
    cache._stage_for_request("r", NS, first)
    assert cache.tree.match(NS, first, touch=False).l1_len == 60
    cache.tree.check_invariants()


def test_arrival_events_reach_the_policy_without_a_store():
    """With a host tier and no L3 store, arrivals still reach the policy (on SGLang's
    storage-prefetch call); `pattern` stages the request's host run to the device while it
    waits, and those tokens count as L2 hits, not L1."""
    cache, pools, sched = make_tiered(size=256)
    assert cache.wants_storage_prefetch
    rng = random.Random(13)
    prompts = [[rng.randrange(1000) for _ in range(60)] for _ in range(8)]
    for i, p in enumerate(prompts):
        sched.run(SimReq(f"a{i}", p))
    before = dict(cache.stats.counters)
    assert cache.tree.match((None, None), array("q", prompts[0]), touch=False).host_len == 60
    # what SGLang does on arrival: match (no load-back), then the storage-prefetch call
    assert not cache.prefetch_from_storage(
        SimpleNamespace(rid="again"), None, [], matched_prefix_tokens=prompts[0]
    )
    assert cache.tree.match((None, None), array("q", prompts[0]), touch=False).l1_len == 60
    assert sched.run(SimReq("again", prompts[0])) == 60  # verify_prefix checks the KV
    after = cache.stats.counters
    assert after["policy_l1_staged_tokens"] - before["policy_l1_staged_tokens"] == 60
    assert after["l2_hit_tokens"] - before["l2_hit_tokens"] == 60
    assert after["l1_hit_tokens"] == before["l1_hit_tokens"]
    assert idle_total(cache, pools) == pools.size
    quiet, _, _ = make_tiered(size=256, prefetch={"policy": "none"})
    assert not quiet.wants_storage_prefetch


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="OS thread names are read from Linux /proc"
)
def test_io_threads_carry_their_lane_name_in_the_os():
    from hiradix.transfer import TransferEngine

    engine = TransferEngine()
    names: list[str] = []
    try:
        for lane in ("read", "write"):
            engine.submit_io(
                lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text(),
                lambda result, error: names.append(result.strip()),
                lane=lane,
            )
        engine.drain()
    finally:
        engine.shutdown()
    assert sorted(names) == ["hiradix-read", "hiradix-write"]


def test_host_slab_fault_in_keeps_what_demotions_wrote_meanwhile():
    """The background fault-in (MADV_POPULATE_WRITE) runs while the scheduler may already
    write slots; it must never change their contents."""
    import torch
    from hiradix.backends.host_slab import HostSlab, populate

    slab = HostSlab(1 << 16, layers=2, heads=2, head_dim=64, dtype=torch.bfloat16)
    rows = torch.arange(0, 1 << 16, 97)
    pattern = torch.randn(2, len(rows), 2, 64).to(torch.bfloat16)
    slab.k[:, rows] = pattern  # written while the fault-in may still be running
    assert slab.populated.wait(30)
    assert torch.equal(slab.k[:, rows], pattern)
    # once more, synchronously, over memory that is now all written
    slab.v.copy_(torch.ones_like(slab.v))
    ok = populate([slab.k, slab.v], chunk_bytes=1 << 20)
    if sys.platform.startswith("linux") and ok is False:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    assert ok
    assert torch.equal(slab.k[:, rows], pattern)
    assert bool((slab.v == 1).all())
