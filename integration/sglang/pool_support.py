"""Which SGLang KV pools hiradix tiers exactly, and the start-up refusal for the others.

hiradix moves a page between tiers by copying rows ``[slot]`` of each of the pool's
per-layer buffers of slot rows (``[slots, heads, head_dim]``, contiguous), in the pool's
storage dtype; :func:`device_buffers` names them. That is all of a page's KV for:

- SGLang's ``MHATokenToKVPool`` (any dtype, fp8 stored as uint8 included): two buffers,
  ``k_buffer[i]`` and ``v_buffer[i]``; L3 pages ``(2, layers, block, heads, dim)``, layout
  ``kv_layer_token_head_dim``;
- SGLang's ``MLATokenToKVPool`` (DeepSeek-V2/V3/R1, Kimi K2: any dtype, fp8 as uint8): one
  latent buffer, ``kv_buffer[i]`` (``[slots, 1, kv_lora_rank + qk_rope_head_dim]``); L3
  pages ``(1, layers, block, 1, dim)``, layout ``mla_latent_layer_token_dim``. MLA KV is
  the same on every TP rank (:func:`replicated_kv`): its page keys carry no TP rank, so
  servers of other TP sizes share its pages; one rank writes each page (rank 0 of the
  cache's TP group), every rank reads; NVMe directories are per pipeline stage only.

and not for:

- MLA kin with other rows: ``MLATokenToKVPoolFP4`` (packed rows with scales),
  ``DSATokenToKVPool`` (an indexer cache beside the latent), unified/NPU MLA pools, MLA
  with decode context parallelism (rows sharded across ranks) or layer sharding;
- scaled (quantised) pools (``MHATokenToKVPoolMXFP8``, ``MHATokenToKVPoolFP4``, any pool
  with per-slot ``k_scale_buffer`` / ``v_scale_buffer``): a page loaded into new slots
  would be read with those slots' scales;
- other layouts (page-interleaved, unified, hisparse, no-op pools): their rows are not
  addressed by slot the same way;
- EAGLE speculative decoding: the draft model's KV pool is not tiered (a page loaded back
  would come with the target's KV only). L3 keys are built from the tree's bigram keys
  (``prefetch.py``), so that part is right when draft pools are tiered.

Such a server is refused at start with a message naming the pool, unless the config
turns both the host tier and the store off (``host.size: 0``, ``store.kind: none``): then
hiradix is an L1-only prefix cache, which needs no copy.
"""

from __future__ import annotations

from typing import Any

SUPPORTED = (
    "hiradix tiers SGLang's MHATokenToKVPool (per-layer K and V buffers of [slots, heads, "
    "head_dim], no per-slot scales) and MLATokenToKVPool (one latent kv_buffer per layer, "
    "no scales, no decode context parallelism)"
)
L1_ONLY = (
    "To run hiradix as an L1-only prefix cache, set host.size: 0 and store.kind: none in "
    "the hiradix config; or drop --enable-hiradix"
)


def tiers_enabled(config: Any) -> bool:
    """Whether the config asks for a host tier or an L3 store."""
    host = config.host
    host_off = host.size_bytes == 0 if host.size_bytes is not None else not host.size_ratio
    return not (host_off and config.store.kind.value == "none")


def _present(kv: Any, name: str) -> bool:
    value = getattr(kv, name, None)
    return value is not None and (not isinstance(value, (list, tuple)) or len(value) > 0)


def _dcp_size() -> int:
    """Decode context parallelism's width (1 without it, or outside a server)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(getattr(get_parallel(), "attn_dcp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - no published parallel context (in-process tests)
        return 1


def _mla_reason(kv: Any) -> str | None:
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    if type(kv) is not MLATokenToKVPool:
        return (
            "it is an MLA pool whose rows are not MLATokenToKVPool's latent rows alone "
            "(packed or scaled rows, an indexer cache, or a unified layout)"
        )
    if getattr(kv, "kv_scale_buffer", None) is not None:
        return "it is a scaled MLA pool: its per-slot scales would not move with the pages"
    if getattr(kv, "layer_shard_enabled", False):
        return "its layers are sharded across ranks"
    if _dcp_size() > 1 and not getattr(kv, "dcp_replicated", False):
        return "decode context parallelism shards its rows across ranks"
    for t in kv.kv_buffer:
        if t.dim() != 3 or not t.is_contiguous():
            return f"a layer buffer has shape {tuple(t.shape)} (not contiguous [slots, 1, dim])"
    return None


def unsupported_reason(kv: Any) -> str | None:
    """Why hiradix cannot copy ``kv``'s pages exactly between tiers, or None."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if not _present(kv, "k_buffer") or not _present(kv, "v_buffer"):
        if _present(kv, "kv_buffer"):
            return _mla_reason(kv)
        return "it has no per-layer K and V buffers"
    scales = [
        name
        for name in (
            "k_scale_buffer",
            "v_scale_buffer",
            "native_k_scale_buffer",
            "native_v_scale_buffer",
        )
        if _present(kv, name)
    ]
    if scales:
        return (
            f"it is a scaled KV pool: its per-slot scales ({', '.join(scales)}) would not "
            "move with the pages"
        )
    if getattr(kv, "is_quantized_kv_cache", False):
        method = getattr(getattr(kv, "quant_method", None), "name", "?")
        return f"its KV is quantised by the {method} KV cache method, which is not yet tiered"
    if type(kv) is not MHATokenToKVPool:
        return "its buffer layout is not MHATokenToKVPool's per-layer slot rows"
    for t in (*kv.k_buffer, *kv.v_buffer):
        if t.dim() != 3 or not t.is_contiguous():
            return f"a layer buffer has shape {tuple(t.shape)} (not contiguous [slots, heads, dim])"
    return None


def is_mla(kv: Any) -> bool:
    """Whether ``kv`` is an MLA pool (one latent ``kv_buffer`` per layer, no K/V buffers)."""
    return _present(kv, "kv_buffer") and not _present(kv, "k_buffer")


def replicated_kv(kv: Any) -> bool:
    """Whether every TP rank holds the same KV for a token (MLA: the latent is not split by
    heads), so one rank's pages serve all ranks and servers of any TP size."""
    return kv is not None and is_mla(kv)


def device_buffers(kv: Any) -> list[list[Any]]:
    """The pool's per-layer buffers of slot rows, one list per part of the KV: ``[k, v]``
    for MHA, ``[kv]`` (the latent) for MLA. Call only on a pool :func:`unsupported_reason`
    accepts."""
    if is_mla(kv):
        return [list(kv.kv_buffer)]
    return [list(kv.k_buffer), list(kv.v_buffer)]


def check_tierable(kv: Any, config: Any, *, is_eagle: bool) -> bool:
    """Whether the host tier and store should be set up over ``kv`` (False: the config
    turns them off). Raises ``ValueError`` naming the pool when they cannot be."""
    if not tiers_enabled(config):
        return False
    name = type(kv).__name__
    if is_eagle:
        raise ValueError(
            "hiradix: the host tier and the L3 store are not supported with EAGLE "
            f"speculative decoding yet (target KV pool {name}: the draft model's KV pool "
            "is not tiered, so a page loaded back from host or store would lack the "
            "draft's KV). " + L1_ONLY + "."
        )
    reason = unsupported_reason(kv)
    if reason is not None:
        raise ValueError(
            f"hiradix cannot tier the KV pool {name}: {reason}. {SUPPORTED}. {L1_ONLY}."
        )
    return True
