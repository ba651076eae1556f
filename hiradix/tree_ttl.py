"""TTL of a :class:`~hiradix.tree.RadixTree`'s tiers: lazy expiry on lookup and bounded
sweeps, on the tree's (injected, agreed) clock. Locked device copies and host copies being
read or written are left for a later pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hiradix.tree import RadixTree
    from hiradix.tree_nodes import Node, TierTtl


def due(tree: RadixTree, node: Node, rule: TierTtl, written_at: float, now: float) -> bool:
    if tree.ttl.max_age is not None and now - node.created_at >= tree.ttl.max_age:
        return True
    if rule.seconds is None:
        return False
    base = node.accessed_at if rule.sliding else written_at
    return now - base >= rule.seconds


def expire_if_due(tree: RadixTree, node: Node, now: float) -> bool:
    """Drop the tiers of ``node`` (and its subtree) whose time is up. Locked device
    copies and host copies being read are left for a later pass."""
    changed = False
    if node.l2 is not None and not node.l2_busy and due(tree, node, tree.ttl.host, node.l2_at, now):
        tree.expired_tokens["l2"] += subtree_tokens(tree, node, "l2")
        tree._drop_host_subtree(node)
        changed = True
    if (
        node.parent is not None
        and node.l1 is not None
        and node.lock_ref == 0
        and due(tree, node, tree.ttl.device, node.l1_at, now)
    ):
        tree.expired_tokens["l1"] += subtree_tokens(tree, node, "l1")
        drop_device_subtree(tree, node)
        changed = True
    return changed


def drop_device_subtree(tree: RadixTree, node: Node) -> None:
    for child in list(node.children.values()):
        drop_device_subtree(tree, child)
    if node.l1 is not None and node.parent is not None and node.lock_ref == 0:
        tree._drop_l1(node)


def subtree_tokens(tree: RadixTree, node: Node, tier: str) -> int:
    total = len(node) if getattr(node, tier) is not None else 0
    for child in node.children.values():
        total += subtree_tokens(tree, child, tier)
    return total


def sweep(tree: RadixTree, max_nodes: int = 64) -> int:
    """Bounded expiry pass over current leaves; returns how many nodes it changed."""
    if not tree.ttl.enabled:
        return 0
    now = tree.clock()
    changed = 0
    candidates = list(tree.l1_leaves)[:max_nodes] + list(tree.l2_leaves)[:max_nodes]
    for node in candidates:
        if node.parent is not None and expire_if_due(tree, node, now):
            changed += 1
    return changed
