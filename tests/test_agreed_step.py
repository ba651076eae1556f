"""TP ranks agree by construction (issue 14): two caches in one process play two TP ranks,
each on its own thread with its own store shard, joined by an in-process MIN all-reduce.
Rank 1's store is slow, fails and corrupts pages at random; rank 0's is healthy. Driven
through the same scheduler calls, the two trees must stay identical after every request
(the same nodes, residency, locks and pins), and no rank may wait in a collective the
other never enters."""

from __future__ import annotations

import random
import threading

import pytest
from hiradix.backends.faults import FaultyStore
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang_sim import Scheduler, SimReq, make_pools, run_ranks

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")


class Collective:
    """MIN all-reduce between threads; a rank that waits alone fails after ``timeout``."""

    def __init__(self, ranks: int, timeout: float = 20.0) -> None:
        self.barrier = threading.Barrier(ranks, timeout=timeout)
        self.vectors: dict[int, list[int]] = {}
        self.calls = 0

    def reduce_min(self, rank: int, vector: list[int]) -> list[int]:
        self.vectors[rank] = list(vector)
        self.barrier.wait()  # BrokenBarrierError: the other rank never came (a hang)
        lengths = {len(v) for v in self.vectors.values()}
        assert len(lengths) == 1, f"collectives of different shapes: {lengths}"
        out = [min(values) for values in zip(*self.vectors.values(), strict=True)]
        self.barrier.wait()
        if rank == 0:
            self.calls += 1
        return out


def tree_state(cache: HiRadixCache) -> tuple:
    tree = cache.tree
    nodes = sorted(
        (
            node.id,
            tuple(node.tokens),
            node.l1 is not None,
            node.l2 is not None,
            node.l2_ready,
            node.lock_ref,
            len(node.l2_pins),
        )
        for node in tree.iter_nodes()
    )
    return (tuple(nodes), tree.evictable_tokens, tree.protected_tokens, tree.l2_tokens)


def make_rank(rank: int, collective: Collective) -> tuple[HiRadixCache, Scheduler]:
    pools = make_pools(size=384)
    config = parse_config(
        {
            "host": {"size": "96KiB"},
            "store": {"kind": "memory", "block_tokens": 16},
            "prefetch": {"policy": "arrival", "wait": "timeout", "timeout": "20ms"},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id=f"test-model/tp{rank}of2")
    cache._tp_size = lambda: 2  # type: ignore[method-assign]
    cache.now = 0.0  # as a cache built with a TP group of 2 starts (no agreed clock yet)
    cache._reduce_min = lambda vector: collective.reduce_min(rank, vector)  # type: ignore[method-assign]
    return cache, Scheduler(cache, pools)


def drive(cache: HiRadixCache, sched: Scheduler, states: list, prompts: list[list[int]]) -> None:
    """The same scheduler calls on every rank: a first pass that writes the store, host and
    device emptied, then a second pass whose prefixes come back from the store."""
    for i, prompt in enumerate(prompts):
        sched.run(SimReq(f"a{i}", prompt))
        states.append(tree_state(cache))
    for _ in range(30):  # write-through drains on agreed steps
        cache.flush_pending_backups()
        threading.Event().wait(0.005)
    cache.evict(EvictParams(num_tokens=10_000))
    cache.tree.evict_l2(10_000)
    cache.step()
    states.append(tree_state(cache))
    for i, prompt in enumerate(prompts):
        sched.run(SimReq(f"b{i}", prompt))
        states.append(tree_state(cache))


def test_two_ranks_with_different_stores_keep_identical_trees():
    rng = random.Random(14)
    system = [rng.randrange(1000, 2000) for _ in range(48)]
    prompts = [system + [rng.randrange(2000, 3000) for _ in range(rng.randrange(20, 90))]
               for _ in range(10)]  # fmt: skip
    collective = Collective(2)
    ranks = [make_rank(r, collective) for r in range(2)]
    healthy, flaky = ranks[0][0].storage, ranks[1][0].storage
    assert healthy is not None and flaky is not None
    flaky.store = FaultyStore(
        flaky.store, latency_s=0.01, error_rate=0.2, corrupt_rate=0.2, drop_write_rate=0.2, seed=3
    )
    states: list[list] = [[], []]

    def run(rank: int) -> None:
        cache, sched = ranks[rank]
        drive(cache, sched, states[rank], prompts)

    errors = run_ranks(run, 2, on_error=collective.barrier.abort)
    assert not errors, errors
    assert collective.calls > 0
    assert len(states[0]) == len(states[1])
    for step, (a, b) in enumerate(zip(*states, strict=True)):
        assert a == b, f"the ranks' trees differ after step {step}"
    # the store mattered: the second pass found pages on both ranks' agreed view
    assert (
        ranks[0][0].stats.counters["l3_to_l2_tokens"]
        == ranks[1][0].stats.counters["l3_to_l2_tokens"]
    )
    for cache, _ in ranks:
        cache.tree.check_invariants()


def test_consensus_checker_names_the_first_disagreement():
    """A decision taken on one rank only (here: an eviction outside the agreed step) is
    caught at the next step, on both ranks, naming what differs."""
    from hiradix.integration.sglang.agreed_step import ConsensusError

    collective = Collective(2)
    ranks = [make_rank(r, collective) for r in range(2)]
    prompt = list(range(3000, 3100))

    def run(rank: int) -> None:
        cache, sched = ranks[rank]
        sched.run(SimReq("a", prompt))
        cache.step()
        if rank == 1:
            cache.evict(EvictParams(num_tokens=10_000))  # this rank only
        cache.step()

    errors = run_ranks(run, 2, timeout=60)
    assert set(errors) == {0, 1}, errors
    for exc in errors.values():
        assert isinstance(exc, ConsensusError), exc
        assert "TP ranks disagree" in str(exc) and "on " in str(exc)


def test_ranks_sharing_an_nvme_directory_keep_apart(tmp_path):
    """Issue 14 item 4: TP ranks configured with one NVMe directory each write their own
    subdirectory with an equal share of the capacity, so none evicts another's pages."""
    caches = []
    for rank in range(2):
        pools = make_pools(size=384)
        config = parse_config(
            {
                "host": {"size": "96KiB"},
                "store": {"kind": "nvme", "block_tokens": 16,
                          "nvme": {"path": str(tmp_path), "size": "64MiB"}},
            }
        )  # fmt: skip
        cache = HiRadixCache(pools.params(1), config, model_id=f"m/tp{rank}of2", shard=(rank, 2))
        sched = Scheduler(cache, pools)
        sched.run(SimReq("a", list(range(4000, 4064))))
        for _ in range(20):
            cache.flush_pending_backups()
            cache.engine.drain()
        caches.append(cache)
    for rank in range(2):
        files = [p for p in (tmp_path / f"rank{rank}of2").rglob("*") if p.is_file()]
        assert files, f"rank {rank} wrote nothing in its own directory"
        assert caches[rank].storage.store.capacity_bytes == 32 * 2**20
    assert not [p for p in tmp_path.iterdir() if p.is_file()]
