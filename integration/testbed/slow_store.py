"""Testbed only: make the configured L3 store answer slowly (a slow Redis, a cold disk).

With ``HIRADIX_TESTBED_STORE_LATENCY_S=<seconds>`` in a server's environment, every store
that hiradix builds in that process (in the TP ranks listed in
``HIRADIX_TESTBED_STORE_LATENCY_RANKS``, when set) is wrapped in
:class:`~hiradix.backends.faults.FaultyStore`, which adds that many seconds to every
store call (lookups, reads and writes). ``benchmarks/bench_multiturn.py`` uses it for its
``hiradix_slow`` server, which shows the cost model at work: hiradix measures the store
and recomputes instead of waiting on it, so TTFT stays with recomputing's.

The testbed's entry point ``hiradix_slow_store`` registers it, in servers started by
:mod:`.sglang_server` only (an installed hiradix declares no such entry point); without
the variable it does nothing, and ``--enable-hiradix`` never depends on it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

ENV = "HIRADIX_TESTBED_STORE_LATENCY_S"
RANKS_ENV = "HIRADIX_TESTBED_STORE_LATENCY_RANKS"  # optional: only these TP ranks are slow

_registered = False


def latency_from_env() -> float | None:
    """The latency the variable asks for (None when unset); ``ValueError`` naming the
    variable, its value and what is allowed otherwise."""
    text = os.environ.get(ENV, "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{ENV}={text!r} is not allowed; allowed: seconds >= 0, or unset")
    return value


def _this_rank_is_slow() -> bool:
    """With ``HIRADIX_TESTBED_STORE_LATENCY_RANKS=1,3`` only those TP ranks are slow."""
    ranks = os.environ.get(RANKS_ENV, "").strip()
    if not ranks:
        return True
    try:
        from sglang.srt.runtime_context import get_parallel

        rank = int(get_parallel().tp_rank)
    except Exception:  # noqa: BLE001 - no parallel context: a single rank, rank 0
        rank = 0
    return str(rank) in {r.strip() for r in ranks.split(",")}


def register() -> None:
    """Entry point (every process of a testbed server): wrap the store factory if asked."""
    global _registered
    latency = latency_from_env()
    if _registered or latency is None:
        return
    from hiradix.backends import registry
    from hiradix.backends.faults import FaultyStore

    create = registry.create_store

    def create_slow_store(store_config: Any, *, clock: Callable[[], float] = time.time) -> Any:
        store = create(store_config, clock=clock)
        if store is None or not _this_rank_is_slow():
            return store
        return FaultyStore(store, latency_s=latency)

    registry.create_store = create_slow_store
    _registered = True
    logger.info("hiradix testbed: every L3 store call takes %.3f s longer (pid %d)",
                latency, os.getpid())  # fmt: skip
