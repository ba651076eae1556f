"""The weights fingerprint and the model identity (hiradix/identity.py): what it reads,
what it tells apart, what it does not depend on."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest

from hiradix import identity
from hiradix.identity import (
    WINDOW,
    WINDOWS,
    ModelIdentity,
    snapshot_revision,
    weights_fingerprint,
    weights_id,
)


class CountingReads:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        self.bytes = 0
        real = identity._pread

        def pread(fd: int, length: int, offset: int) -> bytes:
            self.calls += 1
            self.bytes += length
            return real(fd, length, offset)

        monkeypatch.setattr(identity, "_pread", pread)


def _safetensors(path, tensors: dict[str, bytes]) -> None:
    """A minimal safetensors file: header, then each tensor's bytes (uint8 tensors)."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": "U8",
            "shape": [len(data)],
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(tensors.values()))


def test_two_checkpoints_with_the_same_config_differ(tiny_model, tmp_path):
    from hiradix.integration.testbed.model_builder import build_tiny_model

    other = build_tiny_model(tmp_path / "seed1", preset="tiny", seed=1)
    assert (tiny_model / "config.json").read_bytes() == (other / "config.json").read_bytes()
    a, b = weights_fingerprint(str(tiny_model)), weights_fingerprint(str(other))
    assert a and b and a != b
    assert weights_fingerprint(str(tiny_model)) == a  # deterministic


def test_fingerprint_ignores_mtime_and_copies(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(tiny_model))
    (copy / "README.md").write_text("not a weight file")
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(tiny_model))


def test_a_big_sparse_file_reads_only_its_windows(tmp_path, monkeypatch):
    big = tmp_path / "pytorch_model.bin"
    with open(big, "wb") as f:
        f.truncate(64 * 2**30)  # 64 GiB, sparse
    reads = CountingReads(monkeypatch)
    start = time.perf_counter()
    first = weights_fingerprint(str(tmp_path))
    elapsed = time.perf_counter() - start
    assert reads.calls == WINDOWS and reads.bytes == WINDOWS * WINDOW
    assert elapsed < 2.0, elapsed
    with open(big, "r+b") as f:  # a byte in the last window
        f.seek(64 * 2**30 - 10)
        f.write(b"\x01")
    assert weights_fingerprint(str(tmp_path)) != first


def test_a_sparse_safetensors_shard_reads_windows_header_and_tensor_starts(tmp_path, monkeypatch):
    shard = tmp_path / "model-00001-of-00001.safetensors"
    names = [f"layers.{i}.weight" for i in range(200)]
    size = 2**27  # 128 MiB per tensor, 25 GiB in all
    header = {
        name: {"dtype": "BF16", "shape": [size // 2], "data_offsets": [i * size, (i + 1) * size]}
        for i, name in enumerate(names)
    }
    text = json.dumps(header).encode()
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + len(names) * size)
    reads = CountingReads(monkeypatch)
    first = weights_fingerprint(str(tmp_path))
    # windows, the header length, the header, one sample per tensor
    assert reads.calls == WINDOWS + 2 + len(names)
    assert reads.bytes == WINDOWS * WINDOW + 8 + len(text) + len(names) * identity.TENSOR_SAMPLE
    # a change at the start of one tensor that no window covers is seen
    target = 8 + len(text) + 137 * size
    assert all(
        not (o <= target < o + WINDOW) for o in identity._window_offsets(os.path.getsize(shard))
    )
    with open(shard, "r+b") as f:
        f.seek(target)
        f.write(b"\x7f")
    assert weights_fingerprint(str(tmp_path)) != first


def test_small_files_are_read_whole(tmp_path):
    _safetensors(tmp_path / "model.safetensors", {"a": b"\x00" * 1000, "b": b"\x01" * 1000})
    first = weights_fingerprint(str(tmp_path))
    _safetensors(
        tmp_path / "model.safetensors", {"a": b"\x00" * 1000, "b": b"\x01" * 999 + b"\x02"}
    )
    assert weights_fingerprint(str(tmp_path)) != first


def test_hub_cache_files_are_identified_by_their_blob_without_reading(tmp_path, monkeypatch):
    repo = tmp_path / "models--org--m"
    rev = "0123456789abcdef0123456789abcdef01234567"
    blob = "ab" * 32
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(b"weights")
    (repo / "snapshots" / rev / "model.safetensors").symlink_to(repo / "blobs" / blob)
    reads = CountingReads(monkeypatch)
    snap = str(repo / "snapshots" / rev)
    fingerprint = weights_fingerprint(snap)
    assert fingerprint and reads.calls == 0
    assert snapshot_revision(snap) == rev
    other = "cd" * 32
    (repo / "blobs" / other).write_bytes(b"weights")  # same size, another blob
    (repo / "snapshots" / rev / "model.safetensors").unlink()
    (repo / "snapshots" / rev / "model.safetensors").symlink_to(repo / "blobs" / other)
    assert weights_fingerprint(snap) != fingerprint


def test_weights_id_kinds(tmp_path):
    assert weights_id(str(tmp_path), "dummy", "n1") == "dummy"
    assert weights_id(str(tmp_path), "auto", "n1") == "nonce:n1"  # no weight file
    assert weights_id(None, "auto", "n2") == "nonce:n2"
    _safetensors(tmp_path / "model.safetensors", {"a": b"\x00" * 10})
    assert weights_id(str(tmp_path), "auto", "n1").startswith("files:")


def test_every_identity_field_is_in_the_key():
    base = ModelIdentity(
        architecture="LlamaForCausalLM",
        config="c",
        dtype="bfloat16",
        weights="files:w",
        weight_version="default",
        quantization="none",
        kv="auto/bfloat16/store=bfloat16",
        layout="MHATokenToKVPool/k(8, 128)v(8, 128)/L0-31",
        page_size=1,
        shard="tp0of1",
        numerics="attn=fa3",
    )
    from dataclasses import fields, replace

    keys = {base.key()}
    for f in fields(ModelIdentity):
        changed = replace(base, **{f.name: 2 if f.name == "page_size" else "other"})
        keys.add(changed.key())
    assert len(keys) == len(fields(ModelIdentity)) + 1
    assert base.with_weights("files:x", "v2").key() != base.key()
