"""The L3 page format: round trips, every kind of corruption, byte-plane compression."""

from __future__ import annotations

import hashlib
import logging
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiradix.codec import (
    DTYPE_SIZES,
    FORMAT_VERSION,
    PageMeta,
    decode_page,
    encode_page,
    inspect_page,
    page_codec,
    raw_frame,
    seal_raw_frame,
    verify_page,
)
from hiradix.errors import CorruptPage

logger = logging.getLogger(__name__)

NS = bytes(range(16))
KEY = bytes.fromhex("ab" * 32)
CODECS = ["none", "zstd"]


def meta_for(dtype: str, nbytes: int, key: bytes = KEY, ns: bytes = NS) -> PageMeta:
    return PageMeta(
        dtype=dtype,
        layout="layer_kv_token_head_dim",
        shape=(nbytes // DTYPE_SIZES[dtype],),
        namespace=ns,
        page_key=key,
    )


def kv_like(n_values: int, seed: int = 0) -> np.ndarray:
    """bf16 bit patterns of normally distributed values (as uint16)."""
    values = np.random.default_rng(seed).normal(0, 1, n_values).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
def test_round_trip_every_dtype(dtype: str, codec: str) -> None:
    size = DTYPE_SIZES[dtype]
    raw = np.random.default_rng(1).integers(0, 256, 4096 * size, dtype=np.uint8).tobytes()
    meta = PageMeta(dtype, "layer_kv_token_head_dim", (2, 2, 16, 4, 16), NS, KEY)
    blob = encode_page(raw, meta, codec=codec)
    assert decode_page(blob, meta) == raw
    assert verify_page(blob) == meta
    assert inspect_page(blob) == meta
    assert page_codec(blob) == codec


@given(data=st.binary(max_size=2048), dtype=st.sampled_from(sorted(DTYPE_SIZES)),
       codec=st.sampled_from(CODECS), key=st.binary(max_size=40), level=st.integers(1, 9))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_round_trip_arbitrary_bytes(
    data: bytes, dtype: str, codec: str, key: bytes, level: int
) -> None:
    data = data[: len(data) - len(data) % DTYPE_SIZES[dtype]]
    meta = meta_for(dtype, len(data), key=key)
    blob = encode_page(data, meta, codec=codec, level=level)
    assert decode_page(blob, meta) == data


def _as_version_1(blob: bytes) -> bytes:
    """Rewrite a current page the way format version 1 framed it (BLAKE2b-64 digests)."""
    header_len = int.from_bytes(blob[8:12], "little")
    body = bytearray(blob[: header_len - 8])
    body[4] = 1
    codec_id = body[5]
    payload = blob[header_len:]
    raw = decode_page(blob, inspect_page(blob)) if codec_id else payload
    body[28:36] = hashlib.blake2b(bytes(raw), digest_size=8).digest()
    return bytes(body) + hashlib.blake2b(bytes(body), digest_size=8).digest() + payload


@pytest.mark.parametrize("codec", CODECS)
def test_reads_version_1_pages(codec: str) -> None:
    """Pages written before the switch to XXH3 still load and still verify."""
    raw = kv_like(2048).tobytes()
    meta = PageMeta("bfloat16", "l", (2048,), NS, KEY)
    blob = encode_page(raw, meta, codec=codec)
    assert blob[4] == FORMAT_VERSION == 2
    old = _as_version_1(blob)
    assert old[4] == 1 and old != blob
    assert decode_page(old, meta) == raw
    assert verify_page(old) == meta
    flipped = bytearray(old)
    flipped[-1] ^= 1
    with pytest.raises(CorruptPage):
        decode_page(bytes(flipped), meta)


def test_accepts_numpy_and_memoryview() -> None:
    arr = kv_like(1024).reshape(4, 256)
    meta = PageMeta("bfloat16", "l", (4, 256), NS, KEY)
    for raw in (arr, memoryview(arr), arr.tobytes()):
        assert decode_page(encode_page(raw, meta, codec="zstd"), meta) == arr.tobytes()


def test_length_must_match_shape() -> None:
    with pytest.raises(ValueError, match="needs"):
        encode_page(b"\0" * 10, meta_for("float16", 12), codec="none")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": "complex64"},
        {"namespace": b"short"},
        {"layout": "é"},
        {"shape": (-1,)},
    ],
)
def test_bad_meta_raises_value_error(kwargs: dict[str, object]) -> None:
    base = {"dtype": "float16", "layout": "l", "shape": (4,), "namespace": NS, "page_key": KEY}
    base.update(kwargs)
    with pytest.raises(ValueError):
        PageMeta(**base)  # type: ignore[arg-type]


def test_unknown_codec_raises_value_error() -> None:
    with pytest.raises(ValueError, match="codec"):
        encode_page(b"\0\0", meta_for("float16", 2), codec="lz4")


@pytest.mark.parametrize("codec", CODECS)
def test_every_flipped_byte_is_detected(codec: str) -> None:
    raw = kv_like(512).tobytes()
    meta = meta_for("bfloat16", len(raw))
    blob = encode_page(raw, meta, codec=codec)
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01 << (pos % 8)
        with pytest.raises(CorruptPage):
            decode_page(bytes(bad), meta)
        with pytest.raises(CorruptPage):
            verify_page(bytes(bad))


@pytest.mark.parametrize("codec", CODECS)
def test_truncation_and_extension_are_detected(codec: str) -> None:
    raw = kv_like(512).tobytes()
    meta = meta_for("bfloat16", len(raw))
    blob = encode_page(raw, meta, codec=codec)
    for cut in (0, 3, 20, 60, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CorruptPage):
            decode_page(blob[:cut], meta)
    with pytest.raises(CorruptPage):
        decode_page(blob + b"\0", meta)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("namespace", bytes(16), "namespace"),
        ("page_key", b"other", "page_key"),
        ("dtype", "float16", "dtype"),
        ("layout", "other_layout", "layout"),
        ("shape", (2, 256), "shape"),
    ],
)
def test_wrong_expectation_is_detected(field: str, value: object, reason: str) -> None:
    raw = kv_like(512).tobytes()
    meta = meta_for("bfloat16", len(raw))
    blob = encode_page(raw, meta, codec="zstd")
    fields = {f: getattr(meta, f) for f in ("dtype", "layout", "shape", "namespace", "page_key")}
    fields[field] = value
    with pytest.raises(CorruptPage, match=reason):
        decode_page(blob, PageMeta(**fields))  # type: ignore[arg-type]


def test_not_a_page() -> None:
    with pytest.raises(CorruptPage, match="magic"):
        verify_page(b"GARBAGE" * 20)
    with pytest.raises(CorruptPage, match="truncated"):
        verify_page(b"HRDX")


def test_byte_planes_compress_bf16_better() -> None:
    import zstandard

    raw = kv_like(256 * 1024).tobytes()
    meta = meta_for("bfloat16", len(raw))
    planes = len(encode_page(raw, meta, codec="zstd"))
    plain = len(zstandard.ZstdCompressor(level=3).compress(raw))
    assert planes < 0.95 * plain, (planes, plain, len(raw))
    assert planes < len(raw)


def test_threads_share_nothing() -> None:
    raw = kv_like(64 * 1024).tobytes()
    meta = meta_for("bfloat16", len(raw))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                assert decode_page(encode_page(raw, meta, codec="zstd"), meta) == raw
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "uint8"])
def test_raw_frame_is_encode_page_byte_for_byte(dtype: str) -> None:
    """Pages framed in place (one copy, as write-through does) equal encode_page's."""
    raw = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)
    meta = meta_for(dtype, raw.nbytes)
    frame, payload = raw_frame(meta)
    assert payload.nbytes == meta.nbytes and np.shares_memory(frame, payload)
    payload[:] = raw
    blob = seal_raw_frame(frame, meta)
    assert bytes(blob) == encode_page(raw, meta, codec="none")
    assert decode_page(blob, meta) == raw.tobytes()
    other = meta_for(dtype, raw.nbytes * 2)
    with pytest.raises(ValueError, match="not a raw frame"):
        seal_raw_frame(frame, other)


# --------------------------------------------------------------------------- hostile pages
# Issue 16 item 2: every size a page declares is checked before anything is allocated
# for it, and item 6: an optional keyed MAC that a forger without the key cannot make.


def _reframe(blob: bytes, payload: bytes, raw_len: int | None = None) -> bytes:
    """``blob`` (a zstd page) with its payload replaced by ``payload`` and a header that
    is internally consistent again (payload length, payload crc32, header digest): what
    someone able to write the store can produce without any key."""
    import zlib

    import xxhash

    header_len = int.from_bytes(blob[8:12], "little")
    body = bytearray(blob[: header_len - 8])
    if raw_len is not None:
        body[12:20] = raw_len.to_bytes(8, "little")
    body[20:28] = len(payload).to_bytes(8, "little")
    body[36:40] = zlib.crc32(payload).to_bytes(4, "little")
    return bytes(body) + xxhash.xxh3_64_digest(bytes(body)) + payload


def _peak_bytes(call: object) -> int:
    """Peak Python heap growth while running ``call()`` (which must raise CorruptPage)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(CorruptPage) as info:
            call()  # type: ignore[operator]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    logger.info("rejected with %r after a peak of %d bytes", str(info.value), peak)
    return peak


def test_zstd_bomb_declared_size_is_checked_before_decompressing() -> None:
    """A 16 KiB page whose zstd frame declares 64 MiB: rejected without allocating the
    64 MiB (zstd's max_output_size is ignored when the frame states its own size)."""
    import zstandard

    raw = kv_like(8192).tobytes()  # 16 KiB
    meta = meta_for("bfloat16", len(raw))
    blob = encode_page(raw, meta, codec="zstd")
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(bomb) < 16 << 10 and zstandard.frame_content_size(bomb) == 64 << 20
    evil = _reframe(blob, bomb)
    assert inspect_page(evil) == meta  # the header alone is fine
    assert _peak_bytes(lambda: decode_page(evil, meta)) < 4 << 20
    assert _peak_bytes(lambda: verify_page(evil)) < 4 << 20
    with pytest.raises(CorruptPage, match="declares 67108864"):
        decode_page(evil, meta)


def test_zstd_frame_without_declared_size_is_refused() -> None:
    """hiradix always writes the content size; a frame without it would make zstd
    allocate whatever raw length the header claims (here 256 MiB) up front."""
    import zstandard

    claimed = 256 << 20
    meta = PageMeta("uint8", "layer_kv_token_head_dim", (claimed,), NS, KEY)
    blob = encode_page(bytes(16), meta_for("uint8", 16), codec="zstd")
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1024))
    assert zstandard.frame_content_size(frame) == -1
    header_len = int.from_bytes(blob[8:12], "little")
    body = bytearray(blob[: header_len - 8])
    body[60:68] = claimed.to_bytes(8, "little")  # shape[0]: the header claims 256 MiB
    evil = _reframe(bytes(body) + bytes(8) + blob[header_len:], frame, raw_len=claimed)
    assert inspect_page(evil) == meta
    assert _peak_bytes(lambda: verify_page(evil)) < 4 << 20
    with pytest.raises(CorruptPage, match="content size"):
        decode_page(evil, meta)


def test_verify_page_bounds_the_raw_size_a_page_claims() -> None:
    """Without an expected shape (``hiradix store verify``) the claimed raw size is
    bounded by ``max_raw_bytes``: an honest-looking 4 MiB page of zeros is refused
    under a 1 MiB bound before it is decompressed."""
    raw = bytes(4 << 20)
    meta = meta_for("uint8", len(raw))
    blob = encode_page(raw, meta, codec="zstd")
    assert len(blob) < 4096
    assert verify_page(blob) == meta
    with pytest.raises(CorruptPage, match="more than"):
        verify_page(blob, max_raw_bytes=1 << 20)
    assert _peak_bytes(lambda: verify_page(blob, max_raw_bytes=1 << 20)) < 1 << 20


MAC_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.mark.parametrize("codec", CODECS)
def test_mac_round_trip_and_wrong_or_missing_key(codec: str) -> None:
    raw = kv_like(2048).tobytes()
    meta = meta_for("bfloat16", len(raw))
    signed = encode_page(raw, meta, codec=codec, mac_key=MAC_KEY)
    plain = encode_page(raw, meta, codec=codec)
    assert len(signed) > len(plain)
    assert decode_page(signed, meta, mac_key=MAC_KEY) == raw
    assert verify_page(signed, mac_key=MAC_KEY) == meta
    with pytest.raises(CorruptPage, match="MAC"):
        decode_page(signed, meta, mac_key=OTHER_KEY)
    with pytest.raises(CorruptPage, match="no MAC"):
        decode_page(plain, meta, mac_key=MAC_KEY)  # a stripped MAC is no MAC
    with pytest.raises(CorruptPage, match="no MAC"):
        verify_page(plain, mac_key=MAC_KEY)
    # Without a key, behaviour is unchanged: both read (the MAC is not checked).
    assert decode_page(signed, meta) == raw and decode_page(plain, meta) == raw
    assert verify_page(signed) == meta


def test_mac_stops_a_forged_page_for_another_tenant() -> None:
    """Checksums and header digest are public functions: a forger can relabel a page
    (another namespace, another page key, other KV) so that it passes every check, but
    not recompute the MAC without the key."""
    raw = kv_like(2048).tobytes()
    meta = meta_for("bfloat16", len(raw))
    victim = meta_for("bfloat16", len(raw), key=bytes(32), ns=bytes(16))
    forged = encode_page(kv_like(2048, seed=9).tobytes(), victim, codec="none")
    signed = encode_page(raw, meta, codec="none", mac_key=MAC_KEY)
    header_len = int.from_bytes(signed[8:12], "little")
    # Keep the genuine page's MAC record, swap in the forged header fields and payload.
    plain_len = int.from_bytes(forged[8:12], "little")
    body = bytearray(forged[: plain_len - 8]) + signed[plain_len - 8 : header_len - 8]
    body[8:12] = header_len.to_bytes(4, "little")
    import xxhash

    relabelled = bytes(body) + xxhash.xxh3_64_digest(bytes(body)) + forged[plain_len:]
    assert decode_page(relabelled, victim) == forged[plain_len:]  # no key: accepted
    with pytest.raises(CorruptPage, match="MAC mismatch"):
        decode_page(relabelled, victim, mac_key=MAC_KEY)


@pytest.mark.parametrize("codec", CODECS)
def test_every_flipped_byte_of_a_signed_page_is_detected(codec: str) -> None:
    raw = kv_like(256).tobytes()
    meta = meta_for("bfloat16", len(raw))
    blob = encode_page(raw, meta, codec=codec, mac_key=MAC_KEY)
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01 << (pos % 8)
        for key in (MAC_KEY, None):
            with pytest.raises(CorruptPage):
                decode_page(bytes(bad), meta, mac_key=key)


def test_signed_raw_frame_is_encode_page_byte_for_byte() -> None:
    raw = np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8)
    meta = meta_for("bfloat16", raw.nbytes)
    frame, payload = raw_frame(meta, mac_key=MAC_KEY)
    payload[:] = raw
    blob = seal_raw_frame(frame, meta, mac_key=MAC_KEY)
    assert bytes(blob) == encode_page(raw, meta, codec="none", mac_key=MAC_KEY)
    assert decode_page(blob, meta, mac_key=MAC_KEY) == raw.tobytes()
    with pytest.raises(ValueError, match="not a raw frame"):
        seal_raw_frame(frame, meta)  # sized for a MAC, sealed without one


@pytest.mark.parametrize("bad_key", [b"", b"short", bytes(65)])
def test_mac_key_length_is_checked(bad_key: bytes) -> None:
    meta = meta_for("uint8", 16)
    with pytest.raises(ValueError, match="mac_key"):
        encode_page(bytes(16), meta, mac_key=bad_key)
