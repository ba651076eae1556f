"""Testbed only: make the configured L3 store answer slowly (a slow Redis, a cold disk).

With ``HIRADIX_TESTBED_STORE_LATENCY_S=<seconds>`` in a server's environment, every store
that hiradix builds in that process is wrapped in
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
        return None if store is None else FaultyStore(store, latency_s=latency)

    registry.create_store = create_slow_store
    _registered = True
    logger.info("hiradix testbed: every L3 store call takes %.3f s longer (pid %d)",
                latency, os.getpid())  # fmt: skip
