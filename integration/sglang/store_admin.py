"""Changing the L3 store of a running server: SGLang's HiCache admin API, served by hiradix.

SGLang exposes ``PUT /hicache/storage-backend`` (attach), ``DELETE`` (detach), ``GET`` and
``POST /hicache/storage-backend/clear``, behind ``--admin-api-key``. Each request is
broadcast to every TP rank's scheduler and handled inside its request dispatch by
``Scheduler.attach_hicache_storage_wrapped`` / ``detach_hicache_storage_wrapped`` /
``clear_hicache_storage_wrapped``, which refuse unless HiCache is on and the server is
fully idle. The hooks below (AROUND) take those requests when the tree cache is hiradix's,
and ``Scheduler.get_internal_state`` (``GET /server_info``) gains a ``hiradix_store``
entry: the store in use, its circuit breaker and its counters. In the launcher, the route
of ``GET /hicache/storage-backend`` (SGLang's answer: the tokenizer's record of the last
attach) is replaced by one that adds that entry per scheduler.

hiradix needs no idle server. The handler only validates (the ``store:`` section is
parsed by :func:`hiradix.config.parse_config`, as a config file is: same messages) and the
ranks agree on the verdict (a MIN over them: every rank is in the handler). The switch
itself is applied inside the agreed step (``HiRadixCache.step``), so every rank swaps
between the same two steps. At the swap the old :class:`~hiradix.storage_tier.StorageTier`
is *retired*: its jobs that have not started do no IO (lookups and reads become misses,
queued writes are dropped), running ones finish against the old store object, and its
waiting lookups are abandoned (their reserved host slots are freed when they complete).
The new store starts with no memory of what was written or found absent. The old store is
closed once its last job is applied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from hiradix.config import ConfigError, HiradixConfig, StoreKind, config_to_dict, parse_config
from hiradix.config_schema import redact_url
from hiradix.storage_tier import StorageTier
from hiradix.transfer import IoResult

logger = logging.getLogger(__name__)

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ATTACH = f"{SCHEDULER}.attach_hicache_storage_wrapped"
DETACH = f"{SCHEDULER}.detach_hicache_storage_wrapped"
CLEAR = f"{SCHEDULER}.clear_hicache_storage_wrapped"
STATE = f"{SCHEDULER}.get_internal_state"
SOURCE = "PUT /hicache/storage-backend"
STATUS_KEY = "hiradix_store"
#: counters reported per store, since it was attached
STORE_COUNTERS = (
    "l2_to_l3_tokens",
    "l3_put_bytes",
    "l3_to_l2_tokens",
    "l3_get_bytes",
    "l3_hit_tokens",
    "l3_errors",
    "l3_dropped_writes",
    "l3_corrupt_pages",
)
CLEAR_BATCH = 512  # keys per delete_many while clearing


def parse_store_request(
    base: HiradixConfig, backend: str, extra_json: str | None, *, base_dir: str = "."
) -> HiradixConfig:
    """``base`` with its ``store`` section replaced by the one in ``extra_json`` (hiradix's
    ``store:`` section as JSON, or ``{"store": {...}}``) and ``store.kind = backend``.
    Raises :class:`ConfigError` with the config file's messages."""
    try:
        section: Any = json.loads(extra_json) if extra_json else {}
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(
            f"hicache_storage_backend_extra_config_json is not valid JSON ({exc}); allowed: "
            "hiradix's store section as a JSON object",
            source=SOURCE,
        ) from None
    if isinstance(section, Mapping) and set(section) == {"store"}:
        section = section["store"]
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"hicache_storage_backend_extra_config_json holds {type(section).__name__}; "
            "allowed: hiradix's store section as a JSON object",
            source=SOURCE,
        )
    kind = section.get("kind", backend)
    if kind != backend:
        raise ConfigError(
            f"config key 'store.kind': value {kind!r} differs from hicache_storage_backend "
            f"{backend!r}; allowed: the same kind, or no store.kind",
            source=SOURCE,
        )
    data = config_to_dict(base)
    data["store"] = {**section, "kind": backend}
    config = parse_config(data, source=SOURCE, base_dir=base_dir)
    return dataclasses.replace(config, source=f"{base.source} + {SOURCE}")


def describe_store(config: HiradixConfig) -> str:
    """Where a store config points (no credentials)."""
    store = config.store
    kind = store.kind.value
    if kind == "nvme":
        return f"nvme store at {store.nvme.path}"
    if kind == "redis":
        cluster = " cluster" if store.redis.cluster else ""
        return f"redis{cluster} at {redact_url(store.redis.url)} (keys {store.redis.key_prefix}*)"
    if kind == "memory":
        return "in-process memory store"
    return "no L3 store"


class StoreAdmin:
    """Mixin of :class:`~hiradix.integration.sglang.cache.HiRadixCache`: attach, detach and
    clear the L3 store at run time. Requests are queued by the scheduler's handlers and
    applied at the agreed step (``apply_store_ops``)."""

    _store_ops: list[tuple[str, HiradixConfig | None]] = []  # noqa: RUF012 - replaced per instance
    _retired_stores: list[StorageTier] = []  # noqa: RUF012 - replaced per instance
    _store_since: dict[str, int] = {}  # noqa: RUF012 - replaced per instance
    store_switches = 0
    store_cleared_pages = 0

    # ------------------------------------------------------------------ requests
    def _ranks_agree(self: Any, ok: bool) -> bool:
        """Every TP rank is in the same handler now: all accept, or all refuse."""
        if self._tp_size() > 1:
            return bool(self._reduce_min([int(ok)])[0])
        return ok

    def _check_store_config(self: Any, config: HiradixConfig) -> None:
        """What the config file cannot know: this server's host tier and page size, the
        MAC key's environment variable. Raises :class:`ConfigError`."""
        store = config.store
        if self.disable:
            raise ConfigError("the radix cache is disabled (--disable-radix-cache)", source=SOURCE)
        if store.kind is StoreKind.NONE:
            return
        if getattr(self, "pp_size", 1) > 1:
            raise ConfigError(
                f"store.kind {store.kind.value!r}: an L3 store is not supported with pipeline "
                "parallelism (--pp-size > 1); allowed: none",
                source=SOURCE,
            )
        if self.slab is None:
            raise ConfigError(
                f"store.kind {store.kind.value!r} needs hiradix's host tier, and this server "
                "runs without one (host.size 0 at start); allowed: none",
                source=SOURCE,
            )
        if store.block_tokens % self.page_size:
            raise ConfigError(
                f"config key 'store.block_tokens': value {store.block_tokens}; allowed: a "
                f"multiple of this server's --page-size {self.page_size}",
                source=SOURCE,
            )
        store.mac_key()  # an unset or short variable is an error now, not at the first write
        if store.kind is StoreKind.REDIS:
            store.redis.password()  # likewise: the store would be built (and fail) at first use

    def admin_attach(self: Any, backend: str, extra_json: str | None) -> tuple[bool, str]:
        """Validate an attach request and queue the switch for the next agreed step;
        nothing changes when it is refused. Returns (accepted, message)."""
        error, config = "", None
        try:
            config = parse_store_request(self.config, backend, extra_json, base_dir=os.getcwd())
            self._check_store_config(config)
        except (ConfigError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the scheduler
            logger.warning("hiradix: attach request refused: %r", exc)
            error = f"hiradix: the attach request could not be read: {exc!r}"
        if not self._ranks_agree(not error):
            return False, error or "hiradix: another TP rank refused this store config"
        assert config is not None
        self._store_ops = [*self._store_ops, ("attach", config)]
        where = describe_store(config)
        logger.info("hiradix: switching the L3 store to %s at the next step", where)
        return True, f"hiradix: L3 store switches to {where} at the next scheduler step"

    def admin_detach(self: Any) -> tuple[bool, str]:
        """Queue a detach for the next agreed step (reads agreed state only: every rank
        answers the same)."""
        if self.storage is None and not any(op == "attach" for op, _ in self._store_ops):
            return True, "hiradix: no L3 store attached"
        self._store_ops = [*self._store_ops, ("detach", None)]
        logger.info("hiradix: detaching the L3 store at the next step")
        return True, "hiradix: L3 store detached at the next scheduler step; L1/L2 keep serving"

    def admin_clear(self: Any) -> tuple[bool, str]:
        if self.storage is None and not self._store_ops:
            return False, "hiradix: no L3 store attached"
        self._store_ops = [*self._store_ops, ("clear", None)]
        return True, "hiradix: L3 store cleared at the next scheduler step"

    # ------------------------------------------------------------------ the agreed step
    def apply_store_ops(self: Any) -> None:
        """Inside the agreed step, on every rank at the same step: apply queued requests in
        order, and close retired stores whose last job has been applied."""
        ops, self._store_ops = self._store_ops, []
        for op, config in ops:
            if op == "clear":
                self._clear_store()
            else:
                self._switch_store(config)
        if self._retired_stores:
            waiting = []
            for tier in self._retired_stores:
                if tier.pending_jobs > 0:
                    waiting.append(tier)
                else:
                    _close(tier)
            self._retired_stores = waiting

    def _switch_store(self: Any, config: HiradixConfig | None) -> None:
        old: StorageTier | None = self.storage
        # the tree may hold KV of older weights: the new store stays off until the next
        # flush, whether or not a store was attached when the weights changed
        suspended = self.tree_stale or (old is not None and old.suspended)
        if old is not None:
            old.retired = True
            for request_id in list(old.prefetches):
                old.forget(request_id)  # done: slots freed; running: freed when applied
            old._written.clear()
            old._absent.clear()
            self._retired_stores = [*self._retired_stores, old]
            self.storage = None
        if config is None or config.store.kind is StoreKind.NONE:
            self._pending_save = []  # host pages waiting for an L3 write: none to go to
            none = dataclasses.replace(self.config.store, kind=StoreKind.NONE)
            self.config = dataclasses.replace(self.config, store=none)
        else:
            self.config = config
            self._init_store(self.model_id, config)
            self.storage.suspended = suspended
        self.store_switches += 1
        self._store_since = {name: self.stats.counters.get(name, 0) for name in STORE_COUNTERS}
        logger.info(
            "hiradix: L3 store is now %s (switch %d, step at %.3f)",
            describe_store(self.config),
            self.store_switches,
            self.now,
        )

    def _clear_store(self: Any) -> None:
        """Forget what the store held (agreed state, now) and delete every page under this
        store's key prefix (a write-lane job; pages being written meanwhile may survive)."""
        tier: StorageTier | None = self.storage
        if tier is None:
            return
        tier._written.clear()
        tier._absent.clear()
        kv_log = getattr(self, "_kv_log", None)
        if kv_log is not None:  # routers: this store's pages are gone (kv_events.py)
            kv_log.store_cleared()
        store = tier.store

        def job() -> IoResult:
            if tier.retired:
                return IoResult(-1)
            keys = list(store.scan())
            deleted = 0
            for start in range(0, len(keys), CLEAR_BATCH):
                deleted += store.delete_many(keys[start : start + CLEAR_BATCH])
            return IoResult(deleted)

        def done(result: IoResult | None, error: BaseException | None) -> None:
            # writes applied since the request may have been deleted by the scan: forget
            # them (later writes did no IO while clearing, see ``StorageTier.clearing``)
            tier.clearing -= 1
            tier._written.clear()
            if kv_log is not None and tier is self.storage:
                kv_log.store_cleared()
            if error is not None:
                logger.warning("hiradix: clearing the L3 store failed: %r", error)
                return
            count = max(0, (result or IoResult(-1)).count)
            self.store_cleared_pages += count
            logger.info("hiradix: L3 store cleared (%d pages)", count)

        tier.clearing += 1
        tier._submit(job, done, lane="write")

    # ------------------------------------------------------------------ status
    def store_status(self: Any) -> dict[str, Any]:
        """The store in use and its health (plain values: it crosses processes)."""
        tier: StorageTier | None = self.storage
        counters = self.stats.counters
        status: dict[str, Any] = {
            "kind": self.config.store.kind.value,
            "store": describe_store(self.config),
            "switches": self.store_switches,
            "pending": [op for op, _ in self._store_ops],
            "retired_stores_with_jobs": len(self._retired_stores),
            "cleared_pages": self.store_cleared_pages,
            "since_attach": {
                name: counters.get(name, 0) - self._store_since.get(name, 0)
                for name in STORE_COUNTERS
            },
        }
        if tier is not None:
            breaker = tier.breaker
            status.update(
                block_tokens=tier.block,
                breaker=breaker.state.value,
                breaker_failures=breaker.failures,
                breaker_opens=breaker.opens,
                breaker_short_circuited=breaker.short_circuited,
                queued_write_pages=tier._queued_pages,
                pages_known_written=len(tier._written),
                lookups_in_flight=len(tier.prefetches),
                suspended=tier.suspended,
            )
        return status


def _close(tier: StorageTier) -> None:
    try:
        tier.store.close()
    except Exception as exc:  # noqa: BLE001 - a dead store must not fail the step
        logger.debug("hiradix: closing a retired L3 store: %r", exc)


# ---------------------------------------------------------------------- scheduler hooks
def _cache(scheduler: Any) -> Any:
    cache = getattr(scheduler, "tree_cache", None)
    return cache if hasattr(cache, "admin_attach") else None


def _enable_prefetch_calls(scheduler: Any, cache: Any) -> None:
    """A store attached to a server started without one: turn SGLang's storage-prefetch
    calls on, as ``plugin._after_scheduler_init`` does at start."""
    # the store is built at the next step: ``wants_storage_prefetch`` cannot tell yet
    if not getattr(scheduler, "enable_hicache_storage", False):
        scheduler.enable_hicache_storage = True
        cache.waiting = lambda: scheduler.waiting_queue


def _attach(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    cache = _cache(scheduler)
    if cache is None:
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import AttachHiCacheStorageReqOutput

    ignored = [
        name
        for name in ("hicache_storage_prefetch_policy", "hicache_write_policy")
        if getattr(recv_req, name, None) is not None
    ]
    if ignored:  # the same request on every rank: every rank refuses here
        message = (
            f"{', '.join(ignored)}: SGLang HiCache settings; allowed: unset (hiradix's wait "
            "mode and write policy are prefetch.wait and write_policy in its config file)"
        )
        return AttachHiCacheStorageReqOutput(success=False, message=message)
    ok, message = cache.admin_attach(
        recv_req.hicache_storage_backend, recv_req.hicache_storage_backend_extra_config_json
    )
    if ok and (recv_req.hicache_storage_backend != "none" or cache.wants_storage_prefetch):
        _enable_prefetch_calls(scheduler, cache)
    return AttachHiCacheStorageReqOutput(success=ok, message=message)


def _detach(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    cache = _cache(scheduler)
    if cache is None:
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import DetachHiCacheStorageReqOutput

    ok, message = cache.admin_detach()
    return DetachHiCacheStorageReqOutput(success=ok, message=message)


def admin_key_configured() -> bool:
    """Whether the server was started with ``--admin-api-key``."""
    try:
        from sglang.srt.runtime_context import get_serving

        return bool(get_serving().admin_api_key)
    except Exception:  # noqa: BLE001 - no serving context: no key
        return False


def _clear(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    cache = _cache(scheduler)
    if cache is None:
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import ClearHiCacheReqOutput

    if not admin_key_configured():
        # SGLang's clear route, unlike attach and detach, does not insist on an admin key;
        # hiradix's clear deletes every page under the store's prefix, which a fleet may
        # share, so it does (the same answer on every rank: the same server arguments)
        logger.warning("hiradix: refused to clear the L3 store: the server has no --admin-api-key")
        return ClearHiCacheReqOutput(success=False)
    ok, message = cache.admin_clear()
    logger.info("%s", message)
    return ClearHiCacheReqOutput(success=ok)


def _state(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(scheduler, *args, **kwargs)
    cache = _cache(scheduler)
    state = getattr(result, "internal_state", None)
    if cache is not None and isinstance(state, dict):
        state[STATUS_KEY] = cache.store_status()
    return result


#: target -> AROUND hook (registered by ``plugin.register``)
HOOKS = {ATTACH: _attach, DETACH: _detach, CLEAR: _clear, STATE: _state}


# ---------------------------------------------------------------------- the HTTP server
HTTP_LAUNCH = "sglang.srt.entrypoints.http_server.launch_server"
STATUS_PATH = "/hicache/storage-backend"


def _before_http_launch(*args: Any, **kwargs: Any) -> None:
    """BEFORE ``launch_server`` (the launcher process): ``GET /hicache/storage-backend``
    also reports each scheduler's store and its health (``hiradix_store``). SGLang's own
    answer is the tokenizer's record of the last attach request; its route is replaced by
    one that adds the schedulers' view (same path, same auth level). If this SGLang's app
    looks different, the GET keeps SGLang's answer and ``/server_info`` still has it."""
    try:
        _wrap_status_route()
    except Exception as exc:  # noqa: BLE001 - a cosmetic failure must not stop the server
        logger.warning("hiradix: GET %s keeps SGLang's answer: %r", STATUS_PATH, exc)


def _wrap_status_route() -> None:
    from fastapi.routing import APIRoute
    from sglang.srt.entrypoints import http_server

    routes = http_server.app.router.routes
    for index, route in enumerate(routes):
        if isinstance(route, APIRoute) and route.path == STATUS_PATH and route.methods == {"GET"}:
            break
    else:
        raise LookupError(f"no GET {STATUS_PATH} route")
    original = route.endpoint

    async def hicache_storage_backend_status() -> Any:
        answer = await original()
        if not isinstance(answer, dict):  # refused (no admin key configured): as SGLang
            return answer
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        stores = [state.get(STATUS_KEY) for state in states]
        if any(store is not None for store in stores):
            answer[STATUS_KEY] = stores  # one per scheduler (data-parallel rank)
        return answer

    hicache_storage_backend_status.__doc__ = original.__doc__
    level = getattr(original, "_auth_level", None)
    if level is not None:
        hicache_storage_backend_status._auth_level = level  # type: ignore[attr-defined]
    routes[index] = APIRoute(
        STATUS_PATH, hicache_storage_backend_status, methods=["GET"], name=route.name
    )


#: target -> BEFORE hook, registered in the launcher process only (it runs the HTTP server)
HTTP_HOOKS = {HTTP_LAUNCH: _before_http_launch}
