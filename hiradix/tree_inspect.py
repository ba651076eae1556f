"""Inspection of a :class:`~hiradix.tree.RadixTree`: the invariant check (tests), the
digest the TP consensus checker compares across ranks, and a readable dump."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hiradix.tree import RadixTree
    from hiradix.tree_nodes import Node


def check_invariants(tree: RadixTree) -> None:
    """Raise ``AssertionError`` if the tree's bookkeeping is inconsistent (tests only)."""
    evictable = protected = host = 0
    for node in tree.iter_nodes():
        parent = node.parent
        assert parent is not None
        if parent is not tree.root and node.l1 is not None and len(parent) > 0:
            assert parent.l1 is not None, f"L1 not prefix-closed at {node!r}"
        if parent is not tree.root and node.l2 is not None and len(parent) > 0:
            # host copies fetched from L3 may hang below a device-only parent
            assert parent.l2 is not None or parent.l1 is not None, f"orphan host copy {node!r}"
        if len(node) and node.l1 is None and node.l2 is None:
            raise AssertionError(f"non-resident node kept: {node!r}")
        if node.l1 is not None:
            assert len(node.l1) == len(node), node
            if node.lock_ref > 0:
                protected += len(node)
            else:
                evictable += len(node)
        if node.l2 is not None:
            host += len(node)
        assert node.lock_ref >= 0
    for node in tree.iter_nodes():
        if node.parent is None or node.parent is tree.root:
            continue
        is_l1_leaf = (
            node.l1 is not None
            and node.lock_ref == 0
            and not any(c.l1 is not None for c in node.children.values())
        )
        assert is_l1_leaf == (node in tree.l1_leaves), f"L1 leaf queue out of date at {node!r}"
    ranks = [(tree.order(n), n.id) for n in tree.l1_leaves]
    assert ranks == sorted(ranks), "L1 leaf queue out of order"
    assert evictable == tree.evictable_tokens, (evictable, tree.evictable_tokens)
    assert protected == tree.protected_tokens, (protected, tree.protected_tokens)
    assert host == tree.l2_tokens, (host, tree.l2_tokens)


def state_digest(tree: RadixTree) -> list[tuple[str, int]]:
    """Named integers that equal trees share (the TP consensus checker compares them
    across ranks): counts per tier, locks, and a hash of every node's shape and
    residency. O(nodes): for checking, not for every step of production."""
    shape = hashlib.blake2b(digest_size=8)
    nodes = 0
    for node in sorted(tree.iter_nodes(), key=lambda n: n.id):
        nodes += 1
        shape.update(
            b"%d,%d,%d,%d,%d,%d,%d;"
            % (
                node.id,
                node.parent.id if node.parent is not None else -1,
                len(node),
                node.l1 is not None,
                2 if node.l2_ready else node.l2 is not None,
                node.lock_ref,
                len(node.l2_pins),
            )
        )
    return [
        ("nodes", nodes),
        ("evictable_tokens", tree.evictable_tokens),
        ("protected_tokens", tree.protected_tokens),
        ("l2_tokens", tree.l2_tokens),
        ("tree_shape_hash", int.from_bytes(shape.digest(), "little") >> 2),
    ]


def dump(tree: RadixTree, limit: int = 200) -> str:
    lines: list[str] = []

    def walk(node: Node, depth: int) -> None:
        if len(lines) >= limit:
            return
        lines.append(
            f"{'  ' * depth}{len(node)} {list(node.tokens[:8])} "
            f"l1={node.l1 is not None} l2={node.l2 is not None} lock={node.lock_ref}"
        )
        for child in node.children.values():
            walk(child, depth + 1)

    walk(tree.root, 0)
    return "\n".join(lines)
