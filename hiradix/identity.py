"""What makes KV reusable: the model identity that seeds every L3 page key.

Two servers (or one server before and after a restart or a weight update) share an L3 page
only when every field of :class:`ModelIdentity` matches, plus the tenant namespace, LoRA
``extra_key`` and ``cache_salt`` (``storage_tier.py``). The fields are what changes KV
bytes: the weights (a content fingerprint, not a path or a time), the weights version, the
model and KV dtypes, the KV layout and page size, the shard of the model this process
holds, and the numerics that compute it (attention kernels, engine and torch versions,
device kind).

The weights fingerprint (:func:`weights_fingerprint`) is cheap enough for a 140 GB
checkpoint at start-up and after every ``update_weights_from_disk``; its docstring says
what it reads. Engine-agnostic: never imports sglang.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, fields, replace
from typing import Any

#: bytes of each fixed-offset window read from every weight file
WINDOW = 64 * 1024
#: windows per file, spread evenly from its first to its last byte
WINDOWS = 8
#: bytes read from the start of each tensor of a safetensors file
TENSOR_SAMPLE = 4096
#: most tensors sampled per safetensors file (spread evenly over the file's tensors)
MAX_TENSOR_SAMPLES = 4096
#: a safetensors header larger than this is not parsed (the format's own limit)
MAX_HEADER = 100 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")

_REVISION = re.compile(r"(?:^|/)snapshots/([0-9a-f]{40})(?:/|$)")
_CONTENT_ID = re.compile(r"^(?:[0-9a-f]{64}|[0-9a-f]{40})$")


def _pread(fd: int, length: int, offset: int) -> bytes:
    """Every read the fingerprint makes goes through here (tests count them)."""
    return os.pread(fd, length, offset)


def snapshot_revision(path: str) -> str | None:
    """The Hugging Face hub commit of a snapshot directory (``.../snapshots/<sha>/``)."""
    found = _REVISION.search(os.path.abspath(path).replace(os.sep, "/"))
    return found.group(1) if found else None


def weight_files(path: str) -> list[str]:
    """The weight files a loader could read at ``path``: the file itself, or the files of
    the directory (top level, as SGLang's loaders glob) ending in a weight suffix."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        return []
    return sorted(
        entry.path
        for entry in os.scandir(path)
        if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file()
    )


def _content_id(path: str) -> str | None:
    """For a file in the hub cache (a link into ``blobs/``), the blob's name: the sha256 of
    an LFS file's bytes (a git blob id for a small one), so its content, read for free."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    name = os.path.basename(target)
    if os.path.basename(os.path.dirname(target)) == "blobs" and _CONTENT_ID.match(name):
        return name
    return None


def _window_offsets(size: int) -> list[int]:
    """Offsets of the fixed windows of a file of ``size`` bytes (4 KiB aligned; the last
    one ends at the file's end)."""
    if size <= WINDOW * WINDOWS:
        return [0]  # read whole (one read of at most WINDOW * WINDOWS bytes)
    span = size - WINDOW
    offsets = [(span * k // (WINDOWS - 1)) & ~4095 for k in range(WINDOWS - 1)]
    return [*offsets, span]


def _safetensors_samples(fd: int, size: int, h: Any) -> None:
    """Hash a safetensors file's header (names, dtypes, shapes, offsets) and the first
    ``TENSOR_SAMPLE`` bytes of each tensor (at most ``MAX_TENSOR_SAMPLES`` of them)."""
    if size < 8:
        return
    (header_len,) = struct.unpack("<Q", _pread(fd, 8, 0))
    if not 0 < header_len <= min(MAX_HEADER, size - 8):
        return
    header = _pread(fd, header_len, 8)
    h.update(b"header")
    h.update(header)
    try:
        table = json.loads(header)
    except ValueError:
        return
    spans = []
    for name, entry in table.items() if isinstance(table, dict) else ():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name == "__metadata__" or not isinstance(offsets, list) or len(offsets) != 2:
            continue
        begin, end = offsets
        if isinstance(begin, int) and isinstance(end, int) and 0 <= begin < end:
            spans.append((begin, end))
    spans.sort()
    if len(spans) > MAX_TENSOR_SAMPLES:
        step = len(spans) / MAX_TENSOR_SAMPLES
        spans = [spans[int(i * step)] for i in range(MAX_TENSOR_SAMPLES)]
    base = 8 + header_len
    for begin, end in spans:
        h.update(_pread(fd, min(TENSOR_SAMPLE, end - begin), base + begin))


def file_fingerprint(path: str, h: Any) -> None:
    """Feed one weight file's identity into ``h``: its name and size, then its hub blob
    id when it has one (no read), else its sampled content."""
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}\x00{size}\x00".encode())
    blob = _content_id(path)
    if blob is not None:
        h.update(b"blob:" + blob.encode())
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = _window_offsets(size)
        length = size if len(offsets) == 1 else WINDOW
        for offset in offsets:
            h.update(_pread(fd, length, offset))
        if path.endswith(".safetensors"):
            _safetensors_samples(fd, size, h)
    finally:
        os.close(fd)


def weights_fingerprint(path: str) -> str | None:
    """A content fingerprint of the checkpoint at ``path`` (a directory or one file), or
    ``None`` when it holds no weight file.

    What it reads, per weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
    ``*.gguf``, ``*.ckpt`` at the top level of the directory, sorted by name):

    - its name and size (one ``stat``); never its modification time, so a copy or a
      re-download of the same bytes has the same fingerprint;
    - a file that is a link into a Hugging Face hub cache (``.../blobs/<sha256>``): the
      blob's name, which is the sha256 of its bytes. Nothing is read.
    - any other file: ``WINDOWS`` (8) windows of ``WINDOW`` (64 KiB) at fixed fractions
      of its size, the first at byte 0 and the last ending at its last byte (a file of at
      most 512 KiB is read whole); for a safetensors file also its header (tensor names,
      dtypes, shapes and offsets; typically tens of KiB per shard) and the first 4 KiB of
      each tensor (at most 4096 tensors per file), so that a checkpoint whose tensors
      changed anywhere near their start (a fine-tune, also one of a few layers or only
      the norms) differs.

    Cost for a 140 GB checkpoint of 30 safetensors shards and 723 tensors (Llama-3-70B):
    30 x 512 KiB of windows + 30 headers + 723 x 4 KiB, about 19 MiB in about 1,000
    positioned reads: tens of milliseconds on local NVMe, cold; the same files the loader
    has just read are usually still in the page cache. From the hub cache: no reads.

    What it can miss: a change confined to bytes that no window and no tensor's first
    4 KiB covers (e.g. the tail of one matrix). Give such checkpoints another path, or a
    distinct ``--weight-version``, which is part of the identity too."""
    files = weight_files(path)
    if not files:
        return None
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        file_fingerprint(file, h)
    return h.hexdigest()


def weights_id(path: str | None, load_format: str, nonce: str) -> str:
    """The identity's ``weights`` field for weights loaded from ``path`` with
    ``load_format``: ``dummy`` for SGLang's seeded dummy weights (the same for the same
    shapes), ``files:<fingerprint>`` for local files, else ``nonce:<nonce>`` (weights
    this process cannot fingerprint: its pages are never shared or reused)."""
    if load_format == "dummy":
        return "dummy"
    if path:
        try:
            fingerprint = weights_fingerprint(path)
        except OSError:
            fingerprint = None
        if fingerprint is not None:
            return f"files:{fingerprint}"
    return f"nonce:{nonce}"


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Every field that changes the KV bytes a server computes (see the module docstring).
    ``key()`` is the string hashed into each page's namespace."""

    architecture: str
    config: str  # digest of the model's full config
    dtype: str  # model (activation) dtype
    weights: str  # weights_id(): files:<fingerprint> | dummy | nonce:<random>
    weight_version: str  # SGLang's --weight-version (changed by weight updates)
    quantization: str  # weight quantization method and KV scale file digest
    kv: str  # --kv-cache-dtype, the pool's dtype and its store dtype
    layout: str  # pool class, heads, head dims, layers held
    page_size: int
    shard: str  # tp<rank>of<size>[/pp<stage>of<stages>]
    numerics: str  # attention backends, engine and torch versions, device kind

    def key(self) -> str:
        return "|".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def with_weights(self, weights: str, weight_version: str) -> ModelIdentity:
        return replace(self, weights=weights, weight_version=weight_version)


def digest_file(path: str | None) -> str:
    """blake2b of a small file's bytes (e.g. a KV scale JSON), ``-`` for none."""
    if not path:
        return "-"
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=8).hexdigest()
    except OSError:
        return f"unreadable:{path}"
