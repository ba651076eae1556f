"""Host tier of ``HiRadixCache`` (a mixin): the slab, write-through and write-back
demotion (device -> host), load-back (host -> device) and verify mode's page digests.

Runs on the scheduler thread; copies are orders to the transfer engine, and their
completions reach the tree only at the agreed step (``agreed_step.py``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from hiradix.backends.host_slab import HostSlab
from hiradix.integration.sglang.pool_support import (
    check_tierable,
    device_buffers,
    replicated_kv,
)
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from hiradix.kv_copy import LayerEvents, LayerLoadGate, make_copier
from hiradix.transfer import TransferEngine
from hiradix.tree import Node, Ticket
from hiradix.verify import digest

logger = logging.getLogger(__name__)


RETRY_LIMIT = 256  # paths waiting for host memory to drain to L3


class HostTier:
    """Mixin of :class:`~hiradix.integration.sglang.cache.HiRadixCache`: the host tier."""

    def _init_host_tier(self, forward_stream: Any) -> None:
        """Size and allocate the host slab from the config and the device pool's shape.
        A pool hiradix cannot tier exactly is refused here (``pool_support.py``: a
        ``ValueError`` naming it), unless the config turns the host tier and the store off
        (L1 only)."""
        kv = self.token_to_kv_pool_allocator.get_kvcache()
        if not check_tierable(kv, self.config, is_eagle=self.is_eagle):
            logger.info(
                "hiradix: host tier and L3 store off in the config: L1 only (KV pool %s)",
                type(kv).__name__,
            )
            return
        parts = device_buffers(kv)  # [k, v] (MHA) or [kv] (MLA's latent)
        device_k, device_v = parts[0], parts[1] if len(parts) > 1 else []
        self.kv_replicated = replicated_kv(kv)
        l1_bytes = sum(t.numel() * t.element_size() for part in parts for t in part)
        host_bytes = self.config.host.resolve_bytes(l1_bytes)
        if host_bytes <= 0:
            logger.warning(
                "hiradix: host.size is 0: no host tier, so no L3 store either (store.kind %s "
                "is not used); L1 only",
                self.config.store.kind.value,
            )
            return
        per_token = l1_bytes // device_k[0].shape[0]
        slots = HostSlab.slots_for_bytes(host_bytes, per_token)
        if slots < self.page_size:
            logger.warning("hiradix: host tier of %d bytes holds no page; disabled", host_bytes)
            return
        k0 = device_k[0]
        self.slab = HostSlab(
            slots,
            layers=len(device_k),
            heads=k0.shape[1],
            head_dim=k0.shape[2],
            v_head_dim=device_v[0].shape[2] if device_v else None,
            dtype=k0.dtype,
            page_size=self.page_size,
            pin_memory=k0.is_cuda,
            parts=len(parts),
        )
        self.tree.free_l2 = self.slab.free
        self._device_kv = [t for part in parts for t in part]
        if k0.is_cuda and getattr(kv, "layer_transfer_counter", None) is None:
            self.load_gate = LayerLoadGate()
            kv.register_layer_transfer_counter(self.load_gate)
        self.engine = TransferEngine(
            make_copier(
                device_k,
                device_v,
                self.slab,
                **(
                    {"forward_stream": forward_stream}
                    if k0.is_cuda and forward_stream is not None
                    else {}
                ),
            )
        )
        self.stats.gauges["l2_total_slots"] = self.slab.num_slots
        logger.info(
            "hiradix: host tier %d slots (%.1f MiB, %d B/token, %s memory)",
            slots,
            slots * per_token / 2**20,
            per_token,
            "pinned" if k0.is_cuda else "plain",
        )

    # ------------------------------------------------------------------ verify mode
    def _device_digests(self, device_idx: torch.Tensor) -> list[bytes]:
        """Digest of each page's KV (every layer of every buffer: K and V, or MLA's
        latent) at ``device_idx``."""
        n = len(device_idx)
        if n == 0 or not self._device_kv:
            return []
        idx = device_idx.to(self._device_kv[0].device)
        rows = [t.index_select(0, idx).reshape(n, -1).view(torch.uint8) for t in self._device_kv]
        pages = torch.cat(rows, dim=1).reshape(n // self.page_size, -1).cpu().numpy()
        return [digest(row.tobytes()) for row in pages]

    def _verify_load(self, run: list[Node], device_idx: torch.Tensor, handle: Any) -> bool:
        """Verify mode: whether the pages loaded into ``device_idx`` are the KV written down
        for ``run``. On a mismatch the device slots are freed and the run's host copies
        dropped, so the request recomputes instead of reading wrong KV."""
        assert self.verifier is not None
        handle.wait()
        keys = [key for x in run for key in self.tree.page_keys(x)]
        if not self.verifier.check(keys, self._device_digests(device_idx), "load-back to L1"):
            return True
        self._free_device(device_idx)
        return False

    def _verify_record(self, node: Node) -> None:
        """Verify mode: remember the digests of ``node``'s device pages as they go down."""
        if self.verifier is not None and node.l1 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the forward that wrote them is done
            self.verifier.record(self.tree.page_keys(node), self._device_digests(node.l1))

    # ------------------------------------------------------------------ host tier
    def _qualifies(self, node: Node) -> bool:
        if self.write_policy == "write_through_selective":
            return node.hits >= self.config.write_through_hits
        return self.write_policy == "write_through"

    def _host_slots(self, node: Node) -> torch.Tensor | None:
        """Host slots for ``node``, evicting unpinned host leaves (never its parent)."""
        assert self.slab is not None
        need = len(node)
        slots = self.slab.alloc(need)
        if slots is None:
            parent = node.parent
            assert parent is not None
            # a parent known only on host must keep that copy (the path would break)
            keep = parent.l1 is None and parent.l2 is not None
            pin = self.tree.pin_l2(parent) if keep else None
            try:
                freed = self.tree.evict_l2(need - self.slab.free_slots)
                self.stats.add("l2_evicted_tokens", freed)
            finally:
                if pin is not None:
                    self.tree.unpin_l2(pin)
            slots = self.slab.alloc(need)
        if slots is None:
            self.stats.add("l2_full_skips")
        return slots

    def _demote_path(self, last: Node) -> bool:
        """Write the path down to ``last`` through to host memory, top-down; long nodes go
        in pieces of at most a quarter of the slab, so that no node is too big to demote.
        Returns False when host memory is full of pages still in flight (retry later: they
        drain to L3 and become evictable)."""
        assert self.slab is not None
        chunk = max(self.page_size, min(self.slab.num_slots // 4, 4096))
        if self.storage is not None and chunk >= self.storage.block:
            chunk -= chunk % self.storage.block  # pieces never split an L3 page
        for whole in self.tree.path(last):
            if whole.l2 is not None:
                continue
            if whole.l1 is None or not self._qualifies(whole):
                return True
            for node in self.tree.split_long(whole, chunk):
                if node.l2 is not None:
                    continue
                if not self.tree.host_parent_ok(node):
                    return True
                slots = self._host_slots(node)
                if slots is None:
                    return False
                ticket = Ticket()
                self.tree.attach_l2(node, slots, ticket)
                self.tree.lock(node)  # device slots stay put while the copy reads them
                self.engine.demote(
                    node.l1, slots, lambda ok, n=node, t=ticket: self._demoted(n, t, ok)
                )
                self._verify_record(node)
        return True

    def _demoted(self, node: Node, ticket: Ticket, ok: bool) -> None:
        size = len(node)
        self.tree.unlock(node)
        self.tree.finish_ticket(node, ticket, ok)
        if ok:
            self.stats.add("l1_to_l2_tokens", size)
            self.stats.add("d2h_bytes", size * self.slab.bytes_per_token if self.slab else 0)
            if self.storage is not None:
                self._pending_save.append(node)
        else:
            self.stats.add("copy_failures")

    def _write_back(self, node: Node) -> bool:
        """Write-back policy: give an L1 victim a host copy right before it is dropped."""
        if self.slab is None:
            return False
        slots = self._host_slots(node)
        if slots is None:
            return False
        assert self.engine.copier is not None
        self.engine.copier.device_to_host(node.l1, slots).wait()
        self._verify_record(node)
        self.tree.attach_l2(node, slots, None)
        if self.storage is not None:
            self._pending_save.append(node)
        self.stats.add("l1_to_l2_tokens", len(node))
        self.stats.add("d2h_bytes", len(node) * self.slab.bytes_per_token)
        return True

    def _service(self) -> None:
        """The agreed step's housekeeping: queued demotions, L3 writes, TTL, gauges."""
        if self._pending_demote:
            pending, self._pending_demote = self._pending_demote, []
            retry = []
            for node in pending:
                if node.parent is not None and node.l1 is not None and not self._demote_path(node):
                    retry.append(node)
            self._pending_demote = retry[:RETRY_LIMIT] + self._pending_demote
        if self._pending_save:
            pending_save, self._pending_save = self._pending_save, []
            assert self.storage is not None
            for node in _deepest(pending_save):
                if node.parent is not None and node.l2_ready:
                    self.storage.save_path(node)
        self._tick()
        before = dict(self.tree.expired_tokens)
        self.tree.sweep()
        self.stats.add("l1_expired_tokens", self.tree.expired_tokens["l1"] - before["l1"])
        self.stats.add("l2_expired_tokens", self.tree.expired_tokens["l2"] - before["l2"])
        gauges = self.stats.gauges
        gauges["l1_tokens"] = self.tree.l1_total()
        gauges["l1_protected_tokens"] = self.tree.protected_tokens
        gauges["l2_used_slots"] = self.slab.used_slots if self.slab is not None else 0
        gauges["l2_tokens"] = self.tree.l2_tokens
        gauges["in_flight"] = self.engine.in_flight
        if self.verifier is not None:
            self.stats.counters["verify_checked_pages"] = self.verifier.checked
            self.stats.counters["verify_unchecked_pages"] = self.verifier.unchecked
            self.stats.counters["verify_mismatches"] = self.verifier.mismatches
        if self.exporter is not None:
            self.exporter.export(self.stats)

    def _load_run(self, run: list[Node], anchor: Node) -> bool:
        """Copy the host-ready ``run`` (a chain hanging below the device-resident
        ``anchor``) to new device slots and attach them. Later forwards see the KV: on CUDA
        they wait for the copy (per layer through the load gate, else one event); on CPU
        the copy is done on return. The host copies stay pinned until the copy has read
        them. ``False`` when the device slots cannot be had (or, in verify mode, when what
        landed is not what went down: the host copies are then dropped)."""
        total = sum(len(x) for x in run)
        pins = [self.tree.pin_l2(x) for x in run]
        handle: Any = None
        rejected = False
        try:
            allocator = self.token_to_kv_pool_allocator
            if allocator.available_size() < total:
                self.tree.lock(anchor)
                try:
                    self.evict(EvictParams(num_tokens=total - allocator.available_size()))
                finally:
                    self.tree.unlock(anchor)
            device_idx = allocator.alloc(total)
            if device_idx is None:
                return False
            host_idx = torch.cat([x.l2 for x in run]) if len(run) > 1 else run[0].l2
            handle = self.engine.load(host_idx, device_idx)
            if isinstance(handle, LayerEvents) and self.load_gate is not None:
                self.load_gate.add(handle)  # attention on layer i waits for layer i only
            elif isinstance(handle, LayerEvents) and self.forward_stream is not None:
                self.forward_stream.wait_event(handle.events[-1])
            else:
                handle.wait()
            if self.verifier is not None and not self._verify_load(run, device_idx, handle):
                rejected = True
                return False
            offset = 0
            for x in run:
                self.tree.attach_l1(x, device_idx[offset : offset + len(x)])
                offset += len(x)
        finally:
            if handle is not None and not handle.done():
                self.engine.track(handle, lambda ok: self._unpin(pins))
            else:
                self._unpin(pins)
            if rejected:
                for x in run:
                    if x.parent is not None and x.l2 is not None:
                        self.tree.evict_host_copy(x)
        self.stats.add("l2_to_l1_tokens", total)
        self.stats.add("h2d_bytes", total * self.slab.bytes_per_token)
        return True

    def _unpin(self, pins: list[Any]) -> None:
        for pin in pins:
            self.tree.unpin_l2(pin)


def _deepest(nodes: list[Node]) -> list[Node]:
    """Drop nodes that are ancestors of another node in the list (their path is saved
    with the descendant's)."""
    ancestors: set[int] = set()
    for node in nodes:
        cur = node.parent
        while cur is not None and id(cur) not in ancestors:
            ancestors.add(id(cur))
            cur = cur.parent
    seen: set[int] = set()
    out = []
    for node in nodes:
        if id(node) not in ancestors and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out
