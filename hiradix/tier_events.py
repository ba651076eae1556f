"""What a tier listener hears: pages arriving in and leaving each tier.

The tree (``tree.py``) and the L3 tier (``storage_tier.py``) tell one optional listener
when a node's pages arrive in or leave L1 or L2, and when L3 pages are known present
(written, found or read) or absent; the SGLang adapter turns that into SGLang's KV events
(``integration/sglang/kv_events.py``) for cache-aware routers.

Calls come only from the scheduler thread: from tree mutations and from store completions
applied at the agreed step (``TransferEngine.apply``), never from an IO thread. A listener
must not change the tree and must not block.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hiradix.tree_nodes import Node
    from hiradix.types import Tier


class TierListener(Protocol):
    def arrived(self, node: Node, tier: Tier) -> None:
        """``node``'s pages are now held in ``tier`` (L1: device slots attached; L2: the
        host copy is complete). ``node`` is linked in the tree."""

    def left(self, node: Node, tier: Tier) -> None:
        """``node``'s pages are no longer held in ``tier`` (evicted, expired, dropped).
        ``node`` is still linked in the tree (its path can be read)."""

    def l3_present(
        self, source: Any, namespace: Hashable, tokens: array, blocks: Sequence[int]
    ) -> None:
        """The store behind ``source`` (a ``StorageTier``) holds store pages ``blocks``
        (indices of ``block_tokens`` runs) of ``tokens``: this instance wrote, found or
        read them, as every TP rank agreed."""

    def l3_absent(self, source: Any, namespace: Hashable, tokens: array, block: int) -> None:
        """Every rank looked and the store behind ``source`` no longer holds store page
        ``block`` of ``tokens`` (evicted, expired, corrupt)."""
