"""Weight updates move hiradix to a new weights epoch.

SGLang changes a running server's weights through the scheduler's weight-update manager
(``managers/scheduler_components/weight_updater.py:SchedulerWeightUpdaterManager``):
``update_weights_from_disk``, ``update_weights_from_tensor``,
``update_weights_from_distributed``, ``update_weights_from_ipc``, and a
``begin_weight_update`` / ``end_weight_update`` session in which the weights may be
written out of band (P2P/RDMA: ``end_weight_update`` then runs the post-load step and
nothing else). Each handler runs on every TP rank, in the same order of the request
stream, inside the scheduler's request dispatch; the hooks below wrap them (AROUND),
so every rank moves to the new epoch at the same point.

A new epoch (``HiRadixCache.new_weights_epoch``) gives the model identity new
``weights`` (the fingerprint of the new files after ``update_weights_from_disk``, an
agreed random nonce otherwise) and the current ``--weight-version``: the namespace of
every L3 page key changes, so pages of the old weights are never read again (the store
reclaims them by TTL and capacity), and what was written or found absent is forgotten.
L1 and L2 are dropped by SGLang's own ``flush_cache`` (``reset``), which the update
handlers call when the server is idle. When it did not run (requests in flight, or
``flush_cache: false``), the tree still holds the old weights' KV as SGLang's own cache
does: hiradix then neither reads nor writes L3 until the next ``flush_cache``.

``/update_weight_version`` alone (no new weights) relabels: the identity takes the new
version, L1 and L2 stay (their KV is the current weights').
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
FROM_DISK = f"{UPDATER}.update_weights_from_disk"
FROM_TENSOR = f"{UPDATER}.update_weights_from_tensor"
FROM_DISTRIBUTED = f"{UPDATER}.update_weights_from_distributed"
FROM_IPC = f"{UPDATER}.update_weights_from_ipc"
END_SESSION = f"{UPDATER}.end_weight_update"
VERSION = "sglang.srt.managers.scheduler.Scheduler.handle_update_weight_version"


def _cache(scheduler: Any) -> Any:
    cache = getattr(scheduler, "tree_cache", None)
    if cache is None or getattr(cache, "disable", True) or not hasattr(cache, "new_weights_epoch"):
        return None
    return cache


def agreed_nonce(cache: Any) -> str:
    """A random nonce that every TP rank of this instance takes (MIN over the ranks): the
    weights of an update hiradix cannot fingerprint are never shared with another server
    or a restart, and the ranks of this one agree."""
    value = secrets.randbits(62)
    if cache._tp_size() > 1:  # every TP rank is in this handler now (the pipeline stages
        # need no nonce in common: with PP there is no store, and the rest is per stage)
        value = cache._reduce_min([value])[0]
    return f"{value:016x}"


def _server_args(scheduler: Any) -> Any:
    args = getattr(scheduler, "server_args", None)
    if args is None:
        try:
            from sglang.srt.runtime_context import get_server_args

            args = get_server_args()
        except Exception:  # noqa: BLE001 - no published context: defaults
            args = None
    return args


def _epoch(
    manager: Any, cache: Any, resets: int, weights: Callable[[str], str] | None, why: str
) -> None:
    """Move ``cache`` to a new epoch after a handler ran. ``weights(nonce)``: the new
    weights field (default: the nonce). The nonce is agreed first, unconditionally, so
    that every rank makes the same collective whatever its own files say."""
    from hiradix.integration.sglang.factory import current_weight_version

    scheduler = manager.scheduler
    flushed = cache.resets != resets  # the handler's flush_cache reset the tree
    nonce = f"nonce:{agreed_nonce(cache)}"
    new_weights = weights(nonce) if weights is not None else nonce
    cache.new_weights_epoch(
        new_weights,
        current_weight_version(_server_args(scheduler)),
        stale=not flushed,
        why=why,
    )


def _from_disk(original: Callable[..., Any], manager: Any, recv_req: Any, *a: Any, **k: Any) -> Any:
    cache = _cache(getattr(manager, "scheduler", None))
    if cache is None:
        return original(manager, recv_req, *a, **k)
    resets = cache.resets
    result = original(manager, recv_req, *a, **k)

    def fingerprint(nonce: str) -> str:
        from hiradix.integration.sglang.factory import weights_of

        if not getattr(result, "success", False):  # maybe half loaded: no known weights
            return nonce
        args = _server_args(manager.scheduler)
        load_format = recv_req.load_format or getattr(args, "load_format", None) or "auto"
        download = getattr(args, "download_dir", None)
        return weights_of(recv_req.model_path, load_format, None, download)

    _epoch(manager, cache, resets, fingerprint, f"update_weights_from_disk({recv_req.model_path})")
    return result


def _in_session(
    original: Callable[..., Any], manager: Any, recv_req: Any, *a: Any, **k: Any
) -> Any:
    """``update_weights_from_tensor`` / ``_from_distributed``: outside a session SGLang
    refuses before touching the weights (no new epoch)."""
    cache = _cache(getattr(manager, "scheduler", None))
    if cache is None or getattr(manager, "_session", None) is None:
        return original(manager, recv_req, *a, **k)
    resets = cache.resets
    result = original(manager, recv_req, *a, **k)
    name = getattr(original, "__name__", "update_weights")
    _epoch(manager, cache, resets, None, name)
    return result


def _from_ipc(original: Callable[..., Any], manager: Any, recv_req: Any, *a: Any, **k: Any) -> Any:
    cache = _cache(getattr(manager, "scheduler", None))
    if cache is None:
        return original(manager, recv_req, *a, **k)
    resets = cache.resets
    result = original(manager, recv_req, *a, **k)
    _epoch(manager, cache, resets, None, "update_weights_from_ipc")
    return result


def _end_session(
    original: Callable[..., Any], manager: Any, recv_req: Any, *a: Any, **k: Any
) -> Any:
    """A session that loaded nothing through SGLang had its weights written out of band
    (P2P/RDMA): a new epoch. One that loaded through SGLang moved the epoch then."""
    cache = _cache(getattr(manager, "scheduler", None))
    session = getattr(manager, "_session", None)
    if cache is None or session is None or getattr(session, "loaded_weights", True):
        return original(manager, recv_req, *a, **k)
    resets = cache.resets
    result = original(manager, recv_req, *a, **k)
    _epoch(manager, cache, resets, None, "end_weight_update (weights written out of band)")
    return result


def _version(original: Callable[..., Any], scheduler: Any, recv_req: Any, *a: Any, **k: Any) -> Any:
    """``/update_weight_version``: the same weights under a new label."""
    cache = _cache(scheduler)
    result = original(scheduler, recv_req, *a, **k)
    if cache is not None and cache.identity is not None:
        from hiradix.integration.sglang.factory import current_weight_version

        version = current_weight_version(_server_args(scheduler))
        if version != cache.identity.weight_version:
            cache.new_weights_epoch(
                cache.identity.weights, version, stale=False, why="update_weight_version"
            )
    return result


#: hook target -> AROUND hook
HOOKS: dict[str, Callable[..., Any]] = {
    FROM_DISK: _from_disk,
    FROM_TENSOR: _in_session,
    FROM_DISTRIBUTED: _in_session,
    FROM_IPC: _from_ipc,
    END_SESSION: _end_session,
    VERSION: _version,
}
