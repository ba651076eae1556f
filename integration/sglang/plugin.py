"""SGLang plugin entry point: registers the ``hiradix`` radix-cache backend and the
``--enable-hiradix`` / ``--hiradix-config`` server flags in every SGLang process.

SGLang 0.5.23 calls ``register()`` (entry-point group ``sglang.srt.plugins``) first thing in
the launcher, in each scheduler process and in the detokenizer (processes are spawned, so
registration made at run time in a parent would be lost). The flags ride on two hooks:
``ServerArgs.add_cli_args`` (AFTER: add them to the parser) and ``ServerArgs.from_cli_args``
(BEFORE: map ``--enable-hiradix`` onto ``--radix-cache-backend hiradix`` and check the
config file once, in the launcher, so that a bad config fails before any process starts).
AROUND hooks on the scheduler's weight-update handlers move the cache to a new weights
epoch (``weight_epochs.py``); AROUND hooks on its HiCache admin handlers switch the L3
store of a running server (``store_admin.py``).
The config path reaches the scheduler processes through ``HIRADIX_CONFIG`` in the
environment, which spawned children inherit.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
from typing import Any

logger = logging.getLogger(__name__)

BACKEND_NAME = "hiradix"
CONFIG_ENV = "HIRADIX_CONFIG"
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
# once per scheduler iteration, on every TP rank, before any rank-local decision: the
# point where SGLang's own HiCache runs its TP-wide consensus, and where hiradix's step runs
SCHEDULER_STEP = "sglang.srt.managers.scheduler.Scheduler._process_hicache_events"

_registered = False


def register() -> None:
    """Idempotent: safe to call from every process, any number of times."""
    global _registered
    if _registered:
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _check_hook_targets()
    try:
        register_radix_cache_backend(BACKEND_NAME, create_cache)
    except ValueError:
        pass  # already registered in this process
    HookRegistry.register(ADD_CLI_ARGS, _add_cli_args, HookType.AFTER)
    HookRegistry.register(FROM_CLI_ARGS, _map_cli_args, HookType.BEFORE)
    HookRegistry.register(SCHEDULER_INIT, _after_scheduler_init, HookType.AFTER)
    HookRegistry.register(SCHEDULER_STEP, _after_hicache_events, HookType.AFTER)
    from hiradix.integration.sglang.weight_epochs import HOOKS

    for target, hook in HOOKS.items():  # weight updates start a new weights epoch
        HookRegistry.register(target, hook, HookType.AROUND)
    from hiradix.integration.sglang.store_admin import HOOKS as STORE_HOOKS
    from hiradix.integration.sglang.store_admin import HTTP_HOOKS

    for target, hook in STORE_HOOKS.items():  # SGLang's HiCache admin API switches L3 stores
        HookRegistry.register(target, hook, HookType.AROUND)
    if multiprocessing.parent_process() is None:  # the launcher, where the HTTP server runs
        for target, hook in HTTP_HOOKS.items():
            HookRegistry.register(target, hook, HookType.BEFORE)
    _registered = True


def _check_hook_targets() -> None:
    """The hooks name SGLang internals: fail loudly if this SGLang moved them."""
    import pkgutil

    from hiradix.integration.sglang.store_admin import HOOKS as STORE_HOOKS
    from hiradix.integration.sglang.weight_epochs import HOOKS

    targets = (ADD_CLI_ARGS, FROM_CLI_ARGS, SCHEDULER_INIT, SCHEDULER_STEP, *HOOKS, *STORE_HOOKS)
    for target in targets:
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(
                f"hiradix: SGLang has no {target} (hiradix needs sglang==0.5.23)"
            ) from exc


def _add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    group = parser.add_argument_group("hiradix (hierarchical radix KV cache)")
    group.add_argument(
        "--enable-hiradix",
        action="store_true",
        help="Use hiradix as the prefix cache (GPU + host memory + Redis/NVMe tiers).",
    )
    group.add_argument(
        "--hiradix-config",
        type=str,
        default=None,
        help="hiradix YAML config (tier sizes, store, TTLs, policies). "
        "Default: the embedded default config.",
    )


def _map_cli_args(cls: Any, args: argparse.Namespace, *rest: Any, **kwargs: Any) -> None:
    if not getattr(args, "enable_hiradix", False):
        if getattr(args, "hiradix_config", None):
            raise SystemExit("error: --hiradix-config needs --enable-hiradix")
        return
    backend = getattr(args, "radix_cache_backend", None)
    if backend not in (None, BACKEND_NAME):
        raise SystemExit(
            f"error: --enable-hiradix conflicts with --radix-cache-backend={backend!r}"
        )
    if getattr(args, "enable_hierarchical_cache", False):
        raise SystemExit(
            "error: --enable-hiradix replaces --enable-hierarchical-cache; "
            "size hiradix's host tier in its config file instead"
        )
    args.radix_cache_backend = BACKEND_NAME
    path = args.hiradix_config
    from hiradix.config import ConfigError, load_config, load_default_config

    try:
        config = load_config(path) if path else load_default_config()
    except ConfigError as exc:
        raise SystemExit(f"error: hiradix config: {exc}") from None
    os.environ[CONFIG_ENV] = os.path.abspath(path) if path else ""
    logger.info("hiradix enabled with config %s", config.source)


def _after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """With an L3 store, turn on SGLang's storage-prefetch calls: ``prefetch_from_storage``
    when a request arrives and ``check_prefetch_progress`` before it is scheduled."""
    cache = getattr(scheduler, "tree_cache", None)
    if getattr(cache, "wants_storage_prefetch", False):
        scheduler.enable_hicache_storage = True
        cache.waiting = lambda: scheduler.waiting_queue  # admission and staging read it
        logger.info("hiradix: L3 prefetch on request arrival enabled")


def _after_hicache_events(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """hiradix's agreed step (``HiRadixCache.step``), once per scheduler iteration."""
    step = getattr(getattr(scheduler, "tree_cache", None), "step", None)
    if step is not None:
        step()


def load_process_config() -> Any:
    """The config this SGLang process was started with (embedded default if none)."""
    from hiradix.config import load_config, load_default_config

    path = os.environ.get(CONFIG_ENV) or None
    return load_config(path) if path else load_default_config()


def create_cache(ctx: Any) -> Any:
    """``RadixCacheFactory`` for SGLang's registry (runs in each scheduler process)."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        raise ValueError(
            "hiradix supports full-attention KV caches only; this model has sliding-window, "
            "mamba or DSA state. Drop --enable-hiradix for it."
        )
    if ctx.enable_hierarchical_cache:
        raise ValueError("hiradix replaces --enable-hierarchical-cache; drop that flag")
    from hiradix.integration.sglang.factory import build_cache

    return build_cache(ctx, load_process_config())
