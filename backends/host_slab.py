"""L2: a pre-allocated host buffer of page-sized slots with its own slot allocator.

Layout: ``buffers`` holds one ``[layers, slots, heads, head_dim]`` tensor per per-layer
buffer of the device pool, in its storage dtype, so a page copy is one index copy per
layer and buffer. An MHA pool has two (``k`` and ``v``); an MLA pool one (its latent
``kv_buffer``: ``parts=1``, ``k`` holds it and ``v`` is ``None``). Memory is plain on a CPU
engine and pinned when the device is CUDA (page-locked memory is what lets a copy run on a
side stream without a staging buffer). Running out of slots returns ``None``: the tree
then evicts host leaves or skips the demotion; it is never an exception.

Plain memory is faulted in by a background thread right after allocation (Linux
``MADV_POPULATE_WRITE``, which leaves the contents alone, so demotions may write slots
meanwhile): otherwise the first demotion into each page pays a page fault and the
kernel's zeroing on the scheduler thread (measured: a 6 MB copy into never-used memory
2.2 ms, into populated memory 0.65 ms). Pinned memory is populated by the allocator.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from hiradix.linux import libc

logger = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = 4096
_POPULATE_CHUNK = 64 << 20


def populate(tensors: list[torch.Tensor], chunk_bytes: int = _POPULATE_CHUNK) -> bool:
    """Fault in the pages behind ``tensors`` without changing their contents (safe while
    other threads write them). Returns False where the OS cannot (not Linux, a kernel
    before 5.14): the pages are then faulted in by their first use, as without this."""
    lib = libc()
    if lib is None:
        return False
    madvise = lib.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    for tensor in tensors:
        begin = (tensor.data_ptr() + _PAGE - 1) // _PAGE * _PAGE
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // _PAGE * _PAGE
        for lo in range(begin, end, chunk_bytes):
            if madvise(lo, min(chunk_bytes, end - lo), _MADV_POPULATE_WRITE) != 0:
                logger.debug("hiradix: MADV_POPULATE_WRITE failed (errno %d)", ctypes.get_errno())
                return False
    return True


class HostSlab:
    """Host-memory slots for KV pages. Called only on the scheduler thread."""

    def __init__(
        self,
        num_slots: int,
        *,
        layers: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        page_size: int = 1,
        pin_memory: bool = False,
        v_head_dim: int | None = None,
        parts: int = 2,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        num_slots -= num_slots % page_size
        if num_slots <= 0:
            raise ValueError(f"host tier too small: {num_slots} slots for page size {page_size}")
        if parts not in (1, 2):
            raise ValueError(f"parts must be 1 (MLA latent) or 2 (K and V), got {parts}")
        self.page_size = page_size
        self.num_slots = num_slots
        self.layers = layers
        shape = (layers, num_slots, heads, head_dim)
        v_shape = (layers, num_slots, heads, v_head_dim or head_dim)
        self.k = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        self.v: torch.Tensor | None = None
        if parts == 2:
            self.v = torch.empty(v_shape, dtype=dtype, pin_memory=pin_memory)
        #: the per-layer buffers of slot rows, in the device pool's order
        self.buffers: tuple[torch.Tensor, ...] = (self.k,) if self.v is None else (self.k, self.v)
        self.bytes_per_token = sum(b[:, 0].numel() for b in self.buffers) * self.k.element_size()
        self.clear()
        self.populated = threading.Event()  # set once the background fault-in has ended
        if pin_memory:
            self.populated.set()
        else:
            threading.Thread(target=self._populate, name="hiradix-populate", daemon=True).start()

    def _populate(self) -> None:
        try:
            populate(list(self.buffers))
        finally:
            self.populated.set()

    @staticmethod
    def slots_for_bytes(nbytes: int, bytes_per_token: int) -> int:
        return max(0, nbytes // max(1, bytes_per_token))

    def clear(self) -> None:
        """Every slot free again (used by flush: the tree forgot all nodes)."""
        pages = self.num_slots // self.page_size
        self._free_pages = torch.arange(pages - 1, -1, -1, dtype=torch.int64).tolist()

    @property
    def free_slots(self) -> int:
        return len(self._free_pages) * self.page_size

    @property
    def used_slots(self) -> int:
        return self.num_slots - self.free_slots

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` slots (a multiple of the page size), or ``None`` if they do not fit."""
        if n % self.page_size:
            raise ValueError(f"host alloc of {n} slots is not a multiple of page {self.page_size}")
        pages = n // self.page_size
        if pages > len(self._free_pages):
            return None
        taken = self._free_pages[len(self._free_pages) - pages :]
        del self._free_pages[len(self._free_pages) - pages :]
        taken.reverse()  # a fresh or freshly freed run comes out ascending: one contiguous range
        starts = torch.tensor(taken, dtype=torch.int64) * self.page_size
        if self.page_size == 1:
            return starts
        offsets = torch.arange(self.page_size, dtype=torch.int64)
        return (starts[:, None] + offsets[None, :]).reshape(-1)

    def free(self, slots: torch.Tensor) -> None:
        if len(slots) == 0:
            return
        pages = slots.reshape(-1)[:: self.page_size] // self.page_size
        self._free_pages.extend(reversed(pages.tolist()))
