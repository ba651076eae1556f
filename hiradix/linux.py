"""libc, for the few Linux calls hiradix makes through ctypes (thread names, page
fault-in). Best effort: ``None`` where there is no Linux libc."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) in the OS too, so ``top -H`` and
    ``/proc/<pid>/task/*/comm`` show which threads are hiradix's."""
    lib = libc()
    if lib is not None:
        lib.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
