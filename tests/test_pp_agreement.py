"""Pipeline stages agree the way SGLang's unified cache makes them (issue 14 item 3): the
first stage's ranks agree among themselves, and the verdict is relayed down the pipeline;
a later stage adopts it, waiting for its own copies to catch up, and never makes the
first stage wait for it. Two caches play two stages of one pipeline, each on its own
thread, with the later stage's device-to-host copies slower than the first's."""

from __future__ import annotations

import dataclasses
import queue
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hiradix.integration.sglang.cache import PP_STORE_REFUSED, HiRadixCache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang_sim import Scheduler, SimReq, make_pools, run_ranks
from test_agreed_step import tree_state

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")


class SlowHandle:
    """A finished copy that reports itself done only ``delay`` seconds after it started."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.ready_at = time.monotonic() + delay

    def done(self) -> bool:
        return time.monotonic() >= self.ready_at and self.inner.done()

    def wait(self) -> None:
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        self.inner.wait()


def make_stage(stage: int, relay: queue.Queue, waits: list[int]) -> tuple[HiRadixCache, Scheduler]:
    pools = make_pools(size=384)
    config = parse_config(
        {
            "host": {"size": "96KiB"},
            "store": {"kind": "none"},
            "ttl": {"host": "1s"},  # expiry on the agreed clock: the first stage's
            "prefetch": {"policy": "arrival"},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id="test-model")
    cache.pp_rank, cache.pp_size, cache.pp_group = stage, 2, object()
    cache.now = 0.0
    if stage == 0:

        def forward(vector: list[int]) -> list[int]:
            relay.put(list(vector))
            return vector

    else:
        copier = cache.engine.copier
        assert copier is not None
        demote = copier.device_to_host
        copier.device_to_host = lambda d, h: SlowHandle(demote(d, h), 0.03)  # type: ignore[method-assign]
        wait_ready = cache.engine.wait_ready

        def waiting(counts: Any, timeout: float = 300.0) -> None:
            if cache.engine.ready()[0] < counts[0]:
                waits.append(counts[0] - cache.engine.ready()[0])
            wait_ready(counts, timeout)

        cache.engine.wait_ready = waiting  # type: ignore[method-assign]

        def forward(vector: list[int]) -> list[int]:
            return relay.get(timeout=30)

    cache._pp_forward = forward  # type: ignore[method-assign]
    return cache, Scheduler(cache, pools)


def test_a_later_stage_adopts_the_first_stages_verdict():
    rng = random.Random(3)
    system = [rng.randrange(1000, 2000) for _ in range(40)]
    prompts = [system + [rng.randrange(2000, 3000) for _ in range(rng.randrange(20, 80))]
               for _ in range(8)]  # fmt: skip
    relay: queue.Queue = queue.Queue()
    waits: list[int] = []
    stages = [make_stage(s, relay, waits) for s in range(2)]
    states: list[list] = [[], []]

    def run(stage: int) -> None:
        cache, sched = stages[stage]
        pause = random.Random(stage)  # each stage's own timing: different clocks
        for rnd in range(2):
            for i, prompt in enumerate(prompts):
                sched.run(SimReq(f"r{rnd}-{i}", prompt))
                states[stage].append(tree_state(cache))
                time.sleep(pause.uniform(0.0, 0.03))
            cache.evict(EvictParams(num_tokens=10_000))  # the second round loads from L2
            cache.step()
            states[stage].append(tree_state(cache))
        # only the first stage's clock passes the host TTL; the later one expires the
        # same pages at the same step all the same
        time.sleep(1.2 if stage == 0 else 0.0)
        cache.step()
        states[stage].append(tree_state(cache))

    errors = run_ranks(run, 2)
    assert not errors, errors
    assert len(states[0]) == len(states[1])
    for step, (a, b) in enumerate(zip(*states, strict=True)):
        assert a == b, f"the stages' trees differ after step {step}"
    assert waits, "the later stage never had to wait for its own copies"
    first, later = stages[0][0], stages[1][0]
    assert first.stats.counters["l2_hit_tokens"] == later.stats.counters["l2_hit_tokens"] > 0
    assert first.now == later.now  # the later stage runs on the first stage's clock
    expired = first.stats.counters["l2_expired_tokens"]
    assert expired == later.stats.counters["l2_expired_tokens"] > 0
    for cache, _ in stages:
        cache.tree.check_invariants()


def test_a_store_with_pipeline_parallelism_is_refused_at_start(tmp_path: Path):
    pools = make_pools(size=384)
    params = dataclasses.replace(pools.params(1), pp_rank=1, pp_size=2)
    config = parse_config(
        {"host": {"size": "96KiB"}, "store": {"kind": "nvme", "nvme": {"path": str(tmp_path)}}}
    )
    with pytest.raises(ValueError, match="not supported with pipeline parallelism") as info:
        HiRadixCache(params, config, model_id="test-model")
    assert str(info.value) == PP_STORE_REFUSED and "store.kind: none" in str(info.value)


def test_the_relay_over_a_real_process_group(tmp_path: Path):
    """Three stages over gloo, the transport SGLang gives the cache (``pp_cache_group``):
    every stage ends each step with the first stage's vector."""
    import torch.multiprocessing as mp
    from pp_relay_child import relay_stage

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(relay_stage, args=(3, init, str(tmp_path)), nprocs=3,
                       start_method="spawn", join=True)  # fmt: skip
    expected = [[step, 0, 7] for step in range(5)]
    for rank in range(3):
        assert eval(Path(tmp_path, f"{rank}.txt").read_text()) == expected, rank


def test_attaching_a_store_with_pipeline_parallelism_is_refused(tmp_path: Path):
    """The admin API (issue 18) refuses what start-up refuses, and changes nothing."""
    import json

    pools = make_pools(size=384)
    params = dataclasses.replace(pools.params(1), pp_rank=0, pp_size=2)
    config = parse_config({"host": {"size": "96KiB"}, "store": {"kind": "none"}})
    cache = HiRadixCache(params, config, model_id="test-model")
    ok, message = cache.admin_attach("nvme", json.dumps({"nvme": {"path": str(tmp_path)}}))
    assert not ok and "pipeline parallelism" in message, message
    cache.step()
    assert cache.storage is None
