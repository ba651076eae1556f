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

Both take plain tensors: a list of per-layer buffers of slot rows per part of the pool's
KV, ``device_k[layer]`` / ``device_v[layer]`` (``[slots, heads, dim]``), and the host slab
whose ``buffers`` are ``[layers, slots, heads, dim]``, one per part in the same order. An
MHA pool has two parts (K and V); an MLA pool one (its latent ``kv_buffer``, passed as
``device_k`` with ``device_v`` empty).
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


def _parts(
    device_k: Sequence[torch.Tensor], device_v: Sequence[torch.Tensor] | None, host: Any
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """(device per-layer buffers, host ``[layers, slots, ...]`` buffer) per part of the KV."""
    device = [list(device_k)] + ([list(device_v)] if device_v else [])
    buffers = getattr(host, "buffers", None) or (host.k, host.v)
    if len(buffers) != len(device):
        raise ValueError(
            f"the host slab has {len(buffers)} KV buffers, the device pool {len(device)}"
        )
    return list(zip(device, buffers, strict=True))


class CpuKvCopier:
    """Synchronous plain-torch index copies (the twin CI exercises)."""

    def __init__(
        self, device_k: Sequence[torch.Tensor], device_v: Sequence[torch.Tensor] | None, host: Any
    ):
        self.parts = _parts(device_k, device_v, host)
        self.host = host

    def device_to_host(self, device_idx: torch.Tensor, host_idx: torch.Tensor) -> CopyHandle:
        for device, rows in self.parts:
            for layer, buf in enumerate(device):
                rows[layer].index_copy_(0, host_idx, buf.index_select(0, device_idx))
        return DONE

    def host_to_device(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> CopyHandle:
        for device, rows in self.parts:
            for layer, buf in enumerate(device):
                buf.index_copy_(0, device_idx, rows[layer].index_select(0, host_idx))
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
        self,
        event: Any,
        host_idx: torch.Tensor,
        staged: list[tuple[torch.Tensor, torch.Tensor]],
    ):
        self.event = event
        self.host_idx = host_idx
        #: (host buffer, its staging rows) per part; emptied once scattered
        self.staged = staged

    def _scatter(self) -> None:
        for rows, staging in self.staged:
            rows[:, self.host_idx] = staging
        self.staged = []

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
        device_v: Sequence[torch.Tensor] | None,
        host: Any,
        *,
        forward_stream: Any | None = None,
    ):
        self.parts = _parts(device_k, device_v, host)
        self.host = host
        device = self.parts[0][0][0].device
        self.stream = torch.cuda.Stream(device=device)
        self.forward_stream = forward_stream or torch.cuda.current_stream(device)

    def _ordered(self, device_idx: torch.Tensor) -> torch.Tensor:
        """``device_idx`` on the device, and the copy stream ordered after every stream that
        may still produce what the copy reads: the forward stream (KV being written, slots
        being read) and the caller's current stream (under SGLang's overlap scheduler the
        index tensors are made on its schedule stream). The indices are recorded on the copy
        stream, so the caching allocator does not hand their memory out while it reads."""
        device = self.parts[0][0][0].device
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
                for layer in range(len(self.parts[0][0])):
                    for device, rows in self.parts:
                        rows[layer][lo:hi].copy_(
                            device[layer].index_select(0, device_idx), non_blocking=True
                        )
                event = torch.cuda.Event()
                event.record(self.stream)
            return _EventHandle(event)
        n = len(device_idx)
        # Gather on device, copy into pinned staging rows asynchronously; the slab rows are
        # scattered on the host once the event says the bytes have landed.
        staged = [
            (
                rows,
                torch.empty(
                    (len(device), n, *device[0].shape[1:]), dtype=device[0].dtype, pin_memory=True
                ),
            )
            for device, rows in self.parts
        ]
        with torch.cuda.stream(self.stream):
            for layer in range(len(self.parts[0][0])):
                for (device, _), (_, staging) in zip(self.parts, staged, strict=True):
                    staging[layer].copy_(
                        device[layer].index_select(0, device_idx), non_blocking=True
                    )
            event = torch.cuda.Event()
            event.record(self.stream)
        return _StagedHandle(event, host_idx.cpu(), staged)

    def host_to_device(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> LayerEvents:
        device_idx = self._ordered(device_idx)
        host_cpu = host_idx.cpu()
        run = contiguous_range(host_cpu)
        events = []
        with torch.cuda.stream(self.stream):
            for layer in range(len(self.parts[0][0])):
                for device, rows in self.parts:
                    buf = device[layer]
                    if run is not None:  # pinned slab rows go straight to the device
                        src = rows[layer][run[0] : run[1]]
                    else:
                        src = rows[layer].index_select(0, host_cpu).pin_memory()
                    buf.index_copy_(0, device_idx, src.to(buf.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self.stream)
                events.append(event)
        return LayerEvents(events)


def make_copier(
    device_k: Sequence[torch.Tensor],
    device_v: Sequence[torch.Tensor] | None,
    host: Any,
    **kw: Any,
) -> KvCopier:
    """The twin that matches where the device buffers live (``device_v`` empty or None for
    a pool with one buffer per layer: MLA's latent ``kv_buffer`` is ``device_k``)."""
    if device_k and device_k[0].is_cuda:
        return CudaKvCopier(device_k, device_v, host, **kw)
    return CpuKvCopier(device_k, device_v, host)
