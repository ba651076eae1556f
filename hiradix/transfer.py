"""The transfer engine: the one place that owns worker threads, CUDA streams and events.

Everything that moves KV between tiers goes through here as an order. The tree never
blocks: it submits an order with a completion callback and the engine runs that callback
later, *on the thread that calls ``poll``* (the scheduler thread), so the tree stays
single-threaded.

Orders:

- ``demote``: device -> host copy (through the ``KvCopier``: synchronous on CPU, a side
  stream and an event on CUDA);
- ``load``: host -> device copy for a load-back; returns the handle the forward must wait on;
- ``submit_io``: a blocking job (an L3 store batch) run on the engine's IO threads.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from hiradix.kv_copy import CopyHandle, KvCopier
from hiradix.linux import name_thread

logger = logging.getLogger(__name__)

CopyDone = Callable[[bool], None]
IoDone = Callable[[Any, BaseException | None], None]


class TransferEngine:
    """Submit/poll front for every copy and store IO. ``poll``/``demote``/``load``/
    ``submit_io`` are called on the scheduler thread only; IO jobs run on worker threads."""

    def __init__(self, copier: KvCopier | None = None, *, io_workers: int = 2):
        self.copier = copier
        self.io_workers = io_workers
        self._copies: list[tuple[CopyHandle, CopyDone]] = []
        # Two lanes: lookups a request may be waiting on never queue behind bulk writes.
        self._io_pools: dict[str, ThreadPoolExecutor] = {}
        self._io_done: queue.SimpleQueue[tuple[IoDone, Any, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self._io_in_flight = 0
        self._lock = threading.Lock()  # guards nothing but the pool's lazy creation
        self.copy_failures = 0

    # ------------------------------------------------------------------ copies
    def demote(self, device_idx: torch.Tensor, host_idx: torch.Tensor, on_done: CopyDone) -> None:
        """Copy device pages to host slots; ``on_done(ok)`` runs from a later ``poll``."""
        if self.copier is None:
            raise RuntimeError("transfer engine has no KV copier (host tier disabled)")
        try:
            handle = self.copier.device_to_host(device_idx, host_idx)
        except Exception:  # a failed copy rolls back, it never fails a request
            logger.exception("hiradix: device->host copy failed; dropping the host copy")
            self.copy_failures += 1
            self._copies.append((_FAILED, on_done))
            return
        self._copies.append((handle, on_done))

    def load(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> CopyHandle:
        """Copy host slots back to device slots; the caller makes the forward wait on the
        returned handle (CPU: already done)."""
        if self.copier is None:
            raise RuntimeError("transfer engine has no KV copier (host tier disabled)")
        return self.copier.host_to_device(host_idx, device_idx)

    # ------------------------------------------------------------------ store IO
    def submit_io(self, job: Callable[[], Any], on_done: IoDone, *, lane: str = "read") -> None:
        """Run ``job`` on an IO thread of ``lane`` (``read``: lookups and fetches a request
        may wait on; ``write``: write-through); ``on_done(result, error)`` runs from ``poll``."""
        pool = self._io_pools.get(lane)
        if pool is None:
            with self._lock:
                pool = self._io_pools.get(lane)
                if pool is None:
                    pool = ThreadPoolExecutor(
                        max_workers=self.io_workers,
                        thread_name_prefix=f"hiradix-{lane}",
                        initializer=name_thread,
                        initargs=(f"hiradix-{lane}",),
                    )
                    self._io_pools[lane] = pool
        self._io_in_flight += 1

        def run() -> None:
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler thread's callback
                self._io_done.put((on_done, None, exc))
            else:
                self._io_done.put((on_done, result, None))

        pool.submit(run)

    # ------------------------------------------------------------------ completion
    @property
    def in_flight(self) -> int:
        return len(self._copies) + self._io_in_flight

    def poll(self) -> int:
        """Run the callbacks of every finished order; returns how many ran. Never blocks."""
        ran = 0
        if self._copies:
            still = []
            for handle, on_done in self._copies:
                if handle.done():
                    on_done(handle is not _FAILED)
                    ran += 1
                else:
                    still.append((handle, on_done))
            self._copies = still
        while True:
            try:
                io_done, result, error = self._io_done.get_nowait()
            except queue.Empty:
                break
            self._io_in_flight -= 1
            io_done(result, error)
            ran += 1
        return ran

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for every order and run its callback (flush / shutdown)."""
        for handle, _ in self._copies:
            handle.wait()
        self.poll()
        if self._io_in_flight:
            deadline_left = timeout
            while self._io_in_flight and deadline_left > 0:
                try:
                    io_done, result, error = self._io_done.get(timeout=min(0.1, deadline_left))
                except queue.Empty:
                    deadline_left -= 0.1
                    continue
                self._io_in_flight -= 1
                io_done(result, error)
            if self._io_in_flight:
                logger.warning(
                    "hiradix: %d store IO jobs still running after drain", self._io_in_flight
                )

    def shutdown(self) -> None:
        self.drain()
        for pool in self._io_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._io_pools = {}


class _Failed:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


_FAILED = _Failed()
