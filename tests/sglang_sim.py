"""Drive a prefix cache the way SGLang's scheduler does, on SGLang's real CPU pools.

The pools, the allocator, ``release_kv_cache`` and ``free_kv_row`` are SGLang's own; only
the request is a small stand-in for ``Req`` (the real one needs a whole running server
context) that carries SGLang's real ``ReqKvInfo``. The "forward pass" writes into the real
KV pool a value derived from the whole token prefix at each position, so a test can check
that the KV a match hands out is exactly the KV of the tokens it claims to cover.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.runtime_context import get_context


def publish_test_config() -> Any:
    """SGLang's release path reads its process-wide config; publish the dummy one its own
    unit tests use (``override_server_args``) once per test process."""
    override = get_context().override_server_args()
    override.install()
    return override


MOD = 1 << 23  # float32 represents every integer below 2**24 exactly


def prefix_code(tokens: Any, ns: str = "") -> list[int]:
    """code[i] identifies (namespace, tokens[: i + 1])."""
    out, h = [], (hash(ns) % MOD) or 7
    for t in tokens:
        h = (h * 1_000_003 + int(t) + 1) % MOD
        out.append(h)
    return out


class SimReq:
    """The slice of ``Req`` that the prefix cache and ``release_kv_cache`` read."""

    def __init__(self, rid: str, ids: list[int], extra_key: str | None = None):
        self.rid = rid
        self.origin_input_ids = array("q", ids)
        self.output_ids: list[int] = []
        self.full_untruncated_fill_ids = array("q", ids)
        self.kv = ReqKvInfo()
        self.extra_key = extra_key
        self.cache_salt = None
        self.priority = None
        self.lock = None
        self.last_node = None
        self.prefix_len = 0
        self.skip_radix_cache_insert = False
        self.finished_reason = "length"
        self.finished_len = None
        self.storage_hit = 0

    def owned_kv_len(self) -> int:
        return self.kv.kv_committed_len

    def finished(self) -> bool:
        return True

    def refresh_fill_ids(self) -> None:
        self.full_untruncated_fill_ids = self.origin_input_ids + array("q", self.output_ids)


@dataclass
class Pools:
    req_to_token: ReqToTokenPool
    kv: MHATokenToKVPool | MLATokenToKVPool
    allocator: Any
    size: int

    def params(self, page_size: int) -> CacheInitParams:
        return CacheInitParams(
            disable=False,
            req_to_token_pool=self.req_to_token,
            token_to_kv_pool_allocator=self.allocator,
            page_size=page_size,
        )


def make_pools(size: int = 512, page_size: int = 1, max_reqs: int = 16, ctx: int = 2048) -> Pools:
    kv = MHATokenToKVPool(
        size,
        page_size=page_size,
        dtype=torch.float32,
        head_num=1,
        head_dim=2,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    if page_size == 1:
        allocator: Any = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(
            size, page_size, torch.float32, "cpu", kv, need_sort=False
        )
    req_to_token = ReqToTokenPool(max_reqs, ctx, "cpu", enable_memory_saver=False)
    return Pools(req_to_token, kv, allocator, size)


def make_mla_pools(
    size: int = 512,
    page_size: int = 1,
    max_reqs: int = 16,
    ctx: int = 2048,
    *,
    dtype: torch.dtype = torch.bfloat16,
    kv_lora_rank: int = 32,
    qk_rope_head_dim: int = 8,
    layer_num: int = 2,
) -> Pools:
    """SGLang's real ``MLATokenToKVPool`` (one latent ``kv_buffer`` per layer) on CPU."""
    kv = MLATokenToKVPool(
        size,
        page_size=page_size,
        dtype=dtype,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        layer_num=layer_num,
        device="cpu",
        enable_memory_saver=False,
    )
    if page_size == 1:
        allocator: Any = TokenToKVPoolAllocator(size, dtype, "cpu", kv, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(size, page_size, dtype, "cpu", kv, need_sort=False)
    req_to_token = ReqToTokenPool(max_reqs, ctx, "cpu", enable_memory_saver=False)
    return Pools(req_to_token, kv, allocator, size)


def settle(cache: Any) -> None:
    """Let write-through reach the store (what the scheduler's next steps would do)."""
    for _ in range(3):
        cache.flush_pending_backups()
        cache.engine.drain()
    cache.flush_pending_backups()


def write_then_read(sched: Any, cache: Any, prompts: Sequence[Sequence[int]]) -> None:
    """Every prompt once (written down the tiers), then every prompt again (by then
    evicted from L1: loaded back from L2 or L3), settling write-through after each."""
    for tag in ("w", "r"):
        for i, prompt in enumerate(prompts):
            sched.run(SimReq(f"{tag}{i}", list(prompt)))
            settle(cache)


def run_ranks(
    work: Callable[[int], None],
    ranks: int,
    timeout: float = 120.0,
    *,
    on_error: Callable[[], None] | None = None,
) -> dict[int, BaseException]:
    """Run ``work(rank)`` on one thread per rank (TP ranks or pipeline stages in one
    process), join each thread within ``timeout`` and return what each failed rank raised.
    ``on_error`` runs on the failing rank's thread (abort a barrier, so that the other
    ranks do not wait in a collective the failed one never enters)."""
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        try:
            work(rank)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors[rank] = exc
            if on_error is not None:
                on_error()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


def idle_total(cache: Any, pools: Pools) -> int:
    """SGLang's idle invariant: available + evictable + protected == total."""
    return pools.allocator.available_size() + cache.evictable_size() + cache.protected_size()


class Scheduler:
    """Admits, 'computes' and releases requests like SGLang's scheduler does."""

    def __init__(self, cache: Any, pools: Pools, page_size: int = 1):
        self.cache = cache
        self.pools = pools
        self.page_size = page_size
        self.cached_tokens: list[int] = []

    def match(self, req: SimReq) -> int:
        key = RadixKey(req.full_untruncated_fill_ids, req.extra_key)
        result = self.cache.match_prefix(MatchPrefixParams(key=key, req=req))  # type: ignore[arg-type]
        if result.host_hit_length > 0:
            from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

            loaded = self.cache.init_load_back(
                InitLoadBackParams(result.best_match_node, result.host_hit_length, req=req)
            )
            assert loaded is not None and loaded[0] == result.host_hit_length
            req.last_node = loaded[1]
            req.prefix_len = result.device_prefix_len + loaded[0]
        else:
            req.last_node = result.last_device_node
            req.prefix_len = result.device_prefix_len
        req.kv.cache_protected_len = req.prefix_len
        return req.prefix_len

    def arrive(self, req: SimReq, timeout: float = 10.0) -> None:
        """Arrival as the scheduler does it with storage prefetch on: match, hand the rest
        of the prompt to ``prefetch_from_storage``, then wait at the admission gate."""
        if not getattr(self.cache, "wants_storage_prefetch", False):
            return
        import time
        from types import SimpleNamespace

        matched = self.match(req)
        self.cache.unlock(None)
        ids = req.full_untruncated_fill_ids
        handle = SimpleNamespace(rid=req.rid, attempt_id=0)
        self.cache.prefetch_from_storage(
            handle,
            req.last_node,
            ids[matched:],
            matched_prefix_tokens=ids[:matched],
            extra_key=req.extra_key,
            cache_salt=None,
        )
        deadline = time.monotonic() + timeout
        # each scheduler iteration runs hiradix's agreed step first (plugin hook)
        while self.cache.step() or not self.cache.check_prefetch_progress(handle):
            assert time.monotonic() < deadline, "prefetch never became ready"
            time.sleep(0.005)
        req.storage_hit = self.cache.pop_prefetch_loaded_tokens(handle)

    def admit(self, req: SimReq, new_tokens: int = 4) -> None:
        """Match, lock, allocate and run the 'forward' for prompt + ``new_tokens``."""
        self.match(req)
        req.lock = self.cache.lock(req.last_node)
        assert self.pools.req_to_token.alloc([req]) is not None
        prefix = self.cache.prefix_device_indices(req)
        total = len(req.origin_input_ids) + new_tokens
        need = total - req.prefix_len
        if self.page_size > 1:
            need = -(-total // self.page_size) * self.page_size - req.prefix_len
        avail = self.pools.allocator.available_size()
        if avail < need:
            self.cache.evict_for_alloc(EvictParams(num_tokens=need - avail))
        new = self.pools.allocator.alloc(need)
        if new is None:
            raise MemoryError(f"no room for {need} tokens")
        row = self.pools.req_to_token.req_to_token[req.kv.req_pool_idx]
        row[: req.prefix_len] = prefix.to(row.dtype)
        row[req.prefix_len : req.prefix_len + need] = new.to(row.dtype)
        # a page-rounded tail shares the last page, which the paged free releases whole
        req.kv.kv_allocated_len = total
        self.verify_prefix(req)
        req.output_ids = [(t * 7 + 3) % 1000 for t in req.origin_input_ids[-new_tokens:]]
        full = list(req.origin_input_ids) + req.output_ids
        codes = prefix_code(full, req.extra_key or "")
        loc = row[req.prefix_len : total].to(torch.int64)
        self.write_kv(loc, codes[req.prefix_len : total])
        req.kv.kv_committed_len = total
        self.cached_tokens.append(req.prefix_len)

    def verify_prefix(self, req: SimReq) -> None:
        """The matched KV must be exactly the KV of the matched tokens."""
        if req.prefix_len == 0:
            return
        row = self.pools.req_to_token.req_to_token[req.kv.req_pool_idx]
        loc = row[: req.prefix_len].to(torch.int64)
        want = prefix_code(req.full_untruncated_fill_ids[: req.prefix_len], req.extra_key or "")
        self.check_kv(loc, want, req.rid)

    def write_kv(self, loc: torch.Tensor, codes: list[int]) -> None:
        """The 'forward': KV of slots ``loc`` from the prefix codes of their tokens."""
        kv = self.pools.kv
        value = torch.tensor(codes, dtype=torch.float32)
        for layer in range(kv.layer_num):
            if isinstance(kv, MLATokenToKVPool):  # one latent row per slot
                kv.kv_buffer[layer][loc, 0, 0] = value.to(kv.kv_buffer[layer].dtype)
                continue
            kv.k_buffer[layer][loc, 0, 0] = value
            kv.v_buffer[layer][loc, 0, 1] = value + layer

    def check_kv(self, loc: torch.Tensor, want: list[int], rid: str) -> None:
        kv = self.pools.kv
        for layer in range(kv.layer_num):
            if isinstance(kv, MLATokenToKVPool):
                got = kv.kv_buffer[layer][loc, 0, 0]
                expect = torch.tensor(want, dtype=torch.float32).to(got.dtype)
                assert torch.equal(got, expect), f"wrong latent KV served for {rid}"
                continue
            got_k = kv.k_buffer[layer][loc, 0, 0].tolist()
            got_v = kv.v_buffer[layer][loc, 0, 1].tolist()
            assert got_k == [float(w) for w in want], f"wrong K served for {rid}"
            assert got_v == [float(w + layer) for w in want], f"wrong V served for {rid}"

    def release(self, req: SimReq) -> None:
        release_kv_cache(req, self.cache, checkpoint=True)  # type: ignore[arg-type]
        self.cache.flush_pending_backups()

    def run(self, req: SimReq, new_tokens: int = 4) -> int:
        self.arrive(req)
        self.admit(req, new_tokens)
        self.release(req)
        return req.prefix_len
