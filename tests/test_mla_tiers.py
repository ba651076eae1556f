"""MLA pools through every tier (issue 15 item 4), over SGLang's real ``MLATokenToKVPool``
on CPU: L1 -> L2 -> L3 (NVMe files, a real redis-server) and back, every byte of every
latent row checked (and verify mode on, tests/conftest.py); the page header records the
latent layout; two TP ranks on one store, where only the writer rank writes and both
read; TP=1 and TP=2 servers of one model share pages."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from hiradix.integration.sglang.cache import HiRadixCache
from hiradix.integration.sglang.factory import model_identity, store_shard
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang_sim import (
    Scheduler,
    SimReq,
    idle_total,
    make_mla_pools,
    make_pools,
    run_ranks,
    settle,
    write_then_read,
)
from test_agreed_step import Collective, drive

from hiradix.codec import PageMeta, decode_page, inspect_page
from hiradix.config import parse_config
from hiradix.errors import CorruptPage
from hiradix.storage_tier import LAYOUT, MLA_LAYOUT

pytestmark = pytest.mark.usefixtures("sglang_context")

BLOCK = 16
LORA, ROPE, LAYERS = 32, 8, 2  # latent rows of 40 values (DeepSeek: 512 + 64)


class LatentScheduler(Scheduler):
    """The sim scheduler with a 'forward' that writes every byte of each slot's latent row
    (bf16 seen as bytes: all 256 byte values occur, NaN and infinity encodings included),
    derived from the token prefix, and a check that compares every byte."""

    verified = 0

    def pattern(self, codes: list[int], layer: int) -> torch.Tensor:
        width = self.pools.kv.kv_buffer[layer].view(torch.uint8).shape[2]
        base = torch.tensor(codes, dtype=torch.int64)[:, None]
        j = torch.arange(width, dtype=torch.int64)[None, :]
        raw = base * 131 + j * 37 + layer * 11 + (base >> 8) * (j + 1) + (base >> 16) * (3 * j + 1)
        return (raw % 256).to(torch.uint8).reshape(len(codes), 1, width)

    def write_kv(self, loc: torch.Tensor, codes: list[int]) -> None:
        for layer, buf in enumerate(self.pools.kv.kv_buffer):
            buf.view(torch.uint8)[loc] = self.pattern(codes, layer)

    def check_kv(self, loc: torch.Tensor, want: list[int], rid: str) -> None:
        for layer, buf in enumerate(self.pools.kv.kv_buffer):
            got = buf.view(torch.uint8)[loc]
            assert torch.equal(got, self.pattern(want, layer)), f"wrong latent KV for {rid}"
        self.verified += len(loc)


def mla_server(store, *, size=256, host="64KiB", model_id="mla-test", tp_rank=None, **extra):
    pools = make_mla_pools(
        size=size, max_reqs=8, ctx=1024, kv_lora_rank=LORA, qk_rope_head_dim=ROPE, layer_num=LAYERS
    )
    config = parse_config(
        {
            "host": {"size": host},
            "store": {**store, "block_tokens": BLOCK},
            "prefetch": {"wait": "wait_complete"},
            **extra,
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id=model_id, tp_rank=tp_rank)
    return cache, pools, LatentScheduler(cache, pools)


def prompts_for(seed: int, count: int = 6, length: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(length)] for _ in range(count)]


def test_mla_pool_is_tiered_with_one_latent_buffer(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p"), "size": "8MiB"}}
    cache, pools, _ = mla_server(store)
    slab, storage = cache.slab, cache.storage
    assert slab is not None and storage is not None
    assert len(slab.buffers) == 1 and slab.v is None
    assert slab.k.shape[0] == LAYERS and slab.k.shape[2:] == (1, LORA + ROPE)
    assert slab.k.dtype == pools.kv.kv_buffer[0].dtype
    assert slab.bytes_per_token == LAYERS * (LORA + ROPE) * 2  # bf16, no V
    assert storage.layout == MLA_LAYOUT and storage.page_shape == (1, LAYERS, BLOCK, 1, 40)
    assert cache.kv_replicated and storage.writer  # TP=1: this rank writes


def test_mla_is_bit_exact_through_every_tier(store_cfg):
    """Six prompts through a 256-token L1 and a 409-token host tier: pages go down to L2
    and L3, come back from L2 to L1; a second server on the same store then serves every
    full page from L3. Every latent byte that comes back is compared."""
    cache, pools, sched = mla_server(store_cfg)
    prompts = prompts_for(4)
    write_then_read(sched, cache, prompts)
    counters = cache.stats.counters
    assert counters["l2_to_l1_tokens"] > 0 and counters["l2_to_l3_tokens"] > 0, counters
    assert sched.verified > 0
    assert idle_total(cache, pools) == pools.size
    cache.tree.check_invariants()

    other, _, other_sched = mla_server(store_cfg)
    for i, prompt in enumerate(prompts):
        req = SimReq(f"o{i}", prompt)
        other_sched.run(req)
        assert req.storage_hit == 96  # 6 pages of 16, every byte checked by check_kv
    assert other_sched.verified >= 6 * 96
    assert other.stats.counters["l3_to_l2_tokens"] == 6 * 96
    for c in (cache, other):  # verify mode (fatal in tests) saw no mismatch
        assert c.verifier is not None and c.verifier.mismatches == 0
    assert cache.verifier.checked > 0


def test_mla_page_header_records_the_latent_layout(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p"), "size": "8MiB"}}
    cache, _, sched = mla_server(store)
    sched.run(SimReq("a", prompts_for(5, count=1)[0]))
    settle(cache)
    storage = cache.storage
    key = next(iter(storage._written))
    namespace = (None, None)
    (blob,) = storage.store.get_many([storage._store_key(namespace, key)])
    assert blob is not None
    meta = inspect_page(blob)
    assert meta.layout == MLA_LAYOUT and meta.shape == (1, LAYERS, BLOCK, 1, LORA + ROPE)
    assert meta.dtype == "bfloat16"
    assert len(decode_page(blob, storage._meta(namespace, key))) == meta.nbytes
    # read as MHA K and V of the same bytes (two halves of 20 values): refused
    as_mha = PageMeta(
        "bfloat16", LAYOUT, (2, LAYERS, BLOCK, 1, 20), storage.ns_digest(namespace), key
    )
    with pytest.raises(CorruptPage):
        decode_page(blob, as_mha)

    # MHA pages keep their format: (2, layers, block, heads, dim), the same layout string
    pools = make_pools(size=128)
    mha = HiRadixCache(pools.params(1), parse_config({"host": {"size": "1MiB"}, "store": store}))
    assert mha.storage.layout == LAYOUT == "kv_layer_token_head_dim"
    assert mha.storage.page_shape[0] == 2 and not mha.kv_replicated and mha.storage.writer


def test_mla_pages_round_trip_compressed(tmp_path):
    """zstd over byte planes (the codec path frames a stacked copy of the rows)."""
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p"), "size": "8MiB"}}
    zstd = {"compression": {"codec": "zstd"}}
    cache, _, sched = mla_server(store, **zstd)
    assert cache.storage.codec_name == "zstd"
    prompt = prompts_for(12, count=1, length=100)[0]
    sched.run(SimReq("a", prompt))
    settle(cache)
    assert cache.stats.counters["l2_to_l3_tokens"] == 96
    _, _, other_sched = mla_server(store, **zstd)
    req = SimReq("b", prompt)
    other_sched.run(req)
    assert req.storage_hit == 96 and other_sched.verified >= 96


class CountingStore:
    """A real store, with the pages each rank put counted (the test's probe)."""

    def __init__(self, inner):
        self.inner = inner
        self.put_pages = 0

    def put_many(self, items, ttl):
        self.put_pages += len(items)
        return self.inner.put_many(items, ttl)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def two_ranks(store_by_rank, prompts, collective):
    """Two TP ranks over MLA pools, each on its own thread, joined by the in-process MIN
    all-reduce; the same scheduler calls on both: a first pass, every tier but L3 emptied,
    a second pass."""
    ranks = []
    for rank in range(2):
        cache, _, sched = mla_server(store_by_rank[rank], size=384, host="96KiB", tp_rank=rank)
        cache._tp_size = lambda: 2  # type: ignore[method-assign]
        cache.now = 0.0
        cache._reduce_min = lambda v, r=rank: collective.reduce_min(r, v)  # type: ignore[method-assign]
        cache.storage.store = CountingStore(cache.storage.store)
        ranks.append((cache, sched))
    states: list[list] = [[], []]

    def run(rank):
        cache, sched = ranks[rank]
        drive(cache, sched, states[rank], prompts)

    errors = run_ranks(run, 2, on_error=collective.barrier.abort)
    assert not errors, errors
    for step, (a, b) in enumerate(zip(*states, strict=True)):
        assert a == b, f"the ranks' trees differ after step {step}"
    return ranks


def test_two_ranks_share_one_store_only_the_writer_writes_both_read(tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p"), "size": "64MiB"}}
    system = prompts_for(7, count=1, length=48)[0]
    prompts = [system + p for p in prompts_for(8, count=6, length=40)]
    ranks = two_ranks([store, store], prompts, Collective(2))
    (writer, writer_sched), (reader, reader_sched) = ranks
    assert writer.storage.writer and not reader.storage.writer
    assert writer.storage.store.put_pages > 0
    assert reader.storage.store.put_pages == 0  # never wrote a page
    read = [c.stats.counters["l3_to_l2_tokens"] for c, _ in ranks]
    assert read[0] == read[1] > 0  # both read the writer's pages (agreed)
    assert writer.storage._written == reader.storage._written
    assert writer_sched.verified > 0 and reader_sched.verified == writer_sched.verified
    for cache, _ in ranks:
        cache.tree.check_invariants()


def test_a_write_the_writer_was_refused_is_never_counted_on(tmp_path):
    """The writer's store refuses every page (a store smaller than a page: the NVMe store
    returns False for it); the other rank, which writes nothing, must not record the pages
    as stored either: no rank looks for them as its own, both recompute."""
    path = str(tmp_path / "p")
    full = {"kind": "nvme", "nvme": {"path": path, "size": "1KiB"}}  # a page is ~5 KiB
    roomy = {"kind": "nvme", "nvme": {"path": path, "size": "64MiB"}}
    prompts = prompts_for(9, count=4, length=64)
    ranks = two_ranks([full, roomy], prompts, Collective(2))
    (writer, _), (reader, _) = ranks
    assert writer.storage.store.put_pages > 0 and reader.storage.store.put_pages == 0
    for cache, _ in ranks:
        assert not cache.storage._written
        assert cache.stats.counters["l2_to_l3_tokens"] == 0
        assert cache.stats.counters["l3_to_l2_tokens"] == 0
    assert reader.stats.counters["l3_dropped_writes"] > 0  # counted as dropped, agreed


def mla_ctx(tp_rank, tp_size, *, mla=True):
    if mla:
        kv = make_mla_pools(size=64, kv_lora_rank=LORA, qk_rope_head_dim=ROPE).kv
    else:
        kv = MHATokenToKVPool(
            64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=16, layer_num=2,
            device="cpu", enable_memory_saver=False,
        )  # fmt: skip
    allocator = SimpleNamespace(get_kvcache=lambda: kv)
    server_args = SimpleNamespace(
        model_path="deepseek-tiny", load_format="dummy", weight_version="default",
        kv_cache_dtype="auto", quantization=None, quantization_param_path=None,
        attention_backend="torch_native", prefill_attention_backend=None,
        decode_attention_backend=None, revision=None, download_dir=None,
    )  # fmt: skip
    model_config = SimpleNamespace(
        hf_config=None, model_path="deepseek-tiny", dtype=torch.bfloat16, quantization=None
    )
    params = SimpleNamespace(token_to_kv_pool_allocator=allocator, page_size=1)
    return SimpleNamespace(
        server_args=server_args,
        model_config=model_config,
        params=params,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def test_tp1_and_tp2_mla_identities_share_pages(tmp_path):
    keys = {model_identity(mla_ctx(r, n)).key() for r, n in [(0, 1), (0, 2), (1, 2)]}
    assert len(keys) == 1 and "shard=tp*" in next(iter(keys))
    mha = {model_identity(mla_ctx(r, n, mla=False)).key() for r, n in [(0, 1), (0, 2), (1, 2)]}
    assert len(mha) == 3  # sharded KV: a shard per TP rank
    # every TP rank opens the same NVMe directory (no per-rank split without PP)
    assert {store_shard(mla_ctx(r, 2), replicated=True) for r in range(2)} == {(0, 1)}
    assert store_shard(mla_ctx(1, 2)) == (1, 2)

    # a TP=2 server's writer rank stores pages; a TP=1 server of the model reads them all
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "p"), "size": "64MiB"}}
    tp2 = model_identity(mla_ctx(0, 2))
    writer, _, writer_sched = mla_server(store, model_id=tp2, tp_rank=0)
    prompt = prompts_for(11, count=1, length=100)[0]
    writer_sched.run(SimReq("a", prompt))
    settle(writer)
    assert writer.stats.counters["l2_to_l3_tokens"] == 96
    tp1 = model_identity(mla_ctx(0, 1))
    _, _, reader_sched = mla_server(store, model_id=tp1)
    req = SimReq("b", prompt)
    reader_sched.run(req)
    assert req.storage_hit == 96 and reader_sched.verified >= 96
    # an MHA identity of another TP rank does not see them
    _, _, other_sched = mla_server(store, model_id=model_identity(mla_ctx(1, 2, mla=False)))
    assert other_sched.run(SimReq("c", prompt)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mla_copy_path_is_bit_exact_on_cuda():
    """The CUDA twin over MLA's one latent buffer per layer (DeepSeek's 576-wide rows, every
    bf16 bit pattern): device -> pinned host straight (contiguous host slots) and through
    staging (scattered ones), then back into other device slots, per-layer events."""
    from hiradix.backends.host_slab import HostSlab

    from hiradix.kv_copy import CudaKvCopier, LayerEvents

    layers, slots, width = 4, 4096, 512 + 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = [
        torch.randint(
            0, 256, (slots, 1, width * 2), device="cuda", dtype=torch.uint8, generator=gen
        ).view(torch.bfloat16)
        for _ in range(layers)
    ]
    slab = HostSlab(
        2048, layers=layers, heads=1, head_dim=width, dtype=torch.bfloat16, page_size=16,
        pin_memory=True, parts=1,
    )  # fmt: skip
    copier = CudaKvCopier(kv, None, slab)
    perm = torch.randperm(slots, device="cuda")
    for host_idx in (slab.alloc(512), slab.alloc(512)[torch.randperm(512)]):  # straight, staged
        device_idx, target = perm[:512], perm[512:1024]
        want = [t[device_idx].view(torch.uint8).cpu() for t in kv]
        copier.device_to_host(device_idx, host_idx).wait()
        for layer in range(layers):
            assert torch.equal(slab.k[layer][host_idx].view(torch.uint8), want[layer])
        events = copier.host_to_device(host_idx, target)
        assert isinstance(events, LayerEvents) and len(events.events) == layers
        events.wait()
        for layer in range(layers):
            assert torch.equal(kv[layer][target].view(torch.uint8).cpu(), want[layer])
        perm = perm.roll(1024)
