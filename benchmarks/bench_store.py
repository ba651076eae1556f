"""L3 store throughput next to the raw speed of each medium, and the page codec on real KV.

    python benchmarks/bench_store.py --json OUT [--pages N] [--page-bytes B ...]

For every store (memory, nvme in a temp dir on the working disk, redis on a
redis-server this script starts) it measures put and get throughput (GB/s, pages/s)
of same-size pages, in batches of 8 as the transfer engine issues them, gets through
``get_many_into`` with buffers kept across batches (what the L3 -> L2 path calls), and
the raw medium in the same run: a plain dict for memory, plain file write (+fsync
when the store fsyncs) / read into reused buffers for nvme, redis-py pipelined
SET / GET of the same blobs on the same server for redis. The codec is measured on KV
captured from a forward pass of a small, randomly initialised ``LlamaForCausalLM``.

Default page: 64 tokens of a Llama-8B-class model (32 layers x K,V x 8 KV heads x 128
dims x 2 bytes x 64 tokens = 8 MiB); also 512 KiB pages. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import redis
from hiradix.backends.base import PageStore, StoreKey, make_key
from hiradix.backends.memory_store import MemoryStore
from hiradix.backends.nvme_store import NvmeStore
from hiradix.backends.redis_store import RedisStore
from hiradix.integration.testbed.redis_servers import RedisServer

from hiradix.codec import PageMeta, decode_page, encode_page
from hiradix.config import RedisConfig, TlsConfig

logger = logging.getLogger(__name__)

MIB = 1 << 20
LLAMA8B_PAGE = 64 * 32 * 2 * 8 * 128 * 2  # 8 MiB
BATCH = 8


@dataclass(frozen=True, slots=True)
class Rate:
    seconds: float
    nbytes: int
    pages: int

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds


def timed(fn: Callable[[], object], nbytes: int, pages: int, repeat: int = 2) -> Rate:
    """Best of ``repeat`` runs (the first one also warms caches and connections)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return Rate(best, nbytes, pages)


@dataclass(frozen=True, slots=True)
class Workload:
    """Put every page (new keys / files each call), get the last ones back, clean up."""

    put: Callable[[], None]
    get: Callable[[], None]
    cleanup: Callable[[], None]


def compare(store: Workload, raw: Workload, nbytes: int, pages: int, repeat: int) -> list[Rate]:
    """Store and raw medium, alternating run by run so both see the same machine (this
    disk's throughput drifts by 2x over minutes); best of ``repeat`` each. Dirty page
    cache is flushed before every run (untimed): no run pays for another's write-back.
    Returns [store put, store get, raw put, raw get]."""
    best = [float("inf")] * 4
    for phase in (0, 1):
        for _ in range(repeat):
            for i, work in enumerate((store, raw)):
                os.sync()
                start = time.perf_counter()
                (work.put, work.get)[phase]()
                slot = 2 * i + phase
                best[slot] = min(best[slot], time.perf_counter() - start)
    store.cleanup()
    raw.cleanup()
    return [Rate(seconds, nbytes, pages) for seconds in best]


def make_pages(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    # Distinct pages without paying for n random buffers.
    return [i.to_bytes(8, "little") + base[8:] for i in range(n)]


def keys_for(n: int, tag: str) -> list[StoreKey]:
    return [make_key("bench:", "ab" * 16, f"{tag}{i:08x}") for i in range(n)]


def store_workload(store: PageStore, pages: Sequence[bytes], tag: str) -> Workload:
    """Every put writes new keys (hiradix never rewrites a page it has written: page
    keys are content keys); gets read the last ones through ``get_many_into`` with
    buffers kept across batches, as each transfer worker does."""
    generations: list[list[StoreKey]] = []
    buffers: list[bytearray] = []

    def put() -> None:
        keys = keys_for(len(pages), f"{tag}{len(generations):x}")
        generations.append(keys)
        for i in range(0, len(pages), BATCH):
            ok = store.put_many(list(zip(keys[i : i + BATCH], pages[i : i + BATCH])), ttl=3600)
            if not all(ok):
                raise RuntimeError(f"{store.describe()} refused pages")

    def get() -> None:
        keys = generations[-1]
        for i in range(0, len(keys), BATCH):
            if any(b is None for b in store.get_many_into(keys[i : i + BATCH], buffers)):
                raise RuntimeError(f"{store.describe()} lost pages")

    def cleanup() -> None:
        for keys in generations:
            store.delete_many(keys)
        store.close()

    return Workload(put, get, cleanup)


def raw_memory(pages: Sequence[bytes]) -> Workload:
    table: dict[int, bytes] = {}

    def put() -> None:
        for i, p in enumerate(pages):
            table[i] = p  # a reference, as the store keeps

    def get() -> None:
        for i in range(len(pages)):
            table[i]

    return Workload(put, get, table.clear)


def raw_files(root: str, pages: Sequence[bytes], fsync: bool) -> Workload:
    os.makedirs(root, exist_ok=True)
    generations: list[list[str]] = []
    buffers = [bytearray(len(p)) for p in pages[:BATCH]]

    def put() -> None:  # new files every time, as the store is measured
        paths = [os.path.join(root, f"{len(generations)}-{i}.bin") for i in range(len(pages))]
        generations.append(paths)
        for path, p in zip(paths, pages, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, p)
            if fsync:
                os.fsync(fd)
            os.close(fd)

    def get() -> None:  # read into reused buffers: the fastest plain read of a file
        for i, path in enumerate(generations[-1]):
            with open(path, "rb", buffering=0) as f:
                f.readinto(buffers[i % BATCH])

    return Workload(put, get, lambda: shutil.rmtree(root, ignore_errors=True))


def raw_redis(url: str, pages: Sequence[bytes]) -> Workload:
    client = redis.Redis.from_url(url)
    generations: list[list[str]] = []

    def put() -> None:
        keys = [f"raw:{len(generations)}:{i}" for i in range(len(pages))]
        generations.append(keys)
        for i in range(0, len(pages), BATCH):
            pipe = client.pipeline(transaction=False)
            for k, p in zip(keys[i : i + BATCH], pages[i : i + BATCH], strict=True):
                pipe.set(k, p, px=3_600_000)
            pipe.execute()

    def get() -> None:
        keys = generations[-1]
        for i in range(0, len(keys), BATCH):
            pipe = client.pipeline(transaction=False)
            for k in keys[i : i + BATCH]:
                pipe.get(k)
            pipe.execute()

    def cleanup() -> None:
        for keys in generations:
            client.delete(*keys)
        client.close()

    return Workload(put, get, cleanup)


def capture_kv() -> np.ndarray:
    """K and V of a forward pass of a tiny random Llama (bf16), as uint16 bit patterns."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (4, 1024))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    tensors: list[torch.Tensor] = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [layer.keys, layer.values]
    elif hasattr(cache, "key_cache"):
        for k, v in zip(cache.key_cache, cache.value_cache, strict=True):
            tensors += [k, v]
    else:
        for k, v in cache:
            tensors += [k, v]
    flat = torch.cat([t.contiguous().reshape(-1) for t in tensors])
    return flat.view(torch.int16).numpy().view(np.uint16)


def bench_codec(kv: np.ndarray, page_bytes: int, level: int) -> dict[str, float]:
    values = page_bytes // 2
    n = len(kv) // values
    raws = [kv[i * values : (i + 1) * values].tobytes() for i in range(n)]
    metas = [
        PageMeta("bfloat16", "layer_kv_token_head_dim", (values,), bytes(16), i.to_bytes(4, "big"))
        for i in range(n)
    ]
    total = n * page_bytes
    out: dict[str, float] = {}
    for codec in ("zstd", "none"):
        blobs: list[bytes] = []

        def enc(codec: str = codec, blobs: list[bytes] = blobs) -> None:
            blobs[:] = [encode_page(r, m, codec=codec, level=level) for r, m in zip(raws, metas)]

        def dec(blobs: list[bytes] = blobs) -> None:
            for b, m in zip(blobs, metas, strict=True):
                decode_page(b, m)

        out[f"{codec}_encode_gbps"] = timed(enc, total, n).gbps
        out[f"{codec}_decode_gbps"] = timed(dec, total, n).gbps
        if codec == "zstd":
            out["zstd_ratio"] = total / sum(map(len, blobs))
    out["codec_pages"] = n
    out["codec_page_bytes"] = page_bytes
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, metavar="OUT", help="write results here")
    parser.add_argument("--page-bytes", type=int, nargs="+", default=[LLAMA8B_PAGE, 512 * 1024])
    parser.add_argument(
        "--pages", type=int, default=None, help="pages per size (default: ~256 MiB)"
    )
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per size")
    parser.add_argument("--dir", default=os.getcwd(), help="where the nvme temp dir goes")
    parser.add_argument("--fsync", action="store_true", help="nvme store and raw files fsync")
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best)")
    parser.add_argument("--stores", nargs="+", default=["memory", "nvme", "redis"])
    args = parser.parse_args(argv)

    results: dict[str, object] = {"page_bytes": args.page_bytes, "fsync": args.fsync}
    per_size: dict[str, dict[str, float]] = {}
    server = RedisServer().start() if "redis" in args.stores else None
    workdir = tempfile.mkdtemp(prefix="hiradix-bench-", dir=args.dir)
    try:
        for page_bytes in args.page_bytes:
            n = args.pages or max(BATCH, args.total_mib * MIB // page_bytes)
            pages = make_pages(n, page_bytes)
            row: dict[str, float] = {"pages": n}
            for name in args.stores:
                store: PageStore
                capacity = (args.repeat + 1) * n * page_bytes
                if name == "memory":
                    store = MemoryStore(capacity)
                    raw = raw_memory(pages)
                elif name == "nvme":
                    root = os.path.join(workdir, f"nvme-{page_bytes}")
                    store = NvmeStore(root, capacity, fsync=args.fsync)
                    raw = raw_files(os.path.join(workdir, f"raw-{page_bytes}"), pages, args.fsync)
                else:
                    assert server is not None
                    cfg = RedisConfig(
                        url=server.url, password_env=None, username=None, cluster=False,
                        key_prefix="bench:", timeout=30.0, batch_pages=BATCH,
                        tls=TlsConfig(None, None, None, True),
                    )  # fmt: skip
                    store = RedisStore(cfg)
                    raw = raw_redis(server.url, pages)
                work = store_workload(store, pages, f"{page_bytes:x}")
                put, get, raw_put, raw_get = compare(work, raw, n * page_bytes, n, args.repeat)
                row.update({
                    f"{name}_put_gbps": put.gbps, f"{name}_get_gbps": get.gbps,
                    f"{name}_put_pages_s": put.pages_per_s, f"{name}_get_pages_s": get.pages_per_s,
                    f"{name}_raw_put_gbps": raw_put.gbps, f"{name}_raw_get_gbps": raw_get.gbps,
                })  # fmt: skip
            per_size[str(page_bytes)] = row
            del pages
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)

    # The flat keys describe the first (default: Llama-8B 64-token) page size.
    results.update(per_size[str(args.page_bytes[0])])
    results["by_page_bytes"] = per_size
    kv = capture_kv()
    results.update(bench_codec(kv, min(args.page_bytes[-1], kv.nbytes // 4), args.level))

    print(f"{'page':>9} {'store':>7} {'put GB/s':>9} {'raw':>7} {'ratio':>6} "
          f"{'get GB/s':>9} {'raw':>7} {'ratio':>6} {'put pg/s':>9} {'get pg/s':>9}")  # fmt: skip
    for size, row in per_size.items():
        for name in args.stores:
            p, rp = row[f"{name}_put_gbps"], row[f"{name}_raw_put_gbps"]
            g, rg = row[f"{name}_get_gbps"], row[f"{name}_raw_get_gbps"]
            print(
                f"{int(size) // 1024:>6}KiB {name:>7} {p:9.2f} {rp:7.2f} {p / rp:6.2f} "
                f"{g:9.2f} {rg:7.2f} {g / rg:6.2f} {row[f'{name}_put_pages_s']:9.0f} "
                f"{row[f'{name}_get_pages_s']:9.0f}"
            )
    print(
        f"codec on real KV (bf16, {results['codec_page_bytes']} B pages): zstd ratio "
        f"{results['zstd_ratio']:.3f}, encode {results['zstd_encode_gbps']:.2f} GB/s, "
        f"decode {results['zstd_decode_gbps']:.2f} GB/s; raw framing encode "
        f"{results['none_encode_gbps']:.2f} GB/s, decode {results['none_decode_gbps']:.2f} GB/s"
    )
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
