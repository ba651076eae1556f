"""Builds hiradix's cache for one SGLang scheduler process from the build context, and
the model identity that seeds its L3 page keys (:mod:`hiradix.identity`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from typing import Any

import torch
from hiradix.integration.sglang.cache import HiRadixCache
from hiradix.integration.sglang.pool_support import replicated_kv

from hiradix.identity import ModelIdentity, digest_file, snapshot_revision, weights_id

logger = logging.getLogger(__name__)

#: load formats that read the weights from the files at --model-path (the others stream
#: them from elsewhere: a remote instance, RDMA, IPC, object stores)
FILE_LOAD_FORMATS = frozenset(
    {
        "auto",
        "pt",
        "safetensors",
        "instanttensor",
        "fastsafetensors",
        "npcache",
        "sharded_state",
        "presharded",
        "gguf",
        "bitsandbytes",
        "mistral",
        "layered",
    }
)


def new_nonce() -> str:
    return secrets.token_hex(8)


def local_weights_path(
    model_path: str | None, revision: str | None, download_dir: str | None
) -> str | None:
    """The local directory (or file) SGLang loaded ``model_path`` from: the path itself,
    or the hub cache's snapshot of a repo id (looked up offline: no network)."""
    if not model_path:
        return None
    if os.path.exists(model_path):
        return model_path
    try:
        from huggingface_hub import snapshot_download

        return str(
            snapshot_download(
                model_path, revision=revision, cache_dir=download_dir, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not in the hub cache (or no hub library): unknown
        return None


def weights_of(
    path: str | None, load_format: str, revision: str | None, download_dir: str | None
) -> str:
    """The identity's ``weights`` field for weights loaded from ``path`` (see
    :func:`hiradix.identity.weights_id`); a nonce when they cannot be fingerprinted."""
    load_format = str(getattr(load_format, "value", load_format) or "auto").lower()
    local = None
    if load_format in FILE_LOAD_FORMATS:
        local = local_weights_path(path, revision, download_dir)
    weights = weights_id(local, load_format, new_nonce())
    if weights.startswith("nonce:"):
        logger.warning(
            "hiradix: cannot fingerprint the weights of %s (load format %s): this "
            "process's L3 pages will not be shared with other servers or restarts",
            path,
            load_format,
        )
    else:
        logger.info(
            "hiradix: weights %s (%s%s)",
            weights,
            local or path,
            f", hub revision {snapshot_revision(local)}"
            if local and snapshot_revision(local)
            else "",
        )
    return weights


def current_weight_version(server_args: Any) -> str:
    """SGLang's weights version now (``--weight-version``, changed by weight updates)."""
    try:
        from sglang.srt.runtime_context import get_serving

        version = get_serving().weight_version
        if version is not None:
            return str(version)
    except Exception:  # noqa: BLE001, S110 - no published context (in-process tests)
        pass
    return str(getattr(server_args, "weight_version", None) or "default")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def kv_fields(kv: Any, server_args: Any) -> tuple[str, str]:
    """(kv, layout) identity fields of the device KV pool ``kv``."""
    kv_dtype = getattr(server_args, "kv_cache_dtype", None) or "auto"
    dtype = _dtype_name(getattr(kv, "dtype", "?"))
    store = _dtype_name(getattr(kv, "store_dtype", "?"))
    kv_text = f"{kv_dtype}/{dtype}/store={store}"
    k = getattr(kv, "k_buffer", None)
    v = getattr(kv, "v_buffer", None)
    shape = "?"
    if k and v:
        shape = f"k{tuple(k[0].shape[1:])}v{tuple(v[0].shape[1:])}"
    elif getattr(kv, "kv_buffer", None):
        shape = f"kv{tuple(kv.kv_buffer[0].shape[1:])}"
    layers = f"L{getattr(kv, 'start_layer', 0)}-{getattr(kv, 'end_layer', '?')}"
    layout = f"{type(kv).__name__}/{shape}/{layers}"
    return kv_text, layout


def numerics_of(server_args: Any, device: Any) -> str:
    """What computes the KV besides the weights: attention kernels, engine and torch
    versions, device kind."""
    try:
        from importlib.metadata import version

        sglang_version = version("sglang")
    except Exception:  # noqa: BLE001
        sglang_version = "?"
    backends = ",".join(
        str(getattr(server_args, name, None) or "-")
        for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
    )
    kind = "cpu"
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            kind = torch.cuda.get_device_name(dev)
        elif dev.type != "cpu":
            kind = dev.type
    except Exception:  # noqa: BLE001 - an unusual device string: its text
        kind = str(device)
    return f"attn={backends}/sglang={sglang_version}/torch={torch.__version__}/{kind}"


def shard_of(ctx: Any, *, replicated: bool = False) -> str:
    """This process's shard of the model: TP rank, and PP stage / attention-parallel
    ranks when they are in use (each holds other KV). ``replicated`` (MLA: every TP rank
    holds the same KV): no TP, attention-TP or attention-DP rank, so every rank, and
    servers of any TP size, read the same pages; ``tp*`` for replicated KV."""
    shard = "tp*" if replicated else f"tp{ctx.tp_rank}of{ctx.tp_size}"
    pp_rank, pp_size = pipeline_stage()
    if pp_size > 1:  # each stage holds other layers' KV: its own pages
        shard += f"/pp{pp_rank}of{pp_size}"
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        for name in ("attn_tp", "attn_cp", "attn_dp"):
            rank = getattr(parallel, f"{name}_rank", None)
            size = getattr(parallel, f"{name}_size", None)
            if size is None or (replicated and name != "attn_cp"):
                continue
            # attention TP narrower than TP (DP attention): heads are sharded by it
            sharded = int(size) != int(ctx.tp_size) if name == "attn_tp" else int(size) > 1
            if sharded:
                shard += f"/{name}{rank}of{size}"
    except Exception:  # noqa: BLE001, S110 - no parallel context (in-process tests)
        pass
    return shard


def config_text(hf: Any) -> str:
    """The model config as canonical JSON, without where it was read from
    (``_name_or_path``): the same config at another path is the same model."""
    if hf is None:
        return ""
    try:
        data = json.loads(hf.to_json_string(use_diff=False))
        data.pop("_name_or_path", None)
        return json.dumps(data, sort_keys=True)
    except Exception:  # noqa: BLE001 - a config that cannot serialise itself: use its repr
        return repr(hf)


def model_identity(ctx: Any) -> ModelIdentity:
    """Everything that changes the KV bytes this process computes (the fields of
    :class:`hiradix.identity.ModelIdentity`). Two servers share L3 pages only when it and
    the tenant namespace match. Costs: a config serialisation, the weights fingerprint
    (see :func:`hiradix.identity.weights_fingerprint`), a few attribute reads."""
    mc = getattr(ctx, "model_config", None)
    sa = getattr(ctx, "server_args", None)
    hf = getattr(mc, "hf_config", None)
    hf_text = config_text(hf)
    kv = None
    allocator = getattr(getattr(ctx, "params", None), "token_to_kv_pool_allocator", None)
    if allocator is not None:
        kv = allocator.get_kvcache()
    kv_text, layout = kv_fields(kv, sa)
    replicated = replicated_kv(kv)
    quant = getattr(mc, "quantization", None) or getattr(sa, "quantization", None) or "none"
    model_path = getattr(mc, "model_path", None) or getattr(sa, "model_path", None)
    revision = getattr(mc, "revision", None) or getattr(sa, "revision", None)
    return ModelIdentity(
        architecture=",".join(getattr(hf, "architectures", None) or ["?"]),
        config=hashlib.blake2b(hf_text.encode(), digest_size=8).hexdigest(),
        dtype=_dtype_name(getattr(mc, "dtype", "?")),
        weights=weights_of(
            model_path,
            getattr(sa, "load_format", "auto"),
            revision,
            getattr(sa, "download_dir", None),
        ),
        # at build time the flag is the truth (a published serving context may belong to
        # another engine in the same process); weight updates read the live one later
        weight_version=str(getattr(sa, "weight_version", None) or "default"),
        quantization=f"{quant}/kv_scales={digest_file(getattr(sa, 'quantization_param_path', None))}",
        kv=kv_text,
        layout=layout,
        page_size=int(getattr(ctx.params, "page_size", 1) or 1),
        shard=shard_of(ctx, replicated=replicated),
        numerics=numerics_of(sa, getattr(kv, "device", "cpu")),
    )


def pipeline_stage() -> tuple[int, int]:
    """This process's pipeline stage and the number of stages (0, 1 without PP)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return int(getattr(parallel, "pp_rank", 0) or 0), int(getattr(parallel, "pp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - no parallel context (in-process tests): one stage
        return 0, 1


def store_shard(ctx: Any, *, replicated: bool = False) -> tuple[int, int]:
    """This rank's index among all TP x PP ranks, and their number (for per-rank store
    directories and capacity shares). ``replicated`` (MLA): the PP stage and the number of
    stages only, so every TP rank of a stage opens the same directory and reads the pages
    its writer rank stored."""
    pp_rank, pp_size = pipeline_stage()
    if replicated:
        return pp_rank, pp_size
    tp_size = int(getattr(ctx, "tp_size", 1) or 1)
    return pp_rank * tp_size + int(getattr(ctx, "tp_rank", 0) or 0), tp_size * pp_size


def build_cache(ctx: Any, config: Any) -> HiRadixCache:
    runner = getattr(ctx.tp_worker, "model_runner", None)
    identity = model_identity(ctx)
    kv = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    cache = HiRadixCache(
        ctx.params,
        config,
        forward_stream=getattr(runner, "forward_stream", None),
        metric_labels={"tp_rank": str(ctx.tp_rank)},
        model_id=identity,
        tp_group=getattr(ctx.params, "tp_cache_group", None),
        pp_group=getattr(ctx.params, "pp_cache_group", None),
        shard=store_shard(ctx, replicated=replicated_kv(kv)),
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
