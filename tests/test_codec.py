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
