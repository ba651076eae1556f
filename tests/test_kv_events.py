"""KV events of HiRadixCache (``integration/sglang/kv_events.py``) in-process, on SGLang's
real CPU pools: the hashes SGLang's own ``RadixCache`` publishes for the same inserts, node
splits, flush, and every tier (GPU, CPU_PINNED, DISK / EXTERNAL) with real stores."""

from __future__ import annotations

import json
import random
from array import array

import pytest
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.disaggregation.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    StorageMedium,
)
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.events import KvEventLoraNames
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang_sim import Scheduler, SimReq, idle_total, make_pools
from sglang_sim import settle as settle_tiers

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")

DEVICE_ONLY = {"host": {"size": 0}, "store": {"kind": "none"}}
GPU, CPU, DISK, EXTERNAL = (
    StorageMedium.GPU,
    StorageMedium.CPU,
    StorageMedium.DISK,
    StorageMedium.EXTERNAL,
)
LORA_ID = "0123456789abcdef0123456789abcdef"  # what Req appends to extra_key (a uuid hex)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def params(pools, page_size, *, events=True, dynamo=False, lora_names=None):
    return CacheInitParams(
        disable=False,
        req_to_token_pool=pools.req_to_token,
        token_to_kv_pool_allocator=pools.allocator,
        page_size=page_size,
        enable_kv_cache_events=events,
        dynamo_kv_event_format=dynamo,
        kv_event_lora_names=lora_names if lora_names is not None else KvEventLoraNames(),
    )


def lora_table() -> KvEventLoraNames:
    table = KvEventLoraNames()
    table.register(lora_id=LORA_ID, lora_name="my-adapter")

    class Req:  # the two fields the table reads
        extra_key = "user" + LORA_ID
        lora_id = LORA_ID

    table.register(Req(), "my-adapter")
    return table


class Replay:
    """A router's view rebuilt from the events: the blocks each medium holds. Fails on an
    inconsistent stream (stored twice without a removal, removed without being held)."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {}
        self.stored: dict[str, dict[int, BlockStored]] = {}  # every store ever seen
        self.removed: dict[str, set[int]] = {}
        self.cleared = 0

    def feed(self, events: list) -> Replay:
        # through the wire format a subscriber decodes, like the publisher sends it
        import msgspec

        batch = KVEventBatch(ts=0.0, events=events)
        events = msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=KVEventBatch).events
        for event in events:
            if isinstance(event, AllBlocksCleared):
                self.held.clear()
                self.cleared += 1
                continue
            held = self.held.setdefault(event.medium, set())
            if isinstance(event, BlockStored):
                assert event.block_size * len(event.block_hashes) == len(event.token_ids)
                for i, block in enumerate(event.block_hashes):
                    assert block not in held, f"{block} stored twice in {event.medium}"
                    held.add(block)
                    self.stored.setdefault(event.medium, {})[block] = event
            else:
                for block in event.block_hashes:
                    assert block in held, f"{block} removed from {event.medium} but not held"
                    held.discard(block)
                    self.removed.setdefault(event.medium, set()).add(block)
        return self

    def ever(self, medium: str) -> set[int]:
        return set(self.stored.get(medium, {}))


def per_block(events: list) -> dict[int, tuple]:
    """block hash -> (parent hash, its tokens, salt, LoRA name) of every GPU store."""
    out = {}
    for event in events:
        if not isinstance(event, BlockStored):
            continue
        parent = event.parent_block_hash
        size = event.block_size
        for i, block in enumerate(event.block_hashes):
            tokens = tuple(event.token_ids[i * size : (i + 1) * size])
            out[block] = (parent, tokens, event.cache_salt, event.lora_name, event.medium)
            parent = block
    return out


def removed(events: list) -> list[int]:
    return [b for e in events if isinstance(e, BlockRemoved) for b in e.block_hashes]


KEYS = [  # (tokens, extra_key, cache_salt): shared prefixes split nodes on both sides
    (list(range(100, 164)), None, None),
    (list(range(100, 132)) + [7] * 16, None, None),
    (list(range(100, 116)) + [9] * 24, None, None),
    (list(range(100, 164)), None, "salt-a"),
    (list(range(100, 124)) + [5] * 8, None, "salt-a"),
    (list(range(100, 164)), "user" + LORA_ID, None),
    (list(range(100, 140)), "user" + LORA_ID, None),
    (list(range(100, 164)), "plain-extra-key", None),
    (list(range(200, 240)), "user" + LORA_ID, "salt-b"),
]


def insert_all(cache, pools, keys, page_size):
    for tokens, extra_key, salt in keys:
        n = len(tokens) // page_size * page_size
        key = RadixKey(array("q", tokens[:n]), extra_key=extra_key, cache_salt=salt)
        value = pools.allocator.alloc(n)
        assert value is not None
        result = cache.insert(InsertParams(key=key, value=value))
        # the caller frees its duplicate slots, as SGLang's callers do
        pools.allocator.free(value[: result.prefix_len])


@pytest.mark.parametrize("dynamo", [False, True], ids=["default", "dynamo"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_hashes_equal_sglang_radix_cache(page_size, dynamo):
    """The same inserts into SGLang's RadixCache and HiRadixCache publish the same GPU
    blocks: hash, parent, tokens, salt and LoRA name, in both formats; evicting all
    removes the same blocks."""
    pools_s, pools_h = (
        make_pools(size=2048, page_size=page_size),
        make_pools(size=2048, page_size=page_size),
    )
    sglang = RadixCache(params(pools_s, page_size, dynamo=dynamo, lora_names=lora_table()))
    ours = HiRadixCache(
        params(pools_h, page_size, dynamo=dynamo, lora_names=lora_table()),
        parse_config(DEVICE_ONLY),
    )
    insert_all(sglang, pools_s, KEYS, page_size)
    insert_all(ours, pools_h, KEYS, page_size)
    theirs_events, ours_events = sglang.take_events(), ours.take_events()
    assert isinstance(theirs_events[0], AllBlocksCleared)  # both announce a fresh cache
    assert isinstance(ours_events[0], AllBlocksCleared)
    theirs, mine = per_block(theirs_events), per_block(ours_events)
    assert len(mine) > 150 // page_size
    assert mine == theirs
    assert {name for *_, name, _ in mine.values()} >= {None, "my-adapter"}
    Replay().feed(ours_events)

    sglang.evict(EvictParams(num_tokens=10**6))
    ours.evict(EvictParams(num_tokens=10**6))
    # as sets: SGLang reports a page held by two nodes (an extra_key that is no LoRA's,
    # default format) twice; hiradix once, when its first copy comes and its last goes
    assert set(removed(ours.take_events())) == set(removed(sglang.take_events()))
    assert idle_total(ours, pools_h) == pools_h.size


def test_split_keeps_hashes_and_stream_stays_consistent():
    """Node splits (a shorter shared prefix inserted later, a lookup ending inside a node)
    never change a page's hash: what is removed is exactly what was stored."""
    pools = make_pools(size=1024)
    cache = HiRadixCache(params(pools, 1), parse_config(DEVICE_ONLY))
    replay = Replay()
    insert_all(cache, pools, [(list(range(64)), None, None)], 1)
    first = cache.take_events()
    replay.feed(first)
    before = per_block(first)
    for cut in (48, 17, 5, 33):  # each splits a node
        insert_all(cache, pools, [(list(range(cut)) + [999 - cut] * 8, None, None)], 1)
        replay.feed(cache.take_events())
    assert len(list(cache.tree.iter_nodes())) > 6
    # the same 64 tokens again: nothing new, no hash changed
    insert_all(cache, pools, [(list(range(64)), None, None)], 1)
    assert [e for e in cache.take_events() if isinstance(e, BlockStored)] == []
    cache.evict(EvictParams(num_tokens=10**6))
    replay.feed(cache.take_events())
    assert replay.held[GPU] == set()
    assert set(before) <= replay.removed[GPU]
    assert replay.removed[GPU] == replay.ever(GPU)


def test_flush_clears_and_events_restart():
    pools = make_pools(size=512)
    cache = HiRadixCache(params(pools, 1), parse_config(DEVICE_ONLY))
    sched = Scheduler(cache, pools)
    replay = Replay().feed(cache.take_events())
    sched.run(SimReq("a", list(range(40))))
    replay.feed(cache.take_events())
    assert len(replay.held[GPU]) == 44  # prompt + 4 outputs
    cache.reset()
    pools.req_to_token.clear()
    pools.allocator.clear()
    events = cache.take_events()
    assert [type(e) for e in events] == [AllBlocksCleared]
    replay.feed(events)
    sched.run(SimReq("b", list(range(40))))  # stored again after the flush
    replay.feed(cache.take_events())
    assert len(replay.held[GPU]) == 44 and replay.cleared == 2


def test_no_events_unless_asked_for():
    """Ranks other than the publisher (SGLang sets the flag only on it) record nothing."""
    pools = make_pools(size=256)
    cache = HiRadixCache(params(pools, 1, events=False), parse_config(DEVICE_ONLY))
    Scheduler(cache, pools).run(SimReq("a", list(range(40))))
    assert cache.take_events() == [] and cache.tree.listener is None


# ---------------------------------------------------------------------- every tier


def store_config(kind, tmp_path, redis_url):
    if kind == "nvme":
        return {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "64MiB"}}
    return {"kind": "redis", "redis": {"url": redis_url, "key_prefix": f"ev{random.random()}:"}}


def tiered(store, *, size=160, clock=None, **extra):
    pools = make_pools(size=size)
    config = parse_config(
        {
            "host": {"size": "64KiB"},
            "store": {**store, "block_tokens": 16},
            "prefetch": {"wait": "wait_complete"},
            **extra,
        }
    )
    kwargs = {"clock": clock} if clock is not None else {}
    cache = HiRadixCache(params(pools, 1), config, model_id="test-model", **kwargs)
    return cache, pools, Scheduler(cache, pools)


def settle(cache, replay):
    settle_tiers(cache)
    replay.feed(cache.take_events())


@pytest.mark.parametrize("kind", ["nvme", "redis"])
def test_every_tier_reports_and_a_second_server_finds_l3(kind, tmp_path, redis_url):
    """A small L1 over a host tier and a store: pages are reported arriving in
    CPU_PINNED and DISK / EXTERNAL and leaving GPU, consistently; a second cache over the
    same store reports the pages it found there with the same hashes."""
    medium = DISK if kind == "nvme" else EXTERNAL
    store = store_config(kind, tmp_path, redis_url)
    cache, pools, sched = tiered(store)
    replay = Replay()
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(64)] for _ in range(6)]
    for i, prompt in enumerate(prompts):
        sched.run(SimReq(f"a{i}", prompt))
        settle(cache, replay)
    assert idle_total(cache, pools) == pools.size
    gpu, cpu, l3 = replay.ever(GPU), replay.ever(CPU), replay.ever(medium)
    assert replay.removed.get(GPU), "a 160-token L1 evicted nothing"
    assert cpu and l3 and l3 <= gpu and cpu <= gpu
    # what a router holds now is what the tiers hold now
    assert len(replay.held[GPU]) == cache.tree.l1_total()
    assert len(replay.held[CPU]) == cache.tree.l2_tokens
    for block in l3:  # a store page is reported with its tokens and chain
        assert replay.stored[medium][block].medium == medium

    # a second server over the same store finds the first prompt's pages there
    other, other_pools, other_sched = tiered(store)
    seen = Replay().feed(other.take_events())
    req = SimReq("b", prompts[0])
    other_sched.run(req)
    settle(other, seen)
    assert req.storage_hit == 64
    # hashed from the looked-up tokens, they are the ones the first server hashed from
    # its tree when it wrote them
    found = seen.ever(medium)
    assert len(found) == 64 and found <= l3
    assert found <= seen.ever(CPU) and found <= seen.ever(GPU)  # fetched, loaded
    assert idle_total(other, other_pools) == other_pools.size


def test_expiry_and_store_loss_are_reported(tmp_path):
    """Device and host TTL expiry remove GPU and CPU_PINNED blocks; a lookup that finds a
    page gone from the store, and the store's own TTL, remove DISK blocks."""
    clock = FakeClock()
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "64MiB"}}
    cache, pools, sched = tiered(
        store,
        size=512,
        clock=clock,
        ttl={"device": "10s", "host": "20s", "store": "1h"},
    )
    replay = Replay()
    prompt = list(range(300, 364))
    sched.run(SimReq("a", prompt))
    settle(cache, replay)
    assert len(replay.held[GPU]) == 68 and len(replay.held[DISK]) == 64
    clock.t += 30  # past the device and host TTLs, not the store's
    for _ in range(4):
        settle(cache, replay)
    assert replay.held.get(GPU, set()) == set() and replay.held.get(CPU, set()) == set()
    assert len(replay.held[DISK]) == 64

    for path in (tmp_path / "pages").rglob("*"):  # the store lost every page
        if path.is_file():
            path.unlink()
    sched.run(SimReq("b", prompt))  # looks L3 up: the first page is gone
    settle(cache, replay)
    # the lookup stops at the first missing store page: its 16 blocks are removed, then
    # written again with the recomputed KV; the others are not known to be gone
    assert len(replay.removed[DISK]) == 16
    assert len(replay.held[DISK]) == 64
    clock.t += 3601  # the store's TTL: nobody wrote or read them since
    settle(cache, replay)
    assert replay.held[DISK] == set()
    assert idle_total(cache, pools) == pools.size


def test_store_cleared_switched_or_detached_takes_its_blocks_back(tmp_path):
    """An operator's clear, a switch to another store and a detach (``store_admin.py``):
    the blocks reported for the old store are removed; the new store's are its own."""
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "a"), "size": "64MiB"}}
    cache, pools, sched = tiered(store, size=512)
    replay = Replay()
    sched.run(SimReq("a", list(range(500, 564))))
    settle(cache, replay)
    assert len(replay.held[DISK]) == 64
    assert cache.admin_clear()[0]
    settle(cache, replay)
    assert replay.held[DISK] == set() and len(replay.removed[DISK]) == 64

    sched.run(SimReq("b", list(range(600, 664))))  # written to the cleared store
    settle(cache, replay)
    assert len(replay.held[DISK]) == 64
    other = json.dumps({"nvme": {"path": str(tmp_path / "b"), "size": "64MiB"}})
    assert cache.admin_attach("nvme", other)[0]
    settle(cache, replay)
    assert replay.held[DISK] == set()  # the first store is no longer read
    sched.run(SimReq("c", list(range(700, 764))))
    settle(cache, replay)
    assert len(replay.held[DISK]) == 64  # the new store's pages
    assert cache.admin_detach()[0]
    settle(cache, replay)
    assert replay.held[DISK] == set()
    assert idle_total(cache, pools) == pools.size
