"""Which SGLang KV pools hiradix tiers exactly, and the start-up refusal for the others.

hiradix moves a page between tiers by copying rows ``[slot]`` of each layer's K and V
buffers (``k_buffer[i]`` / ``v_buffer[i]``: ``[slots, heads, head_dim]``, contiguous).
That is all of a page's KV for SGLang's ``MHATokenToKVPool`` (any dtype, fp8 stored as
uint8 included), and not for:

- MLA pools (``MLATokenToKVPool`` and its kin: one latent ``kv_buffer`` per layer): not
  yet tiered;
- scaled (quantised) pools (``MHATokenToKVPoolMXFP8``, ``MHATokenToKVPoolFP4``, any pool
  with per-slot ``k_scale_buffer`` / ``v_scale_buffer``): a page loaded into new slots
  would be read with those slots' scales;
- other layouts (page-interleaved, unified, hisparse, no-op pools): their rows are not
  addressed by slot the same way;
- EAGLE speculative decoding: the draft model's pool is not tiered, and L3 lookups are
  keyed on the raw tokens while the tree uses bigram keys.

Such a server is refused at start with a message naming the pool, unless the config
turns both the host tier and the store off (``host.size: 0``, ``store.kind: none``): then
hiradix is an L1-only prefix cache, which needs no copy.
"""

from __future__ import annotations

from typing import Any

SUPPORTED = (
    "hiradix tiers MHATokenToKVPool-style pools (per-layer K and V buffers of [slots, heads, "
    "head_dim], no per-slot scales); MLA pools are not yet tiered"
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


def unsupported_reason(kv: Any) -> str | None:
    """Why hiradix cannot copy ``kv``'s pages exactly between tiers, or None."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if not _present(kv, "k_buffer") or not _present(kv, "v_buffer"):
        if _present(kv, "kv_buffer"):
            return "it is an MLA pool (one latent kv_buffer per layer), which is not yet tiered"
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


def check_tierable(kv: Any, config: Any, *, is_eagle: bool) -> bool:
    """Whether the host tier and store should be set up over ``kv`` (False: the config
    turns them off). Raises ``ValueError`` naming the pool when they cannot be."""
    if not tiers_enabled(config):
        return False
    name = type(kv).__name__
    if is_eagle:
        raise ValueError(
            "hiradix: the host tier and the L3 store are not supported with EAGLE "
            f"speculative decoding yet (KV pool {name}: the draft model's KV pool is not "
            "tiered, and L3 lookups are not keyed on the bigram tokens the tree uses). "
            + L1_ONLY
            + "."
        )
    reason = unsupported_reason(kv)
    if reason is not None:
        raise ValueError(
            f"hiradix cannot tier the KV pool {name}: {reason}. {SUPPORTED}. {L1_ONLY}."
        )
    return True
