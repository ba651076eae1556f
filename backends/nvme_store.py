"""An L3 store on a local (NVMe) file system: one file per page.

Layout: ``<root>/<namespace>/<aa>/<bb>/<quoted key>.page`` where ``aa``/``bb`` are the
first four hex digits of the page key (keeps directories small) and the file name is
the whole store key percent-encoded (``:`` -> ``%3A``), so :meth:`NvmeStore.scan` can
give back the exact keys.

Crash safety: a page is written to ``.<name>.<pid>.<thread>.<random>.tmp`` in the same
directory and renamed over the final name with ``os.replace`` (atomic on POSIX), so a
reader never sees a torn page, also after a crash. Leftover temp files of dead
processes are removed on start and by a full :meth:`NvmeStore.gc`. With ``fsync=True``
the data and the directory entry are fsynced before the write counts as done.

Expiry is encoded in the file's mtime, set with ``os.utime`` before the rename: mtime ==
expiry time (seconds since the epoch, ``clock=time.time``); an mtime of exactly 0 means
"never expires". No sidecar files. A sliding refresh on a hit rewrites the mtime.
Anything else that touches a page file (rewriting it in place, ``touch``) sets its
mtime to "now" and so expires it: the safe direction (a miss), never a stale hit. Expiry
is lazy on read plus a bounded sweep (a heap of expiry times) on every write batch;
``gc(None)`` walks the whole directory.

Capacity: an in-memory index ordered by last use (atime is unreliable) evicts the least
recently used pages when a write would exceed ``capacity_bytes``. The index is rebuilt
by scanning the directory on start (a restarted server reuses what is on disk, oldest
ctime first) and every ``rescan_interval`` seconds, which absorbs drift when several
processes share one directory: renames are atomic, a page deleted by another process
between lookup and read is a miss, and each process evicts to keep the total in bounds.

Disk full (``ENOSPC``/``EDQUOT``) makes that put return ``False`` (logged, counted);
a missing or unwritable root raises ``StoreUnavailable``.

Sizes: a file bigger than ``capacity_bytes`` cannot be a page any store of this size
wrote (``put_many`` refuses such blobs), so reads check ``st_size`` first and treat it
as a miss (removed, counted in ``oversized_pages``) without reading it into memory.

Permissions: KV is user data. What the store creates is owner-only (directories 0700,
files 0600) regardless of the umask; with ``group_access=True`` the file's group may
read and write too (directories 2770, so new files keep the directory's group; files
0660), for servers running as different users of one group. A root that already
exists keeps its mode (the operator's choice).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, unquote

from hiradix.backends.base import PageStore, StoreKey, StoreStats, check_ttl, split_key

from hiradix.errors import StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = ["NvmeStore"]

_PAGE_SUFFIX = ".page"
_TMP_SUFFIX = ".tmp"
_NEVER_NS = 0  # mtime meaning "no expiry"
_SWEEP_PER_WRITE = 8
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_OWNER_MODES = (0o700, 0o600)  # (directories, files)
_GROUP_MODES = (0o2770, 0o660)


@dataclass(slots=True)
class _Entry:
    size: int
    expiry_ns: int


@dataclass(frozen=True, slots=True)
class _DiskPage:
    key: StoreKey
    path: str
    size: int
    expiry_ns: int
    ctime: float


class NvmeStore(PageStore):
    """Pages as files under ``path``, at most ``capacity_bytes`` in total."""

    name = "nvme"

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
        rescan_interval: float = 60.0,
        group_access: bool = False,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.root = os.path.abspath(os.fspath(path))
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.rescan_interval = rescan_interval
        self.group_access = group_access
        self._dir_mode, self._file_mode = _GROUP_MODES if group_access else _OWNER_MODES
        self._clock = clock
        self._lock = threading.Lock()
        self._index: OrderedDict[StoreKey, _Entry] = OrderedDict()  # oldest use first
        self._expiry_heap: list[tuple[int, StoreKey]] = []
        self._used = 0
        self._next_rescan = 0.0
        self.disk_full_failures = 0
        self.evictions = 0
        self.expirations = 0
        self.oversized_pages = 0
        try:
            self._make_dirs(self.root)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create nvme store root {self.root}: {exc}") from exc
        removed = self._clean_temp_files()
        self._rebuild_index()
        logger.info(
            "nvme store at %s: %d pages, %d bytes on disk (%d stale temp files removed)",
            self.root, len(self._index), self._used, removed,
        )  # fmt: skip

    # -- PageStore ---------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[StoreKey, bytes]], ttl: float | None) -> list[bool]:
        check_ttl(ttl)
        self._check_root()
        now = self._clock()
        if now >= self._next_rescan:
            self._rebuild_index()
        self._sweep(_SWEEP_PER_WRITE)
        expiry_ns = _NEVER_NS if ttl is None else max(1, int((now + ttl) * 1e9))
        return [self._put_one(key, blob, expiry_ns) for key, blob in items]

    def get_many(
        self, keys: Sequence[StoreKey], refresh_ttl: float | None = None
    ) -> list[bytes | None]:
        check_ttl(refresh_ttl)
        self._check_root()
        return [cast("bytes | None", self._get_one(key, refresh_ttl)) for key in keys]

    def get_many_into(
        self,
        keys: Sequence[StoreKey],
        buffers: MutableSequence[bytearray],
        refresh_ttl: float | None = None,
    ) -> list[memoryview | None]:
        check_ttl(refresh_ttl)
        self._check_root()
        while len(buffers) < len(keys):
            buffers.append(bytearray())
        return [
            cast("memoryview | None", self._get_one(key, refresh_ttl, buffers, i))
            for i, key in enumerate(keys)
        ]

    def exists_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        self._check_root()
        now_ns = int(self._clock() * 1e9)
        out = []
        for key in keys:
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                out.append(False)
                continue
            except OSError as exc:
                raise StoreUnavailable(f"nvme store at {self.root}: {exc}") from exc
            out.append(not _due(st.st_mtime_ns, now_ns) and st.st_size <= self.capacity_bytes)
        return out

    def delete_many(self, keys: Sequence[StoreKey]) -> int:
        self._check_root()
        deleted = 0
        for key in keys:
            with self._lock:
                self._forget_locked(key)
            if self._unlink(self._path(key)):
                deleted += 1
        return deleted

    def scan(self, namespace: str | None = None) -> Iterator[StoreKey]:
        self._check_root()
        for page in self._walk(namespace):
            yield page.key

    def stats(self) -> StoreStats:
        self._check_root()
        by_ns: dict[str, tuple[int, int]] = {}
        now_ns = int(self._clock() * 1e9)
        pages = total = 0
        for page in self._walk(None):
            if _due(page.expiry_ns, now_ns):
                continue
            ns = split_key(page.key)[0]
            count, nbytes = by_ns.get(ns, (0, 0))
            by_ns[ns] = (count + 1, nbytes + page.size)
            pages += 1
            total += page.size
        return StoreStats(pages=pages, bytes=total, by_namespace=by_ns)

    def gc(self, max_items: int | None = None) -> int:
        self._check_root()
        if max_items is not None:
            return self._sweep(max_items)
        # Full pass: the directory is the truth (other processes write here too).
        now_ns = int(self._clock() * 1e9)
        removed = 0
        for page in self._walk(None):
            if _due(page.expiry_ns, now_ns) and self._unlink_if_due(page.path, now_ns):
                removed += 1
        self._clean_temp_files()
        self._rebuild_index()
        self.expirations += removed
        return removed

    def close(self) -> None:
        with self._lock:
            self._index.clear()
            self._expiry_heap.clear()
            self._used = 0

    def describe(self) -> str:
        return f"nvme store at {self.root}"

    # -- one page ----------------------------------------------------------------------

    def _put_one(self, key: StoreKey, blob: bytes, expiry_ns: int) -> bool:
        size = len(blob)
        if size > self.capacity_bytes:
            return False
        victims = self._reserve(key, size, expiry_ns)
        for victim in victims:
            self._unlink(self._path(victim))
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(
            directory,
            f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}."
            f"{secrets.token_hex(4)}{_TMP_SUFFIX}",
        )
        try:
            self._write_file(tmp, directory, blob, expiry_ns)
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(directory)
        except OSError as exc:
            self._unlink(tmp)
            with self._lock:
                self._forget_locked(key)
            if exc.errno in _DISK_FULL:
                self.disk_full_failures += 1
                if self.disk_full_failures == 1 or self.disk_full_failures % 1000 == 0:
                    logger.warning(
                        "nvme store at %s: disk full, page not stored (%d so far)",
                        self.root, self.disk_full_failures,
                    )  # fmt: skip
                return False
            if isinstance(exc, FileNotFoundError) and os.path.isdir(self.root):
                return False  # our temp file was removed under us (another process)
            raise StoreUnavailable(f"nvme store at {self.root}: {exc}") from exc
        return True

    def _write_file(self, tmp: str, directory: str, blob: bytes, expiry_ns: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp, flags, self._file_mode)
        except FileNotFoundError:
            self._make_dirs(directory)
            fd = os.open(tmp, flags, self._file_mode)
        try:
            if self.group_access:
                os.fchmod(fd, self._file_mode)  # the umask may have removed group bits
            view = memoryview(blob)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(tmp, ns=(time.time_ns(), expiry_ns))

    def _get_one(
        self,
        key: StoreKey,
        refresh_ttl: float | None,
        buffers: MutableSequence[bytearray] | None = None,
        slot: int = 0,
    ) -> bytes | memoryview | None:
        """One page: into a fresh ``bytes``, or into ``buffers[slot]`` (grown if needed)
        returning a view of it."""
        path = self._path(key)
        data: bytes | memoryview
        now = self._clock()
        now_ns = int(now * 1e9)
        expiry_ns = 0
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            with self._lock:
                self._forget_locked(key)
            return None
        except OSError as exc:
            raise StoreUnavailable(f"nvme store at {self.root}: {exc}") from exc
        try:
            st = os.fstat(fd)
            expired = _due(st.st_mtime_ns, now_ns)
            oversized = st.st_size > self.capacity_bytes  # checked before reading a byte
            if not expired and not oversized:
                if buffers is None:
                    data = _read_bytes(fd, st.st_size)
                else:
                    data = _read_into(fd, st.st_size, buffers, slot)
                expiry_ns = st.st_mtime_ns
                if refresh_ttl is not None:  # on the inode we read, even if replaced since
                    expiry_ns = self._refresh(fd, now + refresh_ttl, expiry_ns)
        except OSError as exc:
            raise StoreUnavailable(f"nvme store at {self.root}: {exc}") from exc
        finally:
            os.close(fd)
        if oversized and not expired:
            self._drop_oversized(key, path, st.st_size)
            return None
        if expired:
            with self._lock:
                self._forget_locked(key)
            if self._unlink_if_due(path, now_ns):
                self.expirations += 1
            return None
        with self._lock:
            self._touch_locked(key, len(data), expiry_ns)
        return data

    def _refresh(self, fd: int, expiry: float, old_expiry_ns: int) -> int:
        """Move a page's expiry (its mtime) to ``expiry``; returns the expiry it has now.

        Setting explicit times needs ownership: a page another user of the group wrote
        (``group_access``) keeps its expiry instead of failing the read."""
        expiry_ns = int(expiry * 1e9)
        try:
            os.utime(fd, ns=(time.time_ns(), expiry_ns))
        except PermissionError:
            return old_expiry_ns
        return expiry_ns

    def _drop_oversized(self, key: StoreKey, path: str, size: int) -> None:
        with self._lock:
            self._forget_locked(key)
        self.oversized_pages += 1
        if self.oversized_pages == 1 or self.oversized_pages % 1000 == 0:
            logger.warning(
                "nvme store at %s: %s is %d bytes, more than the store's capacity %d: "
                "not a page, removed unread (%d so far)",
                self.root, path, size, self.capacity_bytes, self.oversized_pages,
            )  # fmt: skip
        self._unlink(path)

    # -- index (all *_locked: caller holds self._lock; no IO under it) -----------------

    def _reserve(self, key: StoreKey, size: int, expiry_ns: int) -> list[StoreKey]:
        """Account for ``key`` now and return the LRU victims the caller must delete."""
        victims: list[StoreKey] = []
        with self._lock:
            self._forget_locked(key)
            while self._index and self._used + size > self.capacity_bytes:
                victim, entry = self._index.popitem(last=False)
                self._used -= entry.size
                victims.append(victim)
            self._touch_locked(key, size, expiry_ns)
        self.evictions += len(victims)
        return victims

    def _touch_locked(self, key: StoreKey, size: int, expiry_ns: int) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._used -= old.size
        self._index[key] = _Entry(size, expiry_ns)
        self._used += size
        if expiry_ns != _NEVER_NS and (old is None or old.expiry_ns != expiry_ns):
            heapq.heappush(self._expiry_heap, (expiry_ns, key))
            if len(self._expiry_heap) > 2 * len(self._index) + 1024:
                self._expiry_heap = [
                    (e.expiry_ns, k) for k, e in self._index.items() if e.expiry_ns
                ]
                heapq.heapify(self._expiry_heap)

    def _forget_locked(self, key: StoreKey) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self._used -= old.size

    def _sweep(self, max_items: int) -> int:
        """Expire up to ``max_items`` entries whose expiry (as indexed) is due."""
        now_ns = int(self._clock() * 1e9)
        due: list[StoreKey] = []
        with self._lock:
            heap = self._expiry_heap
            while heap and heap[0][0] <= now_ns and len(due) < max_items:
                expiry_ns, key = heapq.heappop(heap)
                entry = self._index.get(key)
                if entry is not None and entry.expiry_ns == expiry_ns:
                    self._forget_locked(key)
                    due.append(key)
        removed = sum(1 for key in due if self._unlink_if_due(self._path(key), now_ns))
        self.expirations += removed
        return removed

    def _rebuild_index(self) -> None:
        """Re-read the directory: keep our recency order for pages still on disk, put
        pages we did not know (written by another process, or before a restart) first,
        oldest ctime first."""
        pages = {page.key: page for page in self._walk(None)}
        with self._lock:
            known = [k for k in self._index if k in pages]
            known_set = set(known)
            unknown = sorted(
                (p for k, p in pages.items() if k not in known_set), key=lambda p: p.ctime
            )
            self._index = OrderedDict()
            self._expiry_heap = []
            self._used = 0
            for page in unknown:
                self._touch_locked(page.key, page.size, page.expiry_ns)
            for key in known:
                self._touch_locked(key, pages[key].size, pages[key].expiry_ns)
            self._next_rescan = self._clock() + self.rescan_interval

    # -- files -------------------------------------------------------------------------

    def _path(self, key: StoreKey) -> str:
        namespace, page_hex = split_key(key)
        shard = (page_hex + "0000")[:4]
        return os.path.join(self.root, namespace, shard[:2], shard[2:], _quote(key) + _PAGE_SUFFIX)

    def _make_dirs(self, directory: str) -> None:
        """``os.makedirs`` with this store's directory mode on every level it creates
        (``makedirs`` applies its mode to the last level only, and through the umask)."""
        missing: list[str] = []
        while not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for path in reversed(missing):
            try:
                os.mkdir(path, self._dir_mode)
            except FileExistsError:
                continue  # another writer made it first: theirs has our mode too
            os.chmod(path, self._dir_mode)

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise StoreUnavailable(f"nvme store root {self.root} is missing")

    def _walk(self, namespace: str | None) -> Iterator[_DiskPage]:
        top = self.root if namespace is None else os.path.join(self.root, namespace)
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if not name.endswith(_PAGE_SUFFIX) or name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                key = StoreKey(unquote(name[: -len(_PAGE_SUFFIX)]))
                try:
                    split_key(key)
                except ValueError:
                    continue  # not ours
                yield _DiskPage(key, path, st.st_size, st.st_mtime_ns, st.st_ctime)

    def _clean_temp_files(self) -> int:
        """Remove temp files of writers that are gone (this pid's earlier life, or dead)."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
                    continue
                parts = name.split(".")
                try:
                    pid = int(parts[-4])
                except (IndexError, ValueError):
                    pid = -1
                if pid != os.getpid() and _process_alive(pid):
                    continue  # another live process is writing it right now
                if self._unlink(os.path.join(dirpath, name)):
                    removed += 1
        return removed

    def _unlink(self, path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreUnavailable(f"nvme store at {self.root}: {exc}") from exc

    def _unlink_if_due(self, path: str, now_ns: int) -> bool:
        """Delete an expired page unless another writer refreshed or replaced it."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if not _due(st.st_mtime_ns, now_ns):
            return False
        return self._unlink(path)


def _read_bytes(fd: int, size: int) -> bytes:
    """The whole file (``size`` bytes as of ``fstat``) as one allocation of that size."""
    data = os.read(fd, size)
    while len(data) < size:  # short read: the rest, if any
        more = os.read(fd, size - len(data))
        if not more:
            break  # truncated meanwhile: the codec rejects the short page
        data += more
    return data


def _read_into(fd: int, size: int, buffers: MutableSequence[bytearray], slot: int) -> memoryview:
    """The whole file into ``buffers[slot]`` (replaced by a bigger one if too small)."""
    buf = buffers[slot]
    if len(buf) < size:
        buf = buffers[slot] = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:size]])
        if not n:
            break  # truncated meanwhile: the codec rejects the short page
        got += n
    return view[:got]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~:-]*")


def _quote(key: str) -> str:
    """``quote(key, safe="")``; keys of letters, digits, ``_.~-`` and ``:`` (the usual
    ``prefix:ns:page``) take a fast path: only ``:`` needs escaping."""
    if _PLAIN_KEY.fullmatch(key):
        return key.replace(":", "%3A")
    return quote(key, safe="")


def _due(mtime_ns: int, now_ns: int) -> bool:
    return mtime_ns != _NEVER_NS and mtime_ns <= now_ns


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
