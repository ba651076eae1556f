"""Builds hiradix's cache for one SGLang scheduler process from the build context."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from hiradix.integration.sglang.cache import HiRadixCache

logger = logging.getLogger(__name__)


def model_identity(ctx: Any) -> str:
    """What makes KV reusable across servers: the model (architecture, its config's
    digest, dtype) and this rank's shard of it. Two servers share L3 pages only when this
    string and the tenant namespace match."""
    mc = getattr(ctx, "model_config", None)
    hf = getattr(mc, "hf_config", None)
    try:
        hf_text = hf.to_json_string(use_diff=False) if hf is not None else ""
    except Exception:  # noqa: BLE001 - a config that cannot serialise itself: use its repr
        hf_text = repr(hf)
    digest = hashlib.blake2b(hf_text.encode(), digest_size=8).hexdigest()
    arch = ",".join(getattr(hf, "architectures", None) or ["?"])
    dtype = str(getattr(mc, "dtype", "?")).replace("torch.", "")
    identity = f"{arch}/{digest}/{dtype}/tp{ctx.tp_rank}of{ctx.tp_size}"
    pp_rank, pp_size = pipeline_stage()
    if pp_size > 1:  # each stage holds other layers' KV: its own pages
        identity += f"/pp{pp_rank}of{pp_size}"
    return identity


def pipeline_stage() -> tuple[int, int]:
    """This process's pipeline stage and the number of stages (0, 1 without PP)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return int(getattr(parallel, "pp_rank", 0) or 0), int(getattr(parallel, "pp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - no parallel context (in-process tests): one stage
        return 0, 1


def store_shard(ctx: Any) -> tuple[int, int]:
    """This rank's index among all TP x PP ranks, and their number (for per-rank store
    directories and capacity shares)."""
    pp_rank, pp_size = pipeline_stage()
    tp_size = int(getattr(ctx, "tp_size", 1) or 1)
    return pp_rank * tp_size + int(getattr(ctx, "tp_rank", 0) or 0), tp_size * pp_size


def build_cache(ctx: Any, config: Any) -> HiRadixCache:
    runner = getattr(ctx.tp_worker, "model_runner", None)
    cache = HiRadixCache(
        ctx.params,
        config,
        forward_stream=getattr(runner, "forward_stream", None),
        metric_labels={"tp_rank": str(ctx.tp_rank)},
        model_id=model_identity(ctx),
        tp_group=getattr(ctx.params, "tp_cache_group", None),
        shard=store_shard(ctx),
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
