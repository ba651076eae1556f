"""Issue 16 hardening of the L3 stores: a file bigger than any page is not read (item 2),
owner-only page files (item 6), a configured but unset password variable is an error
(item 6), and any key prefix the config accepts works (item 3)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hiradix.backends import nvme_store
from hiradix.backends.base import StoreKey, make_key, split_key
from hiradix.backends.nvme_store import NvmeStore
from hiradix.backends.redis_store import RedisStore
from hiradix.backends.registry import create_store
from hiradix.integration.testbed.redis_servers import RedisServer
from hypothesis import given, settings
from hypothesis import strategies as st

from hiradix.config import ConfigError, TlsConfig, parse_config

logger = logging.getLogger(__name__)

NS = "aa" * 16
PAGE = "0123" + "ab" * 30


def key(i: int, prefix: str = "hiradix:") -> StoreKey:
    return make_key(prefix, NS, f"{i:064x}")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- item 2


def test_nvme_does_not_read_a_file_larger_than_any_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page file bigger than the store's whole capacity cannot be one it wrote: it is
    a miss (and removed) after an fstat, without reading it into memory."""
    store = NvmeStore(tmp_path, 1 << 20)
    assert store.put_many([(key(1), b"page"), (key(2), b"page")], ttl=None) == [True, True]
    reads: list[int] = []
    for name in ("_read_bytes", "_read_into"):
        real = getattr(nvme_store, name)

        def spy(fd: int, size: int, *rest: object, _real: object = real) -> object:
            reads.append(size)
            return _real(fd, size, *rest)  # type: ignore[operator]

        monkeypatch.setattr(nvme_store, name, spy)
    for k in (key(1), key(2)):
        os.truncate(store._path(k), 1 << 30)  # sparse: costs no disk
        os.utime(store._path(k), ns=(0, 0))  # mtime 0: never expires (truncating expired it)
    assert store.get_many([key(1)]) == [None]
    assert store.get_many_into([key(2)], []) == [None]
    assert reads == []
    assert store.exists_many([key(1), key(2)]) == [False, False]
    assert store.oversized_pages == 2


# --------------------------------------------------------------------------- item 6


def _modes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
        for path in [root, *root.rglob("*")]
    }


def test_nvme_pages_are_owner_only_by_default(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "pages"
    store = NvmeStore(root, 1 << 20)
    assert store.put_many([(key(1), b"kv")], ttl=None) == [True]
    modes = _modes(root)
    page = next(name for name in modes if name.endswith(".page"))
    assert modes[page] == 0o600
    assert {mode for name, mode in modes.items() if name != page} == {0o700}
    assert len(modes) == 5  # root, namespace, aa, bb, the page


def test_nvme_group_access_shares_the_directory_with_the_group(
    tmp_path: Path, umask_022: None
) -> None:
    root = tmp_path / "pages"
    cfg = parse_config({"store": {"kind": "nvme", "nvme": {"path": str(root),
                                                           "group_access": True}}})  # fmt: skip
    store = create_store(cfg.store)
    assert store is not None
    assert store.put_many([(key(1), b"kv")], ttl=None) == [True]
    modes = _modes(root)
    page = next(name for name in modes if name.endswith(".page"))
    assert modes[page] == 0o660
    assert {mode for name, mode in modes.items() if name != page} == {0o2770}


def test_nvme_existing_root_keeps_its_mode(tmp_path: Path, umask_022: None) -> None:
    """An operator-made root is theirs: hiradix sets modes only on what it creates."""
    root = tmp_path / "pages"
    root.mkdir(mode=0o750)
    NvmeStore(root, 1 << 20).put_many([(key(1), b"kv")], ttl=None)
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / NS).stat().st_mode) == 0o700


def _tls_off() -> TlsConfig:
    return TlsConfig(ca_file=None, cert_file=None, key_file=None, verify=True)


def test_unset_password_variable_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A configured password_env whose variable is unset (or empty) must not connect
    without a password: building the store raises, naming the variable."""
    monkeypatch.delenv("HIRADIX_TEST_UNSET_PW", raising=False)
    cfg = parse_config(
        {"store": {"kind": "redis", "redis": {"password_env": "HIRADIX_TEST_UNSET_PW"}}}
    )
    with pytest.raises(ConfigError, match="HIRADIX_TEST_UNSET_PW.*is not set"):
        cfg.store.redis.password()
    with pytest.raises(ConfigError, match="'store.redis.password_env'.*HIRADIX_TEST_UNSET_PW"):
        RedisStore(cfg.store.redis)
    monkeypatch.setenv("HIRADIX_TEST_UNSET_PW", "")
    with pytest.raises(ConfigError, match="HIRADIX_TEST_UNSET_PW.*is empty"):
        create_store(cfg.store)
    monkeypatch.setenv("HIRADIX_TEST_UNSET_PW", "pw")
    assert cfg.store.redis.password() == "pw"
    assert parse_config({}).store.redis.password() is None  # none configured: none used


# --------------------------------------------------------------------------- item 3


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=12))
def test_every_prefix_the_config_accepts_makes_keys(prefix: str) -> None:
    try:
        cfg = parse_config({"store": {"redis": {"key_prefix": prefix}}})
    except ConfigError:
        return
    k = make_key(cfg.store.redis.key_prefix, NS, PAGE)
    assert k.startswith(prefix)
    assert split_key(k) == (NS, PAGE)


@pytest.mark.parametrize("prefix", ["team-a", "hx0", "", "team-a:", "a"])
def test_hex_ending_prefixes_make_unambiguous_keys(prefix: str) -> None:
    k = make_key(prefix, NS, PAGE)
    assert split_key(k) == (NS, PAGE)
    assert make_key(prefix, "0" * 32, "1") != make_key(prefix, "00" * 15, "1")


@pytest.mark.redis
def test_redis_store_with_prefix_team_a(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reproduced crash: ``key_prefix: "team-a"`` passed the config check, then
    ``make_key`` raised on the scheduler thread. Now it writes, reads, scans and counts."""
    with RedisServer() as server:
        cfg = parse_config({"store": {"kind": "redis",
                                      "redis": {"url": server.url, "key_prefix": "team-a"}}})  # fmt: skip
        store = create_store(cfg.store)
        assert isinstance(store, RedisStore)
        keys = [make_key(cfg.store.redis.key_prefix, NS, f"{i:064x}") for i in range(3)]
        assert store.put_many([(k, b"page") for k in keys], ttl=60.0) == [True] * 3
        other = make_key("team-ab:", NS, f"{9:064x}")  # a neighbour's prefix
        redis.Redis.from_url(server.url).set(other, b"not ours")
        assert store.get_many(keys) == [b"page"] * 3
        assert sorted(store.scan(NS)) == sorted(keys)
        assert sorted(store.scan()) == sorted(keys)
        assert store.stats().pages == 3
        store.close()
