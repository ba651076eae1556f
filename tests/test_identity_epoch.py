"""Weight updates start a new weights epoch (integration/sglang/weight_epochs.py,
``HiRadixCache.new_weights_epoch``), in-process over SGLang's real pools and a real NVMe
store: pages of the old weights are never read again, a cache not flushed with the update
keeps away from L3 until it is, and each SGLang handler moves the epoch as it should."""

from __future__ import annotations

import pkgutil
from types import SimpleNamespace

import pytest
import sglang_sim
from hiradix.integration.sglang import weight_epochs
from hiradix.integration.sglang.cache import HiRadixCache
from sglang_sim import Scheduler, SimReq, idle_total, make_pools, settle

from hiradix.config import parse_config
from hiradix.identity import ModelIdentity

pytestmark = pytest.mark.usefixtures("sglang_context")

IDENTITY = ModelIdentity(
    architecture="LlamaForCausalLM",
    config="c0",
    dtype="float32",
    weights="files:aaaa",
    weight_version="default",
    quantization="none",
    kv="auto/float32/store=float32",
    layout="MHATokenToKVPool/k(1, 2)v(1, 2)/L0-1",
    page_size=1,
    shard="tp0of1",
    numerics="attn=torch_native",
)
PROMPT = list(range(300, 396))  # 96 tokens: 6 pages of 16


@pytest.fixture
def weights(monkeypatch):
    """The simulated forward's KV depends on the served weights (a salt in its code)."""
    state = {"salt": "A"}
    real = sglang_sim.prefix_code

    def coded(tokens, ns=""):
        return real(tokens, f"{ns}/{state['salt']}")

    monkeypatch.setattr(sglang_sim, "prefix_code", coded)
    return state


def server(tmp_path, identity=IDENTITY):
    pools = make_pools(size=512)
    config = parse_config(
        {
            "host": {"size": "4MiB"},
            "store": {
                "kind": "nvme",
                "nvme": {"path": str(tmp_path / "pages")},
                "block_tokens": 16,
            },
            "prefetch": {"wait": "wait_complete"},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id=identity)
    return cache, pools, Scheduler(cache, pools)


def flush(cache, pools):
    """What SGLang's ``Scheduler.flush_cache`` does to the cache and the pools."""
    cache.reset()
    pools.req_to_token.clear()
    pools.allocator.clear()


def test_a_new_epoch_never_reads_the_old_weights_pages(tmp_path, weights):
    cache, pools, sched = server(tmp_path)
    sched.run(SimReq("a1", PROMPT))
    settle(cache)
    assert cache.stats.counters["l2_to_l3_tokens"] == 96
    # another server on the same weights reads them: the store works
    _other, _, other_sched = server(tmp_path)
    req = SimReq("a2", PROMPT)
    other_sched.run(req)
    assert req.storage_hit == 96

    # update to weights B, flushed as SGLang's handler does
    weights["salt"] = "B"
    flush(cache, pools)
    cache.new_weights_epoch("files:bbbb", "default", stale=False)
    assert cache.identity.weights == "files:bbbb" and not cache.storage._written
    req = SimReq("b1", PROMPT)
    assert sched.run(req) == 0 and req.storage_hit == 0  # verify_prefix: B's KV or nothing
    settle(cache)
    assert cache.stats.counters["l2_to_l3_tokens"] == 2 * 96  # rewritten under B
    assert idle_total(cache, pools) == pools.size

    # a server started on B reads B's pages; one on A still A's, never B's
    _fresh_b, _, sched_b = server(tmp_path, IDENTITY.with_weights("files:bbbb", "default"))
    req = SimReq("b2", PROMPT)
    sched_b.run(req)
    assert req.storage_hit == 96
    weights["salt"] = "A"
    _fresh_a, _, sched_a = server(tmp_path)
    req = SimReq("a3", PROMPT)
    sched_a.run(req)
    assert req.storage_hit == 96


def test_an_update_without_a_flush_keeps_l3_off_until_the_next_flush(tmp_path, weights):
    cache, pools, sched = server(tmp_path)
    sched.run(SimReq("a1", PROMPT))
    settle(cache)
    cache.new_weights_epoch("nonce:1", "default", stale=True)  # requests were running
    assert cache.storage.suspended
    written = cache.stats.counters["l2_to_l3_tokens"]
    other = list(range(600, 664))
    sched.run(SimReq("x", other))  # still the old weights' tree, as SGLang's own cache
    settle(cache)
    assert cache.stats.counters["l2_to_l3_tokens"] == written  # nothing written
    weights["salt"] = "B"
    flush(cache, pools)
    assert not cache.storage.suspended
    req = SimReq("b", PROMPT)
    assert sched.run(req) == 0 and req.storage_hit == 0
    settle(cache)
    assert cache.stats.counters["l2_to_l3_tokens"] == written + 96


class FakeManager:
    """The slice of SGLang's ``SchedulerWeightUpdaterManager`` the hooks read."""

    def __init__(self, cache, pools):
        self.scheduler = SimpleNamespace(
            tree_cache=cache,
            server_args=SimpleNamespace(load_format="auto", download_dir=None, weight_version="v0"),
        )
        self.pools = pools
        self._session = None


def _handler(flushes: bool, success: bool = True):
    def original(manager, recv_req):
        if flushes:
            flush(manager.scheduler.tree_cache, manager.pools)
        return SimpleNamespace(success=success)

    return original


def test_update_from_disk_fingerprints_the_new_files(tmp_path, tiny_model):
    cache, pools, _ = server(tmp_path)
    manager = FakeManager(cache, pools)
    req = SimpleNamespace(model_path=str(tiny_model), load_format=None)
    weight_epochs._from_disk(_handler(flushes=True), manager, req)
    from hiradix.identity import weights_fingerprint

    assert cache.identity.weights == f"files:{weights_fingerprint(str(tiny_model))}"
    assert not cache.storage.suspended
    before = cache.model_id
    weight_epochs._from_disk(_handler(flushes=False), manager, req)  # requests were running
    assert cache.storage.suspended and cache.model_id == before  # same files, same id
    weight_epochs._from_disk(_handler(flushes=True, success=False), manager, req)
    assert cache.identity.weights.startswith("nonce:") and not cache.storage.suspended


def test_session_updates_and_out_of_band_writes_start_epochs(tmp_path):
    cache, pools, _ = server(tmp_path)
    manager = FakeManager(cache, pools)
    req = SimpleNamespace()
    weight_epochs._in_session(_handler(flushes=True), manager, req)  # refused: no session
    assert cache.identity == IDENTITY
    manager._session = SimpleNamespace(loaded_weights=False)
    weight_epochs._in_session(_handler(flushes=True), manager, req)
    first = cache.identity.weights
    assert first.startswith("nonce:")
    weight_epochs._from_ipc(_handler(flushes=True), manager, req)
    assert cache.identity.weights not in (first, IDENTITY.weights)
    ipc = cache.identity.weights
    manager._session = SimpleNamespace(loaded_weights=True)  # loaded through SGLang
    weight_epochs._end_session(_handler(flushes=False), manager, req)
    assert cache.identity.weights == ipc
    manager._session = SimpleNamespace(loaded_weights=False)  # P2P / RDMA
    weight_epochs._end_session(_handler(flushes=False), manager, req)
    assert cache.identity.weights != ipc and cache.storage.suspended
    assert cache.weights_epoch == 3


def test_a_new_weight_version_relabels_without_dropping(tmp_path, monkeypatch):
    cache, _pools, sched = server(tmp_path)
    sched.run(SimReq("a1", PROMPT))
    settle(cache)
    scheduler = SimpleNamespace(tree_cache=cache, server_args=SimpleNamespace(weight_version="v9"))
    from hiradix.integration.sglang import factory

    monkeypatch.setattr(factory, "current_weight_version", lambda args: args.weight_version)
    weight_epochs._version(lambda s, r: None, scheduler, SimpleNamespace())
    assert cache.identity.weight_version == "v9" and cache.identity.weights == IDENTITY.weights
    assert cache.tree.l1_total() > 0 and not cache.storage.suspended


def test_hook_targets_exist_in_this_sglang():
    for target in weight_epochs.HOOKS:
        pkgutil.resolve_name(target)
