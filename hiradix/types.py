"""Small typed values shared across hiradix: tiers, namespaces, page keys."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import NewType

#: One content key per page: a digest chained over (previous key, token ids), seeded by the
#: namespace. Two pages share a key only when their whole prefix and namespace match.
PageKey = NewType("PageKey", bytes)

#: Opaque, hashable identity of a cache namespace inside one tree (LoRA / extra_key and
#: cache_salt). The model identity is per tree and enters only page keys.
Namespace = Hashable


class Tier(enum.Enum):
    """Where a node's KV can live."""

    L1 = "l1"  # device memory: the engine's KV pool
    L2 = "l2"  # host memory: hiradix's slab
    L3 = "l3"  # shared store: Redis or local NVMe files
