"""EAGLE's bigram keys reach L3 (issue 15 item 6): with EAGLE the tree keys each KV slot
by the bigram (token i, token i + 1), and write-through hashes those into the L3 page keys;
an arriving request's L3 lookup must hash the same bigrams (SGLang hands
``prefetch_from_storage`` raw token ids), or L3 never hits.

The host tier and the store stay refused with EAGLE at start (the draft model's KV pool is
not tiered: ``pool_support.py``, tests/test_identity_pools.py). These tests build the cache
without EAGLE and switch its key mode before the first request: the target pool's tiers
then run exactly as they would with EAGLE, so the keys are right when draft pools are."""

from __future__ import annotations

import itertools
import random

import pytest
from hiradix.integration.sglang.cache import HiRadixCache
from hiradix.integration.sglang.prefetch import tree_tokens
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang_sim import Scheduler, SimReq, make_pools

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")


def eagle_server(store):
    pools = make_pools(size=512)
    config = parse_config(
        {
            "host": {"size": "4MiB"},
            "store": {**store, "block_tokens": 16},
            "prefetch": {"wait": "wait_complete"},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id="eagle-test")
    cache.is_eagle = True  # see the module docstring
    return cache, Scheduler(cache, pools)


def settle(cache):
    for _ in range(3):
        cache.flush_pending_backups()
        cache.engine.drain()
    cache.flush_pending_backups()


def test_tree_tokens_are_the_trees_bigram_keys():
    raw = [5, 7, 11, 13, 17]
    assert list(tree_tokens(raw, False)) == raw
    packed = HiRadixCache._tokens
    cache = type("C", (), {"is_eagle": True, "page_size": 1})()
    assert tree_tokens(raw, True) == packed(cache, RadixKey(list(raw)))
    assert list(tree_tokens(raw, True)) == [(a << 32) | b for a, b in itertools.pairwise(raw)]
    assert len(tree_tokens([3], True)) == 0


def test_eagle_l3_lookup_finds_what_write_through_stored(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "64MiB"}}
    prompt = [random.Random(3).randrange(1000) for _ in range(100)]
    cache_a, sched_a = eagle_server(store)
    sched_a.run(SimReq("a", prompt))
    settle(cache_a)
    # 100 prompt + 4 output tokens: 103 bigrams, 6 full pages of 16
    assert cache_a.stats.counters["l2_to_l3_tokens"] == 96

    cache_b, sched_b = eagle_server(store)
    req = SimReq("b", prompt)
    hit = sched_b.run(req)  # verify_prefix checks every loaded KV value
    assert req.storage_hit == 96 and hit == 96  # the prompt's 99 bigrams: 6 pages
    assert cache_b.stats.counters["l3_to_l2_tokens"] == 96
    cache_b.tree.check_invariants()
