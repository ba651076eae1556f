"""The L3 page format: a self-describing, checksummed header followed by the payload.

Every page that leaves the process (Redis, NVMe files) is framed by this module, so a
reader can tell that a blob is a hiradix page, which model / layout / page it belongs
to and whether its bytes are intact, before a single byte reaches the KV pool.

Layout (all integers little-endian)::

    offset size field
    0      4    magic            b"HRDX"
    4      1    format version   2 (1: same layout, BLAKE2b-64 digests; still read)
    5      1    codec id         0 raw, 1 zstd over byte planes
    6      1    dtype code       see _DTYPES
    7      1    reserved         0
    8      4    header length    bytes from offset 0 to the end of the header digest
    12     8    raw length       bytes of the decoded payload
    20     8    payload length   bytes after the header
    28     8    raw checksum     XXH3-64 of the RAW (decoded) bytes
    36     4    payload crc32    of the stored payload when compressed (0 for raw)
    40     16   namespace        digest of the model identity
    56     1    ndim
    57     1    layout length
    58     2    page key length
    60     8*n  shape            n = ndim, unsigned 64-bit each
    ..     L    layout           ascii
    ..     K    page key
    ..     ...  extension area   records (below); empty unless the page is signed
    h-8    8    header digest    XXH3-64 of bytes [0, h-8)
    h      ...  payload

Extension records are ``type`` (1 byte), ``length`` (1 byte), ``value``; a reader skips
types it does not know, so adding one needs no new format version. Type 1 is the page
MAC: a keyed BLAKE2b-256 over header bytes [0, start of the MAC value) followed by the
stored payload; it must be the last record. Readers without a key ignore it.

XXH3-64 is a non-cryptographic 64-bit hash: it catches torn, truncated, flipped or
misplaced bytes (the threat here; a page cannot claim another page's identity because
namespace and page key are compared too) at ~20 GB/s per core, where BLAKE2b managed
~0.5 GB/s and was the slowest step of an L3 load. Version 1 pages (BLAKE2b) still verify.

The header digest makes any flipped header byte detectable even by :func:`verify_page`,
which has no expected metadata to compare against; the raw checksum covers the payload
end to end. A compressed payload also carries a CRC32 of the stored bytes: it rejects
a damaged frame before decompressing it, including flips in bits that zstd ignores.

Checksums and digests are public functions: anyone able to write the store can build
a page that passes them for any namespace and page key. The optional MAC (``mac_key``
on every function here) closes that: with a key, a page without a valid MAC is corrupt.

Sizes a page declares are bounded before anything is allocated for them: the raw
length must match the shape (compared with the expected shape on decode, bounded by
``max_raw_bytes`` when verifying without one) and a zstd frame must declare exactly
that many bytes (zstd otherwise sizes its output from the frame, not from a limit).

The zstd codec first splits the values into byte planes (all most-significant bytes,
then the next, ...): the exponent bytes of fp16/bf16 KV are highly repetitive while
the mantissa bytes are noise, and separating them roughly doubles what zstd finds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np
import xxhash
import zstandard

from hiradix.errors import CorruptPage

logger = logging.getLogger(__name__)

__all__ = [
    "CODECS",
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "MAC_KEY_BYTES",
    "MAGIC",
    "MAX_VERIFY_RAW_BYTES",
    "PageMeta",
    "codec_name",
    "decode_page",
    "encode_page",
    "inspect_page",
    "raw_frame",
    "seal_raw_frame",
    "verify_page",
]

MAGIC: Final = b"HRDX"
FORMAT_VERSION: Final = 2
_READABLE_VERSIONS: Final = (1, 2)
NAMESPACE_BYTES: Final = 16

_FIXED = struct.Struct("<4sBBBBIQQ8sI16sBBH")
_DIGEST_BYTES: Final = 8
_MAX_KEY_BYTES: Final = 0xFFFF
_MAX_LAYOUT_BYTES: Final = 0xFF
_MAX_NDIM: Final = 0xFF

_EXT_MAC: Final = 1  # extension record type of the page MAC
_MAC_BYTES: Final = 32
_MAC_PERSON: Final = b"hiradix-page-mac"  # BLAKE2b personalization (16 bytes)
_MAC_RECORD: Final = bytes((_EXT_MAC, _MAC_BYTES))
#: (shortest, longest) MAC key in bytes: a BLAKE2b key is at most 64 bytes.
MAC_KEY_BYTES: Final = (16, 64)
#: The most raw bytes :func:`verify_page` accepts from a page when no bound is given.
MAX_VERIFY_RAW_BYTES: Final = 1 << 30

#: dtype name -> (code, element size in bytes). Codes are part of the on-disk format:
#: append only, never renumber.
_DTYPES: Final[dict[str, tuple[int, int]]] = {
    "uint8": (1, 1),
    "int8": (2, 1),
    "float8_e4m3fn": (3, 1),
    "float8_e5m2": (4, 1),
    "float16": (5, 2),
    "bfloat16": (6, 2),
    "float32": (7, 4),
    "int32": (8, 4),
}
_DTYPE_BY_CODE: Final = {code: name for name, (code, _) in _DTYPES.items()}
DTYPE_SIZES: Final = {name: size for name, (_, size) in _DTYPES.items()}

#: codec name -> id on disk.
CODECS: Final[dict[str, int]] = {"none": 0, "zstd": 1}
_CODEC_BY_ID: Final = {cid: name for name, cid in CODECS.items()}


@dataclass(frozen=True, slots=True)
class PageMeta:
    """What a page claims to be. Compared field by field on decode.

    ``namespace`` is the 16-byte digest of the model identity (architecture, dtype, KV
    layout, page size, TP shard); ``page_key`` the page's content key.
    """

    dtype: str
    layout: str
    shape: tuple[int, ...]
    namespace: bytes
    page_key: bytes

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; allowed: {sorted(_DTYPES)}")
        if len(self.namespace) != NAMESPACE_BYTES:
            raise ValueError(
                f"namespace must be {NAMESPACE_BYTES} bytes, got {len(self.namespace)}"
            )
        if len(self.page_key) > _MAX_KEY_BYTES:
            raise ValueError(f"page_key longer than {_MAX_KEY_BYTES} bytes")
        if not self.layout.isascii() or len(self.layout) > _MAX_LAYOUT_BYTES:
            raise ValueError(f"layout must be ascii, at most 255 chars: {self.layout!r}")
        if len(self.shape) > _MAX_NDIM or any(int(d) < 0 for d in self.shape):
            raise ValueError(f"shape must have <= 255 non-negative dims: {self.shape!r}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


# zstd (de)compressor objects are not thread-safe: one set per thread, reused.
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def _check_mac_key(mac_key: bytes | None) -> None:
    low, high = MAC_KEY_BYTES
    if mac_key is not None and not low <= len(mac_key) <= high:
        raise ValueError(f"mac_key must be {low} to {high} bytes, got {len(mac_key)}")


def _mac(mac_key: bytes, covered_header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    mac = hashlib.blake2b(key=mac_key, digest_size=_MAC_BYTES, person=_MAC_PERSON)
    mac.update(covered_header)
    mac.update(payload)
    return mac.digest()


def _checksum(data: bytes | memoryview, version: int = FORMAT_VERSION) -> bytes:
    if version == 1:
        return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).digest()
    return xxhash.xxh3_64_digest(data)


def _as_bytes_view(raw: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    if isinstance(raw, np.ndarray):
        arr = np.ascontiguousarray(raw)
        return arr.reshape(-1).view(np.uint8).data
    view = memoryview(raw)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _split_planes(raw: memoryview, itemsize: int) -> bytes:
    """Values -> byte planes, most significant byte plane first (little-endian input)."""
    if itemsize == 1:
        return bytes(raw)
    values = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    return values[:, ::-1].T.tobytes()


def _join_planes(planes: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return planes
    stacked = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)
    return stacked.T[:, ::-1].tobytes()


def codec_name(codec: object) -> str:
    # Accept the config's Codec enum as well as its string value.
    name = str(getattr(codec, "value", codec)).lower()
    if name not in CODECS:
        raise ValueError(f"codec {codec!r} not supported; allowed: {sorted(CODECS)}")
    return name


def encode_page(
    raw: bytes | bytearray | memoryview | np.ndarray,
    meta: PageMeta,
    codec: str = "none",
    level: int = 3,
    *,
    mac_key: bytes | None = None,
) -> bytes:
    """Frame one page. ``raw`` must be exactly ``meta.nbytes`` long (``ValueError`` if not).

    With ``mac_key`` (16 to 64 bytes) the page carries a MAC over its header and payload.
    """
    name = codec_name(codec)
    _check_mac_key(mac_key)
    view = _as_bytes_view(raw)
    if view.nbytes != meta.nbytes:
        raise ValueError(
            f"page has {view.nbytes} bytes but meta {meta.dtype}{list(meta.shape)} "
            f"needs {meta.nbytes}"
        )
    if name == "zstd":
        payload: bytes | memoryview = _compressor(level).compress(
            _split_planes(view, meta.itemsize)
        )
        payload_crc = zlib.crc32(payload)
    else:
        payload, payload_crc = view, 0
    header = _pack_header(
        meta, CODECS[name], view.nbytes, payload, _checksum(view), payload_crc, mac_key
    )
    return b"".join((header, payload))


def _header_len(meta: PageMeta, signed: bool = False) -> int:
    fields = _FIXED.size + 8 * len(meta.shape) + len(meta.layout) + len(meta.page_key)
    return fields + (len(_MAC_RECORD) + _MAC_BYTES if signed else 0) + _DIGEST_BYTES


def raw_frame(meta: PageMeta, *, mac_key: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An unfilled uncompressed page: ``(frame, payload)``, both uint8 arrays, ``payload``
    being the frame's last ``meta.nbytes`` bytes. Write the raw page into ``payload`` and
    call :func:`seal_raw_frame` (with the same ``mac_key``): the page is framed with one
    copy of the KV and no zero-fill (what :func:`encode_page` with ``codec="none"``
    returns, byte for byte)."""
    _check_mac_key(mac_key)
    header_len = _header_len(meta, mac_key is not None)
    frame = np.empty(header_len + meta.nbytes, dtype=np.uint8)
    return frame, frame[header_len:]


def seal_raw_frame(
    frame: np.ndarray, meta: PageMeta, *, mac_key: bytes | None = None
) -> memoryview:
    """Write the header of a filled :func:`raw_frame`; returns the page's bytes (a view
    of ``frame``)."""
    _check_mac_key(mac_key)
    header_len = frame.nbytes - meta.nbytes
    if header_len != _header_len(meta, mac_key is not None):
        raise ValueError(f"frame of {frame.nbytes} bytes is not a raw frame for {meta}")
    payload = frame[header_len:].data
    header = _pack_header(
        meta, CODECS["none"], meta.nbytes, payload, _checksum(payload), 0, mac_key
    )
    frame[:header_len] = np.frombuffer(header, dtype=np.uint8)
    return frame.data


def _pack_header(
    meta: PageMeta,
    codec_id: int,
    raw_len: int,
    payload: bytes | memoryview,
    checksum: bytes,
    payload_crc: int,
    mac_key: bytes | None,
) -> bytes:
    layout = meta.layout.encode("ascii")
    ndim = len(meta.shape)
    header_len = _header_len(meta, mac_key is not None)
    payload_len = memoryview(payload).nbytes
    body = b"".join(
        (
            _FIXED.pack(
                MAGIC,
                FORMAT_VERSION,
                codec_id,
                _DTYPES[meta.dtype][0],
                0,
                header_len,
                raw_len,
                payload_len,
                checksum,
                payload_crc,
                bytes(meta.namespace),
                ndim,
                len(layout),
                len(meta.page_key),
            ),
            struct.pack(f"<{ndim}Q", *meta.shape),
            layout,
            bytes(meta.page_key),
        )
    )
    if mac_key is not None:
        body += _MAC_RECORD
        body += _mac(mac_key, body, payload)
    return body + _checksum(body)


@dataclass(frozen=True, slots=True)
class _Header:
    meta: PageMeta
    codec_id: int
    raw_len: int
    payload_len: int
    checksum: bytes
    payload_crc: int
    header_len: int
    version: int
    #: (header bytes the MAC covers, the MAC) when the page is signed
    mac: tuple[int, bytes] | None


def _parse_extensions(view: memoryview, start: int, end: int) -> tuple[int, bytes] | None:
    """The MAC record of the extension area ``view[start:end]``, if any."""
    pos = start
    mac = None
    while pos < end:
        if pos + 2 > end:
            raise CorruptPage("truncated extension record")
        kind, length = view[pos], view[pos + 1]
        value_at = pos + 2
        if value_at + length > end:
            raise CorruptPage(f"extension record of {length} bytes overruns the header")
        if kind == _EXT_MAC:
            if length != _MAC_BYTES or value_at + length != end:
                raise CorruptPage("malformed MAC record")
            mac = (value_at, bytes(view[value_at:end]))
        pos = value_at + length
    return mac


def _parse_header(blob: bytes | bytearray | memoryview) -> _Header:
    view = memoryview(blob)
    if view.nbytes < _FIXED.size + _DIGEST_BYTES:
        raise CorruptPage(f"truncated header: {view.nbytes} bytes")
    (magic, version, codec_id, dtype_code, reserved, header_len, raw_len, payload_len,
     checksum, payload_crc, namespace, ndim, layout_len, key_len) = _FIXED.unpack_from(view, 0)  # fmt: skip
    if magic != MAGIC:
        raise CorruptPage(f"bad magic {bytes(magic)!r}")
    if version not in _READABLE_VERSIONS:
        raise CorruptPage(f"unsupported format version {version}")
    minimum = _FIXED.size + 8 * ndim + layout_len + key_len + _DIGEST_BYTES
    if header_len < minimum or header_len > view.nbytes:
        raise CorruptPage(f"bad header length {header_len} (blob {view.nbytes} bytes)")
    digest_at = header_len - _DIGEST_BYTES
    if _checksum(view[:digest_at], version) != view[digest_at:header_len]:
        raise CorruptPage("header digest mismatch")
    # Past the digest every field is as written; the checks below catch writer bugs.
    if reserved != 0:
        raise CorruptPage(f"reserved byte is {reserved}")
    if codec_id not in _CODEC_BY_ID:
        raise CorruptPage(f"unknown codec id {codec_id}")
    if dtype_code not in _DTYPE_BY_CODE:
        raise CorruptPage(f"unknown dtype code {dtype_code}")
    pos = _FIXED.size
    shape = struct.unpack_from(f"<{ndim}Q", view, pos)
    pos += 8 * ndim
    layout = bytes(view[pos : pos + layout_len])
    pos += layout_len
    page_key = bytes(view[pos : pos + key_len])
    mac = _parse_extensions(view, pos + key_len, digest_at)
    try:
        meta = PageMeta(
            dtype=_DTYPE_BY_CODE[dtype_code],
            layout=layout.decode("ascii"),
            shape=tuple(shape),
            namespace=bytes(namespace),
            page_key=page_key,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptPage(f"bad header field: {exc}") from exc
    if raw_len != meta.nbytes:
        raise CorruptPage(f"raw length {raw_len} does not match shape ({meta.nbytes})")
    if payload_len != view.nbytes - header_len:
        raise CorruptPage(f"payload is {view.nbytes - header_len} bytes, header says {payload_len}")
    if codec_id == CODECS["none"] and payload_len != raw_len:
        raise CorruptPage(f"raw payload length {payload_len} != raw length {raw_len}")
    return _Header(
        meta, codec_id, raw_len, payload_len, bytes(checksum), payload_crc, header_len, version,
        mac,
    )  # fmt: skip


def _check_mac(view: memoryview, header: _Header, mac_key: bytes) -> None:
    if header.mac is None:
        raise CorruptPage("page has no MAC but a MAC key is configured")
    covered, mac = header.mac
    expected = _mac(mac_key, view[:covered], view[header.header_len :])
    if not hmac.compare_digest(expected, mac):
        raise CorruptPage("MAC mismatch (forged, or written with another key)")


def _decode_payload(
    view: memoryview, header: _Header, mac_key: bytes | None, max_raw_bytes: int | None = None
) -> bytes | memoryview:
    if max_raw_bytes is not None and header.raw_len > max_raw_bytes:
        raise CorruptPage(
            f"page claims {header.raw_len} raw bytes, more than the bound {max_raw_bytes}"
        )
    if mac_key is not None:  # before anything else reads the payload
        _check_mac(view, header, mac_key)
    payload = view[header.header_len :]
    raw: bytes | memoryview
    if header.codec_id == CODECS["none"]:
        raw = payload  # no copy: a view of the blob
    else:
        if zlib.crc32(payload) != header.payload_crc:
            raise CorruptPage("compressed payload crc32 mismatch")
        _check_frame_size(payload, header.raw_len)
        try:
            planes = _decompressor().decompress(payload, max_output_size=header.raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptPage(f"zstd: {exc}") from exc
        if len(planes) != header.raw_len:
            raise CorruptPage(f"decompressed {len(planes)} bytes, expected {header.raw_len}")
        raw = _join_planes(planes, header.meta.itemsize)
    if _checksum(raw, header.version) != header.checksum:
        raise CorruptPage("payload checksum mismatch")
    return raw


def _check_frame_size(payload: memoryview, raw_len: int) -> None:
    """The zstd frame must declare exactly ``raw_len`` bytes: zstd sizes its output from
    the frame header (``max_output_size`` is ignored when the frame declares a size, and
    allocated up front when it does not), so a small frame could demand gigabytes."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CorruptPage(f"zstd frame header: {exc}") from exc
    if declared == -1:
        raise CorruptPage("zstd frame does not declare its content size")
    if declared != raw_len:
        raise CorruptPage(f"zstd frame declares {declared} bytes, the header {raw_len}")


def decode_page(
    blob: bytes | bytearray | memoryview, expect: PageMeta, *, mac_key: bytes | None = None
) -> bytes | memoryview:
    """Verify ``blob`` against ``expect`` and return the raw page bytes: for a raw
    (``none``) page a view into ``blob`` (no copy; valid while ``blob`` is), else bytes.

    Raises :class:`CorruptPage` naming the first field that does not match (magic,
    version, codec, dtype, layout, shape, namespace, page key, length, MAC, checksum).
    With ``mac_key``, a page without a MAC made with that key is corrupt; without one,
    a page's MAC is not checked.
    """
    _check_mac_key(mac_key)
    header = _parse_header(blob)
    got = header.meta
    for field in ("namespace", "page_key", "dtype", "layout", "shape"):
        if getattr(got, field) != getattr(expect, field):
            raise CorruptPage(
                f"{field} mismatch: page has {getattr(got, field)!r}, "
                f"expected {getattr(expect, field)!r}"
            )
    # raw_len == expect.nbytes now: the caller's expectation bounds every allocation.
    return _decode_payload(memoryview(blob), header, mac_key)


def inspect_page(blob: bytes | memoryview) -> PageMeta:
    """Read and verify the header only (cheap; not the MAC); raises :class:`CorruptPage`."""
    return _parse_header(blob).meta


def verify_page(
    blob: bytes | memoryview,
    *,
    mac_key: bytes | None = None,
    max_raw_bytes: int = MAX_VERIFY_RAW_BYTES,
) -> PageMeta:
    """Fully verify a page without knowing what to expect (header, MAC when ``mac_key``
    is given, payload, checksum). A page claiming more than ``max_raw_bytes`` raw bytes
    is refused before it is decompressed.

    Used by ``hiradix store verify``; raises :class:`CorruptPage`.
    """
    _check_mac_key(mac_key)
    header = _parse_header(blob)
    _decode_payload(memoryview(blob), header, mac_key, max_raw_bytes)
    return header.meta


def page_codec(blob: bytes | memoryview) -> str:
    """The codec name a (header-verified) page was written with."""
    return _CODEC_BY_ID[_parse_header(blob).codec_id]
