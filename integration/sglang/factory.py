"""Builds hiradix's cache for one SGLang scheduler process from the build context."""

from __future__ import annotations

import logging
from typing import Any

from hiradix.integration.sglang.cache import HiRadixCache

logger = logging.getLogger(__name__)


def build_cache(ctx: Any, config: Any) -> HiRadixCache:
    runner = getattr(ctx.tp_worker, "model_runner", None)
    cache = HiRadixCache(
        ctx.params,
        config,
        forward_stream=getattr(runner, "forward_stream", None),
        metric_labels={"tp_rank": str(ctx.tp_rank)},
    )
    logger.info(
        "hiradix: tree ready (page_size=%d, eviction=%s, tp_rank=%d/%d, config=%s)",
        cache.page_size,
        config.eviction_policy.value,
        ctx.tp_rank,
        ctx.tp_size,
        config.source,
    )
    return cache
