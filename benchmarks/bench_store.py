"""L3 store throughput next to the raw speed of each medium, and the page codec on real KV.

    python benchmarks/bench_store.py --json OUT [--pages N] [--page-bytes B ...]

For every store (memory, nvme in a temp dir on the working disk, redis on a
redis-server this script starts) it measures put and get throughput (GB/s, pages/s)
of same-size pages, and the raw medium in the same run: a plain dict for memory,
plain file write (+fsync when the store fsyncs) / read for nvme, redis-py pipelined
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
from hiradix.integration.procs import RedisServer

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


def make_pages(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    # Distinct pages without paying for n random buffers.
    return [i.to_bytes(8, "little") + base[8:] for i in range(n)]


def keys_for(n: int, tag: str) -> list[StoreKey]:
    return [make_key("bench:", "ab" * 16, f"{tag}{i:08x}") for i in range(n)]


def bench_store(store: PageStore, pages: Sequence[bytes], tag: str) -> tuple[Rate, Rate]:
    keys = keys_for(len(pages), tag)
    total = sum(map(len, pages))

    def put() -> None:
        for i in range(0, len(pages), BATCH):
            ok = store.put_many(list(zip(keys[i : i + BATCH], pages[i : i + BATCH])), ttl=3600)
            if not all(ok):
                raise RuntimeError(f"{store.describe()} refused pages")

    def get() -> None:
        for i in range(0, len(keys), BATCH):
            if any(b is None for b in store.get_many(keys[i : i + BATCH])):
                raise RuntimeError(f"{store.describe()} lost pages")

    return timed(put, total, len(pages)), timed(get, total, len(pages))


def raw_memory(pages: Sequence[bytes]) -> tuple[Rate, Rate]:
    table: dict[int, bytes] = {}
    total = sum(map(len, pages))

    def put() -> None:
        for i, p in enumerate(pages):
            table[i] = p  # a reference, as the store keeps

    def get() -> None:
        for i in range(len(pages)):
            table[i]

    return timed(put, total, len(pages)), timed(get, total, len(pages))


def raw_files(root: str, pages: Sequence[bytes], fsync: bool) -> tuple[Rate, Rate]:
    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f"{i}.bin") for i in range(len(pages))]
    total = sum(map(len, pages))

    def put() -> None:
        for path, p in zip(paths, pages, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, p)
            if fsync:
                os.fsync(fd)
            os.close(fd)

    def get() -> None:
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                f.readall()

    return timed(put, total, len(pages)), timed(get, total, len(pages))


def raw_redis(url: str, pages: Sequence[bytes]) -> tuple[Rate, Rate]:
    client = redis.Redis.from_url(url)
    keys = [f"raw:{i}" for i in range(len(pages))]
    total = sum(map(len, pages))

    def put() -> None:
        for i in range(0, len(pages), BATCH):
            pipe = client.pipeline(transaction=False)
            for k, p in zip(keys[i : i + BATCH], pages[i : i + BATCH], strict=True):
                pipe.set(k, p, px=3_600_000)
            pipe.execute()

    def get() -> None:
        for i in range(0, len(keys), BATCH):
            pipe = client.pipeline(transaction=False)
            for k in keys[i : i + BATCH]:
                pipe.get(k)
            pipe.execute()

    rates = timed(put, total, len(pages)), timed(get, total, len(pages))
    client.delete(*keys)
    client.close()
    return rates


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
                if name == "memory":
                    store = MemoryStore(2 * n * page_bytes)
                    raw = raw_memory(pages)
                elif name == "nvme":
                    root = os.path.join(workdir, f"nvme-{page_bytes}")
                    store = NvmeStore(root, 2 * n * page_bytes, fsync=args.fsync)
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
                put, get = bench_store(store, pages, f"{page_bytes:x}")
                store.delete_many(keys_for(n, f"{page_bytes:x}"))
                store.close()
                row.update({
                    f"{name}_put_gbps": put.gbps, f"{name}_get_gbps": get.gbps,
                    f"{name}_put_pages_s": put.pages_per_s, f"{name}_get_pages_s": get.pages_per_s,
                    f"{name}_raw_put_gbps": raw[0].gbps, f"{name}_raw_get_gbps": raw[1].gbps,
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
