"""Replay the Mooncake trace through hiradix's tree and SGLang's two radix caches.

Each cache gets its own real SGLang CPU pool and allocator of the same capacity and page
size, and sees the same keys in the same order. Per request the replay does what the
scheduler does around a prefill: match the prompt, lock the matched node, evict if the
allocator is short, allocate slots for the unmatched page-aligned part, insert, free the
duplicate slots the insert reports, unlock. Requests finish instantly (no decode).

Run from the repository root::

    .venv/bin/python benchmarks/bench_tree.py --json /tmp/bench_tree.json
    .venv/bin/python benchmarks/bench_tree.py --page-size 1 --limit 500 --json /tmp/b.json

Not collected by pytest (STYLE.md item 12).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
BLOCK_TOKENS = 512  # one Mooncake hash id covers 512 prompt tokens

# CPU pools must not take SGLang's CUDA paths (the kernel flags are process-global, see
# SGLANG-0.5.23.md section 6), and sglang's memory_pool imports torchvision at module
# level: on a CPU-only venv the import-only stand-in serves, as in tests/conftest.py.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_TORCHVISION_STANDIN = REPO_ROOT / "integration/testbed/cpu_standins/torchvision_standin"
if importlib.util.find_spec("torchvision") is None and _TORCHVISION_STANDIN.is_dir():
    sys.path.insert(0, str(_TORCHVISION_STANDIN))

import numpy as np
import torch
from hiradix.integration.sglang.cache import HiRadixCache
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from hiradix.config import parse_config

logger = logging.getLogger(__name__)

HIT_RATIO_TOLERANCE = 0.01  # hiradix and RadixCache both run LRU: same policy, same hits


# --------------------------------------------------------------------------- trace
@dataclass(frozen=True, slots=True)
class TraceRequest:
    input_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: Path, limit: int | None) -> list[TraceRequest]:
    requests = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(requests) >= limit:
                break
            if line.strip():
                record = json.loads(line)
                requests.append(TraceRequest(record["input_length"], tuple(record["hash_ids"])))
    return requests


def prompt_tokens(request: TraceRequest) -> array:
    """Block id ``h`` expands to tokens ``h*512 .. h*512+511``: deterministic, and two
    prompts share a token prefix exactly when they share the block ids (no accidental
    one-token matches between different blocks). The last block is cut to length."""
    blocks = np.asarray(request.hash_ids, dtype=np.int64)[:, None] * BLOCK_TOKENS
    tokens = (blocks + np.arange(BLOCK_TOKENS, dtype=np.int64)).ravel()[: request.input_length]
    out = array("q")
    out.frombytes(tokens.tobytes())
    return out


def distinct_tokens(requests: list[TraceRequest]) -> int:
    """Tokens an unbounded cache would hold (a shared block id is one shared prefix)."""
    longest: dict[int, int] = {}
    for request in requests:
        last = len(request.hash_ids) - 1
        for i, block in enumerate(request.hash_ids):
            size = request.input_length - BLOCK_TOKENS * last if i == last else BLOCK_TOKENS
            longest[block] = max(longest.get(block, 0), size)
    return sum(longest.values())


# --------------------------------------------------------------------------- caches
@dataclass
class CacheUnderTest:
    """A cache plus the one behaviour in which the three differ: who frees the caller's
    duplicate slots. RadixCache and hiradix report ``prefix_len`` and leave the caller to
    free its copies of [matched, prefix_len); UnifiedRadixCache frees them itself for the
    part past ``InsertParams.prev_prefix_len`` (unified_tree_core.py, dup_start)."""

    name: str
    label: str
    cache: Any
    allocator: Any
    caller_frees_duplicates: bool
    tree_core: str = "-"


def build_params(l1_tokens: int, page_size: int, **extra: Any) -> CacheInitParams:
    """A real CPU allocator over a KV pool of one layer, one head of width one: the
    pool's memory is a few bytes per slot while the allocator and the tree do real work."""
    kv_pool = MHATokenToKVPool(
        l1_tokens,
        page_size,
        dtype=torch.float16,
        head_num=1,
        head_dim=1,
        layer_num=1,
        device="cpu",
        enable_memory_saver=False,
    )
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(
            l1_tokens, torch.float16, "cpu", kv_pool, need_sort=False
        )
    else:
        allocator = PagedTokenToKVPoolAllocator(
            l1_tokens, page_size, torch.float16, "cpu", kv_pool, need_sort=False
        )
    # req_to_token_pool=None: the replay uses only match/lock/insert/evict, never a row.
    return CacheInitParams(
        disable=False,
        req_to_token_pool=None,
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
        eviction_policy="lru",
        **extra,
    )


def make_hiradix(l1_tokens: int, page_size: int) -> CacheUnderTest:
    params = build_params(l1_tokens, page_size)
    # Device tier only: no host tier and no store, so all three caches hold the same L1.
    config = parse_config({"host": {"size": 0}, "store": {"kind": "none"}})
    cache = HiRadixCache(params, config)
    label = f"hiradix ({config.eviction_policy.value})"
    return CacheUnderTest("hiradix", label, cache, params.token_to_kv_pool_allocator, True)


def make_sglang_radix(l1_tokens: int, page_size: int) -> CacheUnderTest:
    params = build_params(l1_tokens, page_size)
    cache = RadixCache(params)
    allocator = params.token_to_kv_pool_allocator
    return CacheUnderTest("sglang_radix", "sglang RadixCache", cache, allocator, True)


def make_sglang_unified(l1_tokens: int, page_size: int) -> CacheUnderTest:
    # tree_core_backend left unset: UnifiedRadixCache picks its default (Rust when the
    # bundled extension loads, else Python) exactly as a server would.
    params = build_params(l1_tokens, page_size, tree_components=(ComponentType.FULL,))
    cache = UnifiedRadixCache(params)
    core = str(cache._tree_core_backend)
    label = f"sglang UnifiedRadixCache ({core})"
    allocator = params.token_to_kv_pool_allocator
    return CacheUnderTest("sglang_unified", label, cache, allocator, False, tree_core=core)


CACHE_FACTORIES: dict[str, Callable[[int, int], CacheUnderTest]] = {
    "hiradix": make_hiradix,
    "sglang_radix": make_sglang_radix,
    "sglang_unified": make_sglang_unified,
}


# --------------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    requests: int = 0
    prompt_tokens: int = 0
    matched_tokens: int = 0
    evicted_tokens: int = 0
    alloc_failures: int = 0
    leaked_slots: int = 0
    match_ns: int = 0
    insert_evict_ns: int = 0
    wall_s: float = 0.0

    @property
    def match_us(self) -> float:
        return self.match_ns / 1e3 / max(self.requests, 1)

    @property
    def insert_evict_us(self) -> float:
        return self.insert_evict_ns / 1e3 / max(self.requests, 1)

    @property
    def total_us(self) -> float:
        return self.match_us + self.insert_evict_us

    @property
    def hit_ratio(self) -> float:
        return self.matched_tokens / max(self.prompt_tokens, 1)


def serve_one(subject: CacheUnderTest, key: RadixKey, page_size: int, out: ReplayResult) -> None:
    """One request: match (timed as "match": match_prefix plus the path's device indices,
    which the scheduler reads before allocating), then lock, evict, alloc, insert, free
    duplicates, unlock (timed as "insert+evict")."""
    cache, allocator = subject.cache, subject.allocator
    clock = time.perf_counter_ns
    t0 = clock()
    match = cache.match_prefix(MatchPrefixParams(key=key))
    matched = match.device_prefix_len
    prefix_indices = cache.path_device_indices(match.last_device_node)[:matched]
    t1 = clock()
    # The lock keeps eviction below from freeing the prefix this request is reusing.
    lock = cache.lock(match.last_device_node)
    aligned = len(key) - len(key) % page_size
    need = aligned - matched
    if need > 0:
        shortfall = need - allocator.available_size()
        if shortfall > 0:
            out.evicted_tokens += cache.evict(EvictParams(num_tokens=shortfall)).num_tokens_evicted
        new_indices = allocator.alloc(need)
        if new_indices is None:
            out.alloc_failures += 1
        else:
            value = torch.cat([prefix_indices, new_indices])
            insert = InsertParams(key=key, value=value, prev_prefix_len=matched)
            result = cache.insert(insert)
            if subject.caller_frees_duplicates and result.prefix_len > matched:
                allocator.free_segment(value[matched : result.prefix_len], start_pos=matched)
    cache.unlock(lock)
    t2 = clock()
    if len(prefix_indices) != matched:
        raise RuntimeError(
            f"{subject.name}: path holds {len(prefix_indices)} slots, match reported {matched}"
        )
    out.requests += 1
    out.prompt_tokens += len(key)
    out.matched_tokens += matched
    out.match_ns += t1 - t0
    out.insert_evict_ns += t2 - t1


def replay(subject: CacheUnderTest, requests: list[TraceRequest], page_size: int) -> ReplayResult:
    out = ReplayResult()
    gc.collect()
    start = time.perf_counter()
    for request in requests:
        key = RadixKey(token_ids=prompt_tokens(request))  # built outside the timed spans
        serve_one(subject, key, page_size, out)
    out.wall_s = time.perf_counter() - start
    out.leaked_slots = leaked_slots(subject)
    return out


def leaked_slots(subject: CacheUnderTest) -> int:
    """Slots neither free nor held by the tree once every request is done (nothing is
    locked then): non-zero means a leak (> 0) or a double free (< 0)."""
    capacity = subject.allocator.size  # slot/page 0 is reserved on top of ``size``
    cache = subject.cache  # evictable + protected: the one size API all three share
    held = int(cache.evictable_size()) + int(cache.protected_size())
    return capacity - subject.allocator.available_size() - held


# --------------------------------------------------------------------------- report
def format_table(subjects: list[CacheUnderTest], results: dict[str, ReplayResult]) -> str:
    base = results["hiradix"].total_us if "hiradix" in results else None
    header = (
        f"{'cache':<34} {'match us/req':>13} {'ins+evict us/req':>17} "
        f"{'total us/req':>13} {'hit ratio':>10} {'vs hiradix':>11}"
    )
    lines = [header, "-" * len(header)]
    for subject in subjects:
        r = results[subject.name]
        ratio = f"{r.total_us / base:.2f}x" if base else "-"
        lines.append(
            f"{subject.label:<34} {r.match_us:>13.1f} {r.insert_evict_us:>17.1f} "
            f"{r.total_us:>13.1f} {r.hit_ratio:>10.4f} {ratio:>11}"
        )
    return "\n".join(lines)


def summary(
    args: argparse.Namespace,
    subjects: list[CacheUnderTest],
    results: dict[str, ReplayResult],
    requests: int,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "l1_tokens": args.l1_tokens,
        "page_size": args.page_size,
        "requests": requests,
        "unified_tree_core": next(
            (s.tree_core for s in subjects if s.name == "sglang_unified"), None
        ),
    }
    for subject in subjects:
        r = results[subject.name]
        data[f"{subject.name}_us_per_req"] = round(r.total_us, 3)
        data[f"{subject.name}_match_us_per_req"] = round(r.match_us, 3)
        data[f"{subject.name}_insert_evict_us_per_req"] = round(r.insert_evict_us, 3)
        data[f"{subject.name}_hit_ratio"] = round(r.hit_ratio, 6)
        data[f"{subject.name}_evicted_tokens"] = r.evicted_tokens
        data[f"{subject.name}_alloc_failures"] = r.alloc_failures
        data[f"{subject.name}_leaked_slots"] = r.leaked_slots
        data[f"{subject.name}_wall_s"] = round(r.wall_s, 3)
    return data


def sanity_warnings(results: dict[str, ReplayResult]) -> list[str]:
    warnings = []
    if "hiradix" in results and "sglang_radix" in results:
        ours, theirs = results["hiradix"].hit_ratio, results["sglang_radix"].hit_ratio
        if abs(ours - theirs) > HIT_RATIO_TOLERANCE:
            warnings.append(
                f"hit ratios differ by more than {HIT_RATIO_TOLERANCE:.0%} under "
                f"the same LRU policy: hiradix {ours:.4f}, RadixCache {theirs:.4f}"
            )
    for name, r in results.items():
        if r.alloc_failures:
            warnings.append(
                f"{name}: {r.alloc_failures} requests found no slots even after "
                f"eviction (--l1-tokens below one prompt?)"
            )
        if r.leaked_slots:
            warnings.append(
                f"{name}: {r.leaked_slots} slots neither free nor in the tree "
                f"after the replay (leak if > 0, double free if < 0)"
            )
        if r.evicted_tokens == 0:
            warnings.append(f"{name}: nothing was evicted; raise the load or lower --l1-tokens")
    return warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake JSONL")
    parser.add_argument("--json", type=Path, required=True, help="where to write results")
    parser.add_argument(
        "--l1-tokens",
        type=int,
        default=1_000_000,
        help="device KV slots per cache (rounded down to whole pages)",
    )
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="replay the first N requests")
    parser.add_argument(
        "--caches",
        nargs="+",
        choices=list(CACHE_FACTORIES),
        default=list(CACHE_FACTORIES),
        help="which caches to run",
    )
    args = parser.parse_args(argv)
    if args.page_size < 1:
        parser.error("--page-size must be >= 1")
    args.l1_tokens -= args.l1_tokens % args.page_size
    if args.l1_tokens < args.page_size:
        parser.error("--l1-tokens must hold at least one page")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    requests = load_trace(args.trace, args.limit)
    distinct = distinct_tokens(requests)
    print(
        f"trace: {args.trace} ({len(requests)} requests, "
        f"{sum(r.input_length for r in requests):,} prompt tokens, {distinct:,} distinct)"
    )
    print(
        f"l1_tokens: {args.l1_tokens:,} ({args.l1_tokens / max(distinct, 1):.1%} of distinct)"
        f"  page_size: {args.page_size}"
    )
    subjects, results = [], {}
    for name in args.caches:
        subject = CACHE_FACTORIES[name](args.l1_tokens, args.page_size)
        subjects.append(subject)
        results[name] = replay(subject, requests, args.page_size)
        print(f"  {subject.label}: {results[name].wall_s:.1f}s wall", file=sys.stderr)
    print(format_table(subjects, results))
    for warning in sanity_warnings(results):
        print(f"WARNING: {warning}")
    data = summary(args, subjects, results, len(requests))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(data, indent=2))
    return data


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    # One intra-op thread: the tensors here are a few thousand slot ids, and on a shared
    # CPU host OpenMP wake-ups of a second thread add milliseconds of noise per op.
    torch.set_num_threads(1)
    run(parse_args())
