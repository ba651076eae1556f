"""``RadixTreeView``: the read-only :class:`~hiradix.policies.base.TreeView` over a tree.

Engines (the SGLang adapter, the simulator) build one per tree and pass it in every
``TickEvent``. It reads node fields and never calls a tree method that changes state
(no ``match``: recency, splits and TTL are untouched).
"""

from __future__ import annotations

import heapq
import logging
from array import array
from collections.abc import Callable, Hashable, Iterator, Mapping

from hiradix.policies.base import PathInfo, PathView, TierRun, TokenSeq
from hiradix.tree import Node, RadixTree, common_prefix_len
from hiradix.types import Tier

logger = logging.getLogger(__name__)


class RadixTreeView:
    """Read-only view of ``tree`` with the engine's tier capacities (tokens)."""

    def __init__(
        self,
        tree: RadixTree,
        capacities: Mapping[Tier, float],
        *,
        l3_resident: Callable[[], int] = lambda: 0,
    ):
        self._tree = tree
        self._capacities = dict(capacities)
        self._l3_resident = l3_resident
        self._leaves: dict[int, Node] = {}

    def resident(self, tier: Tier) -> int:
        if tier is Tier.L1:
            return self._tree.l1_total()
        if tier is Tier.L2:
            return self._tree.l2_tokens
        return self._l3_resident()

    def capacity(self, tier: Tier) -> float:
        return self._capacities.get(tier, 0.0)

    def _info(self, leaf: Node) -> PathInfo:
        tokens = l1 = l2 = 0
        node: Node | None = leaf
        while node is not None and not self._tree.is_root(node):
            size = len(node)
            tokens += size
            l1 += size if node.l1 is not None else 0
            l2 += size if node.l2 is not None else 0
            node = node.parent
        return PathInfo(leaf.id, leaf.namespace, tokens, l1, l2, leaf.hits, leaf.last_access)

    def _leaf_nodes(self) -> list[Node]:
        leaves = [
            node
            for node in self._tree.iter_nodes()
            if not node.children and len(node) and not self._tree.is_root(node)
        ]
        self._leaves = {node.id: node for node in leaves}
        return leaves

    def paths(self) -> Iterator[PathInfo]:
        for leaf in self._leaf_nodes():
            yield self._info(leaf)

    def hot_paths(self, limit: int) -> list[PathInfo]:
        leaves = heapq.nlargest(max(0, limit), self._leaf_nodes(), key=lambda n: (n.hits, -n.id))
        return [self._info(leaf) for leaf in leaves]

    def path_tokens(self, path_id: int) -> PathView | None:
        leaf = self._leaves.get(path_id)
        if leaf is None or leaf.parent is None:
            return None
        out = array("q")
        for node in self._tree.path(leaf):
            out.extend(node.tokens)
        return PathView(out, leaf.namespace)

    def resident_run(self, namespace: Hashable, tokens: TokenSeq) -> TierRun:
        tree = self._tree
        node = tree.ns_roots.get(namespace)
        if node is None:
            return TierRun()
        path = tokens if isinstance(tokens, array) else array("q", tokens)
        page = tree.page_size
        end = len(path) - len(path) % page
        pos = l1 = host = 0
        while pos < end:
            # a read-only walk: the same child keys as RadixTree.match, without its
            # splits (a partial match of a node ends the walk), recency or expiry
            child = node.children.get(tree._child_key(path, pos))
            if child is None:
                break
            matched = common_prefix_len(child.tokens, path, pos)
            matched -= matched % page
            if matched == 0:
                break
            if child.l1 is not None and host == 0:
                l1 += matched
            elif child.l2_ready:
                host += matched
            else:
                break
            pos += matched
            if matched < len(child):
                break
            node = child
        return TierRun(l1, host, 0)
