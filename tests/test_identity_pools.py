"""Every KV pool is tiered exactly or refused at start (integration/sglang/pool_support.py),
over SGLang's real pools on CPU; fp8 pools (float8_e4m3fn / float8_e5m2 stored as uint8)
come back bit-exact through L2 and L3."""

from __future__ import annotations

import random

import pytest
import torch
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    MHATokenToKVPoolMXFP8,
    MLATokenToKVPoolFP4,
    ReqToTokenPool,
)
from sglang_sim import (
    Pools,
    Scheduler,
    SimReq,
    idle_total,
    prefix_code,
    write_then_read,
)

from hiradix.config import parse_config

pytestmark = pytest.mark.usefixtures("sglang_context")

TIERED = {"host": {"size": "1MiB"}, "store": {"kind": "none"}}
L1_ONLY = {"host": {"size": 0}, "store": {"kind": "none"}}


def params(kv, page_size=1, size=64, **kw) -> CacheInitParams:
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(size, kv.dtype, "cpu", kv, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(
            size, page_size, kv.dtype, "cpu", kv, need_sort=False
        )
    return CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(4, 512, "cpu", enable_memory_saver=False),
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
        **kw,
    )


def mha(dtype=torch.float32, size=64, cls=MHATokenToKVPool, **kw):
    return cls(
        size, page_size=kw.pop("page_size", 1), dtype=dtype, head_num=2,
        head_dim=kw.pop("head_dim", 8),
        layer_num=2, device="cpu", enable_memory_saver=False, **kw,
    )  # fmt: skip


def test_mla_kin_with_other_rows_is_refused_and_runs_l1_only_without():
    """Plain MLATokenToKVPool is tiered (tests/test_mla_tiers.py); its FP4 kin (packed rows
    and per-slot scales) is refused at start, naming the pool."""
    kv = MLATokenToKVPoolFP4(
        64, page_size=1, dtype=torch.float8_e4m3fn, kv_lora_rank=32, qk_rope_head_dim=8,
        layer_num=2, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"KV pool MLATokenToKVPoolFP4: it is an MLA pool") as err:
        HiRadixCache(params(kv), parse_config(TIERED))
    message = str(err.value)
    assert (
        "MLATokenToKVPool (one latent" in message and "host.size: 0 and store.kind: none" in message
    )
    store_only = {"host": {"size": 0}, "store": {"kind": "memory"}}
    with pytest.raises(ValueError, match="MLATokenToKVPoolFP4"):
        HiRadixCache(params(kv), parse_config(store_only))
    cache = HiRadixCache(params(kv), parse_config(L1_ONLY))
    assert cache.slab is None and cache.storage is None


def test_scaled_pools_are_refused():
    kv = mha(torch.float8_e4m3fn, size=64, cls=MHATokenToKVPoolMXFP8, page_size=32, head_dim=32)
    assert kv.k_scale_buffer is not None
    with pytest.raises(ValueError, match=r"MHATokenToKVPoolMXFP8: it is a scaled KV pool"):
        HiRadixCache(params(kv, page_size=32), parse_config(TIERED))
    HiRadixCache(params(kv, page_size=32), parse_config(L1_ONLY))  # L1 only: fine

    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import (
        get_kv_cache_quant_method,
    )

    quantised = mha(torch.float8_e4m3fn, quant_method=get_kv_cache_quant_method("cpu_fp8_e4m3"))
    with pytest.raises(ValueError, match="quantised by the cpu_fp8_e4m3 KV cache method"):
        HiRadixCache(params(quantised), parse_config(TIERED))


def test_other_layouts_are_refused():
    class Interleaved(MHATokenToKVPool):
        pass

    with pytest.raises(ValueError, match=r"KV pool Interleaved: its buffer layout"):
        HiRadixCache(params(mha(cls=Interleaved)), parse_config(TIERED))


def test_eagle_with_tiers_is_refused():
    with pytest.raises(ValueError, match="not supported with EAGLE"):
        HiRadixCache(params(mha(), is_eagle=True), parse_config(TIERED))
    cache = HiRadixCache(params(mha(), is_eagle=True), parse_config(L1_ONLY))
    assert cache.slab is None


class ByteScheduler(Scheduler):
    """The sim scheduler with a 'forward' that writes every byte of each slot's K and V
    (all 256 byte values occur: fp8 NaN and infinity encodings included), derived from the
    token prefix, and a check that compares every byte."""

    def pattern(self, codes: list[int], layer: int, which: int) -> torch.Tensor:
        kv = self.pools.kv
        width = kv.head_num * kv.head_dim
        base = torch.tensor(codes, dtype=torch.int64)[:, None]
        j = torch.arange(width, dtype=torch.int64)[None, :]
        raw = (base * 131 + j * 37 + layer * 11 + which * 101) % 256
        return raw.to(torch.uint8).reshape(len(codes), kv.head_num, kv.head_dim)

    def admit(self, req: SimReq, new_tokens: int = 4) -> None:
        self.match(req)
        req.lock = self.cache.lock(req.last_node)
        assert self.pools.req_to_token.alloc([req]) is not None
        prefix = self.cache.prefix_device_indices(req)
        total = len(req.origin_input_ids) + new_tokens
        need = total - req.prefix_len
        avail = self.pools.allocator.available_size()
        if avail < need:
            self.cache.evict_for_alloc(EvictParams(num_tokens=need - avail))
        new = self.pools.allocator.alloc(need)
        assert new is not None
        row = self.pools.req_to_token.req_to_token[req.kv.req_pool_idx]
        row[: req.prefix_len] = prefix.to(row.dtype)
        row[req.prefix_len : total] = new.to(row.dtype)
        req.kv.kv_allocated_len = total
        self.verify_prefix(req)
        req.output_ids = [(t * 7 + 3) % 1000 for t in req.origin_input_ids[-new_tokens:]]
        codes = prefix_code(list(req.origin_input_ids) + req.output_ids)
        loc = row[req.prefix_len : total].to(torch.int64)
        for layer in range(self.pools.kv.layer_num):
            self.pools.kv.k_buffer[layer][loc] = self.pattern(codes[req.prefix_len :], layer, 0)
            self.pools.kv.v_buffer[layer][loc] = self.pattern(codes[req.prefix_len :], layer, 1)
        req.kv.kv_committed_len = total
        self.cached_tokens.append(req.prefix_len)

    def verify_prefix(self, req: SimReq) -> None:
        if req.prefix_len == 0:
            return
        row = self.pools.req_to_token.req_to_token[req.kv.req_pool_idx]
        loc = row[: req.prefix_len].to(torch.int64)
        codes = prefix_code(req.full_untruncated_fill_ids[: req.prefix_len])
        for layer in range(self.pools.kv.layer_num):
            assert torch.equal(self.pools.kv.k_buffer[layer][loc], self.pattern(codes, layer, 0))
            assert torch.equal(self.pools.kv.v_buffer[layer][loc], self.pattern(codes, layer, 1))
        self.verified += req.prefix_len

    verified = 0


def fp8_server(dtype, store, size=256, host="64KiB"):
    kv = mha(dtype, size=size)
    assert kv.store_dtype == torch.uint8 and kv.k_buffer[0].dtype == torch.uint8
    allocator = TokenToKVPoolAllocator(size, dtype, "cpu", kv, need_sort=False)
    pools = Pools(ReqToTokenPool(8, 1024, "cpu", enable_memory_saver=False), kv, allocator, size)
    config = parse_config(
        {
            "host": {"size": host},
            "store": {**store, "block_tokens": 16},
            "prefetch": {"wait": "wait_complete"},
        }
    )
    cache = HiRadixCache(pools.params(1), config, model_id=f"fp8-test/{dtype}")
    return cache, pools, ByteScheduler(cache, pools)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_pools_are_bit_exact_through_l2_and_l3(dtype, tmp_path):
    store = {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "64MiB"}}
    cache, pools, sched = fp8_server(dtype, store)
    rng = random.Random(5)
    prompts = [[rng.randrange(1000) for _ in range(96)] for _ in range(6)]  # 6 x 96 > L1 256
    write_then_read(sched, cache, prompts)
    counters = cache.stats.counters
    assert counters["l2_to_l1_tokens"] > 0 and counters["l2_to_l3_tokens"] > 0, counters
    assert idle_total(cache, pools) == pools.size

    # another server on the same store: everything past its empty tiers comes from L3
    other, other_pools, other_sched = fp8_server(dtype, store)
    for i, prompt in enumerate(prompts):
        req = SimReq(f"o{i}", prompt)
        other_sched.run(req)
        assert req.storage_hit == 96  # 6 pages of 16, every byte checked by verify_prefix
    assert other_sched.verified >= 6 * 96
    assert other.stats.counters["l3_hit_tokens"] == 6 * 96
    assert other.verifier is not None and other.verifier.mismatches == 0
    assert idle_total(other, other_pools) == other_pools.size
