"""Page copies between the engine's device KV buffers and the host slab: the only GPU code.

Two twins with one interface:

- ``CpuKvCopier``: plain torch index copies, done synchronously on the caller's thread.
  On a CPU engine the forward pass runs on the scheduler thread, so by the time the
  scheduler hands us KV it is already written and a synchronous copy is both correct and
  the cheapest option.
- ``CudaKvCopier``: copies on a dedicated CUDA stream that first waits on the forward
  stream (the KV being demoted may still be written by a kernel in flight, and slots being
  loaded into may still be read by one), host memory pinned, one event per layer on
  load-back so that attention on layer ``i`` waits only for layer ``i`` (SGLang's
  layer-transfer counter calls ``wait_until(i)``; see ``LayerEvents``).

Both take plain tensors: ``device_k[layer]`` / ``device_v[layer]`` are
``[slots, heads, dim]`` and the host slab's ``k`` / ``v`` are ``[layers, slots, heads, dim]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


def contiguous_range(idx: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when ``idx`` is one ascending run of consecutive slots, else None."""
    n = len(idx)
    if n == 0:
        return None
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 != n:
        return None
    if n > 1 and not bool((idx[1:] - idx[:-1] == 1).all()):
        return None
    return first, last + 1


class CopyHandle(Protocol):
    def done(self) -> bool:
        """True once the copy is complete and its source may be reused. Never blocks."""

    def wait(self) -> None:
        """Block the calling thread until the copy is complete."""


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


DONE = _Done()


class KvCopier(Protocol):
    def device_to_host(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> CopyHandle:
        """Copy every layer of the pages at ``device_idx`` into host slots ``host_idx``.
        Runs on the scheduler thread; may return before the copy is done (poll the handle)."""

    def host_to_device(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> CopyHandle:
        """Copy host slots back into device slots, layer by layer; the forward pass that
        reads them must wait on the returned handle (or on per-layer events)."""


class CpuKvCopier:
    """Synchronous plain-torch index copies (the twin CI exercises)."""

    def __init__(
        self, device_k: Sequence[torch.Tensor], device_v: Sequence[torch.Tensor], host: Any
    ):
        self.device_k = list(device_k)
        self.device_v = list(device_v)
        self.host = host

    def device_to_host(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> CopyHandle:
        for layer, (k, v) in enumerate(zip(self.device_k, self.device_v)):
            self.host.k[layer].index_copy_(0, host_idx, k.index_select(0, device_idx))
            self.host.v[layer].index_copy_(0, host_idx, v.index_select(0, device_idx))
        return DONE

    def host_to_device(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> CopyHandle:
        for layer, (k, v) in enumerate(zip(self.device_k, self.device_v)):
            k.index_copy_(0, device_idx, self.host.k[layer].index_select(0, host_idx))
            v.index_copy_(0, device_idx, self.host.v[layer].index_select(0, host_idx))
        return DONE


class _EventHandle:
    def __init__(self, event: Any):
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()


class _StagedHandle:
    """A device-to-host copy through pinned staging rows, scattered into the slab once."""

    def __init__(
        self, event: Any, host: Any, host_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        self.event = event
        self.host = host
        self.host_idx = host_idx
        self.k: torch.Tensor | None = k
        self.v: torch.Tensor | None = v

    def _scatter(self) -> None:
        if self.k is not None and self.v is not None:
            self.host.k[:, self.host_idx] = self.k
            self.host.v[:, self.host_idx] = self.v
            self.k = self.v = None

    def done(self) -> bool:
        if not self.event.query():
            return False
        self._scatter()
        return True

    def wait(self) -> None:
        self.event.synchronize()
        self._scatter()


class LayerEvents:
    """Per-layer completion of one load-back, in the shape of SGLang's layer-transfer
    counter: ``wait_until(layer)`` makes the *current* stream wait for that layer only."""

    def __init__(self, events: list[Any]):
        self.events = events

    def wait_until(self, layer: int) -> None:
        if 0 <= layer < len(self.events):
            torch.cuda.current_stream().wait_event(self.events[layer])

    def done(self) -> bool:
        return all(bool(e.query()) for e in self.events)

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()


class LayerLoadGate:
    """SGLang's layer-transfer counter, for hiradix's loads: registered on the device KV
    pool, whose ``get_key_buffer(layer)`` calls ``wait_until(layer)`` before attention
    reads it. The current (forward) stream then waits for that layer of every load still
    in flight, and for nothing else: layer ``i`` computes while layer ``i + 1`` copies."""

    consumer_index = 0  # SGLang reads it on its mamba path; a plain KV gate is always "on"

    def __init__(self) -> None:
        self._loads: list[LayerEvents] = []

    def add(self, load: LayerEvents) -> None:
        self._loads = [x for x in self._loads if not x.done()]
        self._loads.append(load)

    def wait_until(self, layer: int) -> None:
        for load in self._loads:
            load.wait_until(layer)

    @property
    def pending(self) -> int:
        return len(self._loads)


class CudaKvCopier:
    """Copies on a dedicated stream, ordered after the forward stream."""

    def __init__(
        self,
        device_k: Sequence[torch.Tensor],
        device_v: Sequence[torch.Tensor],
        host: Any,
        *,
        forward_stream: Any | None = None,
    ):
        self.device_k = list(device_k)
        self.device_v = list(device_v)
        self.host = host
        device = self.device_k[0].device
        self.stream = torch.cuda.Stream(device=device)
        self.forward_stream = forward_stream or torch.cuda.current_stream(device)

    def _ordered(self, device_idx: torch.Tensor) -> torch.Tensor:
        """``device_idx`` on the device, and the copy stream ordered after every stream that
        may still produce what the copy reads: the forward stream (KV being written, slots
        being read) and the caller's current stream (under SGLang's overlap scheduler the
        index tensors are made on its schedule stream). The indices are recorded on the copy
        stream, so the caching allocator does not hand their memory out while it reads."""
        device = self.device_k[0].device
        device_idx = device_idx.to(device, non_blocking=True)
        self.stream.wait_stream(self.forward_stream)
        current = torch.cuda.current_stream(device)
        if current != self.forward_stream:
            self.stream.wait_stream(current)
        device_idx.record_stream(self.stream)
        return device_idx

    def device_to_host(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> CopyHandle:
        device_idx = self._ordered(device_idx)
        run = contiguous_range(host_idx)
        if run is not None:  # straight into the pinned slab rows: no staging, no host scatter
            lo, hi = run
            with torch.cuda.stream(self.stream):
                for layer, (k, v) in enumerate(zip(self.device_k, self.device_v)):
                    self.host.k[layer][lo:hi].copy_(
                        k.index_select(0, device_idx), non_blocking=True
                    )
                    self.host.v[layer][lo:hi].copy_(
                        v.index_select(0, device_idx), non_blocking=True
                    )
                event = torch.cuda.Event()
                event.record(self.stream)
            return _EventHandle(event)
        n = len(device_idx)
        k0, v0 = self.device_k[0], self.device_v[0]
        # Gather on device, copy into pinned staging rows asynchronously; the slab rows are
        # scattered on the host once the event says the bytes have landed.
        staging_k = torch.empty(
            (len(self.device_k), n, *k0.shape[1:]), dtype=k0.dtype, pin_memory=True
        )
        staging_v = torch.empty(
            (len(self.device_v), n, *v0.shape[1:]), dtype=v0.dtype, pin_memory=True
        )
        with torch.cuda.stream(self.stream):
            for layer, (k, v) in enumerate(zip(self.device_k, self.device_v)):
                staging_k[layer].copy_(k.index_select(0, device_idx), non_blocking=True)
                staging_v[layer].copy_(v.index_select(0, device_idx), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _StagedHandle(event, self.host, host_idx.cpu(), staging_k, staging_v)

    def host_to_device(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> LayerEvents:
        device_idx = self._ordered(device_idx)
        host_cpu = host_idx.cpu()
        run = contiguous_range(host_cpu)
        events = []
        with torch.cuda.stream(self.stream):
            for layer, (k, v) in enumerate(zip(self.device_k, self.device_v)):
                if run is not None:  # pinned slab rows go straight to the device
                    k_rows = self.host.k[layer][run[0] : run[1]]
                    v_rows = self.host.v[layer][run[0] : run[1]]
                else:
                    k_rows = self.host.k[layer].index_select(0, host_cpu).pin_memory()
                    v_rows = self.host.v[layer].index_select(0, host_cpu).pin_memory()
                k.index_copy_(0, device_idx, k_rows.to(k.device, non_blocking=True))
                v.index_copy_(0, device_idx, v_rows.to(v.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.stream)
                events.append(event)
        return LayerEvents(events)


def make_copier(
    device_k: Sequence[torch.Tensor], device_v: Sequence[torch.Tensor], host: Any, **kw: Any
) -> KvCopier:
    """The twin that matches where the device buffers live."""
    if device_k and device_k[0].is_cuda:
        return CudaKvCopier(device_k, device_v, host, **kw)
    return CpuKvCopier(device_k, device_v, host)
