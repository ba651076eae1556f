"""``hiradix store stats|verify|gc --config FILE [--delete] [--json]``: L3 maintenance.

* ``stats``: pages and bytes held, in total and per namespace.
* ``verify``: reads every page, checks its header digest, payload checksum and that the
  header's namespace / page key match the store key; reports bad pages and, with
  ``--delete``, deletes them. Exit 1 when a bad page was found (deleted or not).
* ``gc``: deletes pages whose TTL is due (NVMe, memory; Redis expires natively).

Exit codes: 0 ok, 1 invalid config or bad pages found, 2 store unreachable or no store
configured. ``integration/cli.py`` parses the arguments and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hiradix.backends.base import PageStore, StoreKey, split_key
from hiradix.backends.registry import create_store

from hiradix.codec import verify_page
from hiradix.config import ConfigError, load_config
from hiradix.errors import CorruptPage, StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = ["main"]

_VERIFY_BATCH = 32


@dataclass(frozen=True, slots=True)
class BadPage:
    key: StoreKey
    reason: str


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _where(cfg: Any) -> str:
    """Describe the configured store before it exists (for connection errors)."""
    kind = str(getattr(cfg.store.kind, "value", cfg.store.kind))
    if kind == "redis":
        from hiradix.backends.redis_store import redact_url

        label = "redis cluster" if cfg.store.redis.cluster else "redis"
        return f"{label} at {redact_url(cfg.store.redis.url)}"
    if kind == "nvme":
        return f"nvme store at {cfg.store.nvme.path}"
    return f"{kind} store"


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        size /= 1024
    return f"{nbytes} B"


def _stats(store: PageStore, as_json: bool) -> int:
    stats = store.stats()
    if as_json:
        print(
            json.dumps(
                {
                    "store": store.describe(),
                    "pages": stats.pages,
                    "bytes": stats.bytes,
                    "namespaces": {
                        ns: {"pages": p, "bytes": b}
                        for ns, (p, b) in sorted(stats.by_namespace.items())
                    },
                },
                indent=2,
            )
        )
        return 0
    print(f"store: {store.describe()}")
    print(f"pages: {stats.pages}")
    print(f"bytes: {stats.bytes} ({_human(stats.bytes)})")
    for ns, (pages, nbytes) in sorted(stats.by_namespace.items()):
        print(f"  namespace {ns}: {pages} pages, {nbytes} bytes ({_human(nbytes)})")
    return 0


def _check(key: StoreKey, blob: bytes) -> str | None:
    """Why the page under ``key`` is bad, or None when it verifies."""
    try:
        meta = verify_page(blob)
    except CorruptPage as exc:
        return str(exc)
    namespace, page_hex = split_key(key)
    if meta.namespace.hex() != namespace:
        return f"header namespace {meta.namespace.hex()} does not match the key"
    if meta.page_key.hex() != page_hex:
        return f"header page key {meta.page_key.hex()} does not match the key"
    return None


def _batches(keys: Iterator[StoreKey], size: int) -> Iterator[list[StoreKey]]:
    batch: list[StoreKey] = []
    for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _verify(store: PageStore, delete: bool, as_json: bool) -> int:
    checked = 0
    bad: list[BadPage] = []
    # Collect the keys first: deleting while a SCAN / directory walk runs is unsafe.
    for batch in _batches(iter(list(store.scan())), _VERIFY_BATCH):
        for key, blob in zip(batch, store.get_many(batch), strict=True):
            if blob is None:
                continue  # expired or deleted since the scan
            checked += 1
            reason = _check(key, blob)
            if reason is not None:
                bad.append(BadPage(key, reason))
    deleted = store.delete_many([b.key for b in bad]) if delete and bad else 0
    if as_json:
        print(
            json.dumps(
                {
                    "store": store.describe(),
                    "checked": checked,
                    "bad": [{"key": b.key, "reason": b.reason} for b in bad],
                    "deleted": deleted,
                },
                indent=2,
            )
        )
    else:
        for page in bad:
            print(f"bad page {page.key}: {page.reason}")
        summary = f"verified {checked} pages: {checked - len(bad)} ok, {len(bad)} bad"
        print(summary + (f", {deleted} deleted" if delete else ""))
    return 1 if bad else 0


def _gc(store: PageStore, as_json: bool) -> int:
    expired = store.gc(None)
    if as_json:
        print(json.dumps({"store": store.describe(), "expired": expired}))
    else:
        print(f"expired {expired} pages")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one store command; ``args`` has ``store_cmd`` (or ``action``), ``config``,
    ``delete`` and ``json``. Returns the exit code."""
    command = getattr(args, "store_cmd", None) or getattr(args, "action", None)
    if command not in ("stats", "verify", "gc"):
        _err(f"unknown store command {command!r}; valid: stats, verify, gc")
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            _err(line)
        return 1
    kind = str(getattr(cfg.store.kind, "value", cfg.store.kind))
    if kind == "none":
        _err(f"store.kind is 'none' in {args.config}: no L3 store is configured")
        return 2
    where = _where(cfg)
    try:
        store = create_store(cfg.store)
    except StoreUnavailable as exc:
        _err(f"cannot reach {where}: {exc.__cause__ or exc}")
        return 2
    if store is None:  # pragma: no cover - kind none handled above
        return 2
    try:
        if command == "stats":
            return _stats(store, bool(args.json))
        if command == "verify":
            return _verify(store, bool(getattr(args, "delete", False)), bool(args.json))
        return _gc(store, bool(args.json))
    except StoreUnavailable as exc:
        _err(f"cannot reach {store.describe()}: {exc.__cause__ or exc}")
        return 2
    finally:
        store.close()
