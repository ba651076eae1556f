"""Changing the L3 store of a running cache (issue 18), in-process: SGLang's real pools,
hiradix's cache and real stores (NVMe files, a real redis-server). The requests go through
the same calls SGLang's admin handlers make (``integration/sglang/store_admin.py``); the
switch is applied at the next agreed step, with store jobs in flight."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from hiradix.backends.faults import FaultyStore
from hiradix.backends.registry import create_store
from hiradix.integration.sglang.cache import HiRadixCache
from sglang_sim import Scheduler, SimReq, idle_total, make_pools, run_ranks, settle
from test_agreed_step import Collective, make_rank, tree_state

from hiradix.config import ConfigError, parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")


def nvme(path) -> dict:
    return {"kind": "nvme", "nvme": {"path": str(path), "size": "64MiB"}}


def redis(url: str) -> dict:
    return {"kind": "redis", "redis": {"url": url, "key_prefix": f"t{random.randrange(10**9)}:"}}


def open_store(section: dict):
    """The store a section names, opened directly (what ``hiradix store stats`` reads)."""
    return create_store(parse_config({"store": section}).store)


def pages(section: dict) -> int:
    store = open_store(section)
    try:
        return store.stats().pages
    finally:
        store.close()


def server(store: dict, *, host="4MiB", wait="wait_complete", block=16):
    pools = make_pools(size=512)
    config = parse_config(
        {
            "host": {"size": host},
            "store": {**store, "block_tokens": block} if store["kind"] != "none" else store,
            "prefetch": {"wait": wait},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id="test-model")
    return cache, pools, Scheduler(cache, pools)


def attach(cache: HiRadixCache, section: dict) -> tuple[bool, str]:
    body = {"block_tokens": 16, **{k: v for k, v in section.items() if k != "kind"}}
    return cache.admin_attach(section["kind"], json.dumps(body))


def prompt(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def assert_clean(cache: HiRadixCache, pools) -> None:
    """No device slot leaked (SGLang's idle invariant), no host slot leaked."""
    settle(cache)
    assert idle_total(cache, pools) == pools.size
    assert cache.slab.used_slots == cache.tree.l2_tokens
    cache.tree.check_invariants()


def test_attach_switches_at_the_next_step_and_new_pages_land_in_the_new_store(tmp_path, redis_url):
    old, new = nvme(tmp_path / "a"), redis(redis_url)
    cache, pools, sched = server(old)
    first = prompt(1)
    sched.run(SimReq("a", first))
    settle(cache)
    written_old = pages(old)
    assert written_old >= 6

    ok, message = attach(cache, new)
    assert ok, message
    assert "redis at" in message
    # accepted, not applied: the switch waits for the agreed step
    assert cache.config.store.kind.value == "nvme" and cache.store_status()["pending"] == ["attach"]
    cache.step()
    status = cache.store_status()
    assert status["kind"] == "redis" and status["switches"] == 1 and not status["pending"]
    assert status["breaker"] == "closed" and status["pages_known_written"] == 0

    sched.run(SimReq("b", prompt(2)))
    settle(cache)
    assert pages(new) >= 6  # written after the switch: in the new store
    assert pages(old) == written_old  # and not in the old one
    assert cache.store_status()["since_attach"]["l2_to_l3_tokens"] >= 96
    # what L1/L2 held before the switch still serves, with the right KV (verify_prefix)
    assert sched.run(SimReq("c", first)) >= 96
    assert_clean(cache, pools)


BAD_REQUESTS = [
    ("redis", {"redis": {"url": "http://127.0.0.1:6379"}}),
    ("redis", {"colour": "blue"}),
    ("file", {}),
    ("nvme", {"nvme": {"size": "lots"}}),
    ("memory", {"block_tokens": 0}),
]


@pytest.mark.parametrize(("kind", "section"), BAD_REQUESTS)
def test_bad_attach_gets_the_config_files_message_and_changes_nothing(tmp_path, kind, section):
    cache, _, sched = server(nvme(tmp_path / "a"))
    with pytest.raises(ConfigError) as from_file:
        parse_config({"store": {**section, "kind": kind}})
    before = cache.storage
    ok, message = cache.admin_attach(kind, json.dumps(section))
    assert not ok
    for line in from_file.value.errors:  # the same key, value and allowed values
        assert line in message
    cache.step()
    assert cache.storage is before and cache.config.store.kind.value == "nvme"
    assert cache.store_status()["switches"] == 0
    sched.run(SimReq("a", prompt(3)))


def test_requests_the_file_cannot_check_are_refused_too(tmp_path, monkeypatch):
    cache, _, _ = server(nvme(tmp_path / "a"))
    before = cache.storage
    monkeypatch.delenv("HIRADIX_TEST_MAC", raising=False)
    refusals = {
        "not json": cache.admin_attach("memory", "{nope"),
        "kind differs": cache.admin_attach("memory", json.dumps({"kind": "redis"})),
        "a list": cache.admin_attach("memory", "[1, 2]"),
        "mac key unset": cache.admin_attach("memory", json.dumps({"mac_key_env": "HIRADIX_TEST_MAC"})),
    }  # fmt: skip
    for why, (ok, message) in refusals.items():
        assert not ok, why
    assert "not valid JSON" in refusals["not json"][1]
    assert "'store.kind'" in refusals["kind differs"][1]
    assert "HIRADIX_TEST_MAC" in refusals["mac key unset"][1]
    cache.step()
    assert cache.storage is before
    # a server without a host tier has nowhere to stage L3 pages
    no_host, _, _ = server({"kind": "none"}, host=0)
    ok, message = no_host.admin_attach("memory", "{}")
    assert not ok and "host tier" in message


def gated(cache: HiRadixCache, gate: threading.Event) -> FaultyStore:
    """The cache's store, its every call held until ``gate`` is set (the shipped fault
    injector, with a sleep that waits for the gate)."""
    assert cache.storage is not None
    store = FaultyStore(cache.storage.store, latency_s=1.0, sleep=lambda _: gate.wait(30))
    cache.storage.store = store
    return store


def test_detach_and_attach_with_store_jobs_in_flight(tmp_path):
    old, new = nvme(tmp_path / "a"), nvme(tmp_path / "b")
    cache, pools, sched = server(old, wait="best_effort")
    gate = threading.Event()
    gated(cache, gate)
    retired = cache.storage
    prompts = [prompt(10 + i) for i in range(4)]
    for i, ids in enumerate(prompts):  # lookups and write-throughs, held at the store
        sched.run(SimReq(f"a{i}", ids))
    for _ in range(3):
        cache.flush_pending_backups()
    assert retired.pending_jobs >= 3 and retired._queued_pages > 0
    # a request waiting for its L3 lookup when the store goes away
    waiting = SimReq("w", [*prompts[0], *prompt(99, 40)])
    from types import SimpleNamespace

    handle = SimpleNamespace(rid="w", attempt_id=0)
    ids = waiting.full_untruncated_fill_ids
    assert cache.prefetch_from_storage(handle, None, ids[100:], matched_prefix_tokens=ids[:100])

    ok, _ = cache.admin_detach()
    assert ok
    cache.step()
    assert cache.storage is None and retired.retired
    assert cache.store_status()["retired_stores_with_jobs"] == 1
    assert cache.check_prefetch_progress(handle)  # no store: admitted at once
    sched.admit(waiting)  # served from L1/L2, KV checked
    sched.release(waiting)

    gate.set()  # running jobs finish against the old store; queued ones do no IO
    deadline = time.monotonic() + 30
    while cache.store_status()["retired_stores_with_jobs"]:
        assert time.monotonic() < deadline, "the retired store's jobs never completed"
        cache.step()
        time.sleep(0.01)
    assert retired.pending_jobs == 0 and retired._queued_pages == 0
    assert pages(old) >= 1  # the writes that were running reached the old store
    assert cache.stats.counters["l3_dropped_writes"] > 0  # the queued ones were dropped
    assert_clean(cache, pools)

    ok, message = attach(cache, new)
    assert ok, message
    cache.step()
    sched.run(SimReq("b", prompt(20)))
    settle(cache)
    assert pages(new) >= 6
    assert sched.run(SimReq("c", prompts[3])) >= 96
    assert_clean(cache, pools)


def test_clear_empties_the_store(tmp_path):
    section = nvme(tmp_path / "a")
    cache, pools, sched = server(section)
    sched.run(SimReq("a", prompt(5)))
    settle(cache)
    written = pages(section)
    assert written >= 6
    ok, message = cache.admin_clear()
    assert ok and "cleared" in message
    assert pages(section) == written  # applied at the next step
    cache.step()
    settle(cache)
    assert pages(section) == 0
    status = cache.store_status()
    assert status["cleared_pages"] == written and status["pages_known_written"] == 0
    sched.run(SimReq("b", prompt(6)))  # the store keeps working
    settle(cache)
    assert pages(section) >= 6
    assert_clean(cache, pools)
    detached, _, _ = server({"kind": "none"})
    ok, message = detached.admin_clear()
    assert not ok and "no L3 store" in message


def test_two_tp_ranks_switch_at_the_same_step(tmp_path):
    rng = random.Random(18)
    system = [rng.randrange(1000, 2000) for _ in range(48)]
    prompts = [system + [rng.randrange(2000, 3000) for _ in range(rng.randrange(20, 90))]
               for _ in range(8)]  # fmt: skip
    collective = Collective(2)
    ranks = [make_rank(r, collective) for r in range(2)]
    # rank 1's store is slow and fails at random: its jobs are in flight at each switch
    ranks[1][0].storage.store = FaultyStore(
        ranks[1][0].storage.store, latency_s=0.01, error_rate=0.2, seed=5
    )
    # a condition only rank 1 sees (an unreadable file on its host, say)
    refuse_once = threading.Event()

    def rank_local_check(config):
        if not refuse_once.is_set():
            refuse_once.set()
            raise ConfigError("rank-local problem")

    ranks[1][0]._check_store_config = rank_local_check  # type: ignore[method-assign]
    states: list[list] = [[], []]
    switched_at: list[list[int]] = [[], []]
    answers: list[list[bool]] = [[], []]

    def run(rank: int) -> None:
        cache, sched = ranks[rank]
        switch = cache._switch_store

        def recording(config):
            switched_at[rank].append(cache._step.steps)
            switch(config)

        cache._switch_store = recording  # type: ignore[method-assign]
        for i, ids in enumerate(prompts):
            if i == 2:  # refused on rank 1 alone: refused on both
                answers[rank].append(cache.admin_attach("memory", '{"block_tokens": 32}')[0])
            if i == 3:
                answers[rank].append(cache.admin_attach("memory", '{"block_tokens": 32}')[0])
            if i == 5:
                answers[rank].append(cache.admin_detach()[0])
            if i == 6:
                answers[rank].append(cache.admin_attach("memory", "{}")[0])
            sched.run(SimReq(f"r{i}", ids))
            cache.flush_pending_backups()
            states[rank].append(tree_state(cache))

    errors = run_ranks(run, 2, on_error=collective.barrier.abort)
    assert not errors, errors
    assert answers[0] == answers[1] == [False, True, True, True]
    assert switched_at[0] == switched_at[1] and len(switched_at[0]) == 3
    for step, (a, b) in enumerate(zip(*states, strict=True)):
        assert a == b, f"the ranks' trees differ after request {step}"
    for cache, _ in ranks:
        assert cache.store_status()["block_tokens"] == 64
        cache.tree.check_invariants()


def test_scheduler_hooks_answer_for_hiradix_and_pass_other_caches_through(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hiradix.integration.sglang import store_admin
    from sglang.srt.managers.io_struct import (
        AttachHiCacheStorageReqInput,
        ClearHiCacheReqInput,
        DetachHiCacheStorageReqInput,
        GetInternalStateReqOutput,
    )

    cache, _, _ = server({"kind": "none"})
    scheduler = SimpleNamespace(tree_cache=cache, enable_hicache_storage=False, waiting_queue=[])

    def sglang_handler(*args):
        return "SGLang's own answer"

    body = json.dumps({"nvme": {"path": str(tmp_path / "b")}, "block_tokens": 16})
    request = AttachHiCacheStorageReqInput(
        hicache_storage_backend="nvme", hicache_storage_backend_extra_config_json=body
    )
    out = store_admin._attach(sglang_handler, scheduler, request)
    assert out.success, out.message
    assert scheduler.enable_hicache_storage  # SGLang now calls the storage-prefetch hooks
    cache.step()
    state = store_admin._state(
        lambda s: GetInternalStateReqOutput(internal_state={"x": 1}), scheduler
    ).internal_state
    assert state["x"] == 1 and state["hiradix_store"]["kind"] == "nvme"
    refused = store_admin._attach(
        sglang_handler,
        scheduler,
        AttachHiCacheStorageReqInput(
            hicache_storage_backend="nvme", hicache_write_policy="write_back"
        ),
    )
    assert not refused.success and "hicache_write_policy" in refused.message
    # clear deletes what a fleet may share: refused unless the server has an admin key
    assert not store_admin._clear(sglang_handler, scheduler, ClearHiCacheReqInput()).success
    monkeypatch.setattr(store_admin, "admin_key_configured", lambda: True)
    assert store_admin._clear(sglang_handler, scheduler, ClearHiCacheReqInput()).success
    assert store_admin._detach(sglang_handler, scheduler, DetachHiCacheStorageReqInput()).success
    cache.step()
    assert cache.storage is None and cache.store_status()["switches"] == 2
    other = SimpleNamespace(tree_cache=object())
    assert store_admin._attach(sglang_handler, other, request) == "SGLang's own answer"
    assert store_admin._detach(sglang_handler, other, None) == "SGLang's own answer"


def test_cli_admin_actions_need_a_server_and_a_checked_config(tmp_path, capsys):
    from hiradix.integration import cli
    from hiradix.integration.testbed.sglang_server import free_port

    with pytest.raises(SystemExit) as usage:
        cli.main(["store", "detach"])  # no --url
    assert usage.value.code == 2 and "needs --url" in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["store", "status", "--url", nobody]) == 2
    assert "cannot reach" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {kind: nvme, nvme: {size: lots}}\n")
    assert cli.main(["store", "attach", "--url", nobody, "--config", str(bad)]) == 1
    assert "config key 'store.nvme.size'" in capsys.readouterr().err  # checked before sending
    assert cli.main(["store", "attach", "--url", nobody]) == 2


def test_a_store_attached_while_the_tree_holds_old_weights_stays_off(tmp_path):
    """After a weight update the cache was not flushed with, L3 is off until the next
    flush; a store attached meanwhile inherits that (it would store the old weights' KV
    under the new weights' keys)."""
    cache, _, sched = server(nvme(tmp_path / "a"))
    cache.new_weights_epoch("w2", "v2", stale=True)
    ok, message = attach(cache, nvme(tmp_path / "b"))
    assert ok, message
    cache.step()
    assert cache.store_status()["suspended"]
    sched.run(SimReq("a", prompt(7)))
    settle(cache)
    assert pages(nvme(tmp_path / "b")) == 0
    cache.reset()  # SGLang's flush_cache: the tree holds no old KV any more
    assert not cache.store_status()["suspended"]


def test_a_store_attached_after_a_stale_update_without_a_store_stays_off(tmp_path):
    """The tree's staleness belongs to the cache, not to the store in use: a weight update
    the cache was not flushed with while no store was attached (or between a detach and an
    attach applied at the same step) still keeps the next store off until the flush."""
    cache, _, sched = server({"kind": "none"})
    sched.run(SimReq("old", prompt(7)))  # KV of the old weights, in L1/L2
    cache.new_weights_epoch("w2", "v2", stale=True)
    assert attach(cache, nvme(tmp_path / "b"))[0]
    cache.step()
    assert cache.store_status()["suspended"]
    sched.run(SimReq("a", prompt(8)))
    settle(cache)
    assert pages(nvme(tmp_path / "b")) == 0  # no old-weights KV under the new weights' keys
    cache.reset()
    assert not cache.store_status()["suspended"]

    cache, _, _ = server(nvme(tmp_path / "c"))
    cache.new_weights_epoch("w2", "v2", stale=True)
    assert cache.admin_detach()[0] and attach(cache, nvme(tmp_path / "d"))[0]
    cache.step()  # detach, then attach: no store in between
    assert cache.store_status()["suspended"]


def test_attach_turns_on_sglangs_prefetch_calls_without_a_prefetch_policy(tmp_path):
    """The store is built at the next step, so the handler cannot ask
    ``wants_storage_prefetch`` (False before the step with ``prefetch.policy: none``)."""
    from types import SimpleNamespace

    from hiradix.integration.sglang import store_admin
    from sglang.srt.managers.io_struct import AttachHiCacheStorageReqInput
    from sglang_sim import make_pools

    pools = make_pools(size=512)
    config = parse_config(
        {"host": {"size": "4MiB"}, "store": {"kind": "none"}, "prefetch": {"policy": "none"}}
    )
    cache = HiRadixCache(pools.params(1), config, model_id="test-model")
    scheduler = SimpleNamespace(tree_cache=cache, enable_hicache_storage=False, waiting_queue=[])
    body = json.dumps({"nvme": {"path": str(tmp_path / "b")}, "block_tokens": 16})
    request = AttachHiCacheStorageReqInput(
        hicache_storage_backend="nvme", hicache_storage_backend_extra_config_json=body
    )
    assert store_admin._attach(lambda *a: None, scheduler, request).success
    assert scheduler.enable_hicache_storage  # else SGLang never calls prefetch_from_storage


def test_attach_requests_that_cannot_be_read_or_used_are_refused_not_raised(tmp_path, monkeypatch):
    """Nothing a request holds escapes into SGLang's scheduler loop (on TP, a rank that
    raised before the ranks' vote would leave the others waiting in it), and a Redis
    password variable that is not set is an error now, as the MAC key's is."""
    from hiradix.integration.sglang import store_admin

    cache, _, _ = server(nvme(tmp_path / "a"))
    before = cache.storage
    ok, message = cache.admin_attach("memory", "[" * 100_000 + "]" * 100_000)
    assert not ok and "not valid JSON" in message

    def broken(*args, **kwargs):
        raise TypeError("something the parser did not expect")

    with monkeypatch.context() as patch:
        patch.setattr(store_admin, "parse_store_request", broken)
        ok, message = cache.admin_attach("memory", "{}")
    assert not ok and "did not expect" in message

    monkeypatch.delenv("HIRADIX_TEST_REDIS_PW", raising=False)
    section = {"redis": {"url": "redis://127.0.0.1:1", "password_env": "HIRADIX_TEST_REDIS_PW"}}
    ok, message = cache.admin_attach("redis", json.dumps(section))
    assert not ok and "HIRADIX_TEST_REDIS_PW" in message
    cache.step()
    assert cache.storage is before and cache.store_status()["switches"] == 0


class _HeldStore:
    """A store whose writes wait for ``put`` and whose scan waits for ``scan``."""

    def __init__(self, inner, put: threading.Event, scan: threading.Event):
        self.inner, self.put, self.scan_gate = inner, put, scan

    def put_many(self, *args, **kwargs):
        self.put.wait(30)
        return self.inner.put_many(*args, **kwargs)

    def scan(self, *args, **kwargs):
        self.scan_gate.wait(30)
        return self.inner.scan(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_clear_racing_writes_forgets_what_it_may_have_deleted(tmp_path):
    """A write running when the clear is applied stores its pages before the clear's scan
    deletes them, and its completion is applied after the clear forgot ``_written``: the
    pages must not stay recorded as written (write-through would skip them for good)."""
    section = nvme(tmp_path / "a")
    cache, pools, sched = server(section, wait="best_effort")
    put, scan = threading.Event(), threading.Event()
    cache.storage.store = _HeldStore(cache.storage.store, put, scan)
    first = prompt(5)
    sched.run(SimReq("a", first))
    for _ in range(3):
        cache.flush_pending_backups()
    assert cache.storage._queued_pages > 0  # writes held at the store
    assert cache.admin_clear()[0]
    cache.step()
    put.set()  # the writes store their pages; the clear's scan has not run yet
    writes = cache.engine._io_orders["write"]
    deadline = time.monotonic() + 30
    while not all(order.done for order in list(writes)[:-1]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scan.set()  # the clear deletes them
    settle(cache)
    assert pages(section) == 0
    assert cache.store_status()["pages_known_written"] == 0
    sched.run(SimReq("b", [*first, *prompt(6, 40)]))  # shares the first prompt's pages
    settle(cache)
    assert pages(section) >= 8  # written again, shared prefix included
    assert_clean(cache, pools)
