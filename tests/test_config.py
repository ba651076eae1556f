"""Config schema, loader and units: defaults, every error path, shipped files, reference."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hiradix.config import (
    CONFIG_KEYS,
    Codec,
    ConfigError,
    EvictionPolicy,
    HiradixConfig,
    HostConfig,
    StoreKind,
    TtlMode,
    WaitMode,
    WritePolicy,
    config_reference_markdown,
    config_to_dict,
    default_config_path,
    load_config,
    load_default_config,
    parse_config,
)
from hiradix.units import format_bytes, format_duration, parse_bytes, parse_duration

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def write(tmp_path: Path, text: str, name: str = "hiradix.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def nested(dotted: str, value: Any) -> dict[str, Any]:
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}}"""
    *sections, leaf = dotted.split(".")
    result: dict[str, Any] = {leaf: value}
    for section in reversed(sections):
        result = {section: result}
    return result


def flatten(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Leaf keys of a YAML mapping; an empty mapping or a short-form value is a leaf."""
    keys: set[str] = set()
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            keys |= flatten(value, key + ".")
        else:
            keys.add(key)
    return keys


# --------------------------------------------------------------------------- defaults


def test_empty_mapping_gives_every_schema_default() -> None:
    cfg = parse_config({})
    assert cfg.version == 1 and cfg.namespace == "" and cfg.source == "<dict>"
    assert cfg.host == HostConfig(size_bytes=None, size_ratio=2.0)
    assert cfg.store.kind is StoreKind.NONE
    assert cfg.store.presence_ttl == 10.0 and cfg.store.write_queue_pages == 4096
    assert cfg.store.nvme.path == os.path.abspath(".hiradix/pages")
    assert cfg.store.nvme.size_bytes == 16 * GiB and cfg.store.nvme.fsync is False
    redis = cfg.store.redis
    assert redis.url == "redis://127.0.0.1:6379/0" and not redis.use_tls
    assert redis.password_env is None and redis.username is None and redis.cluster is False
    assert redis.key_prefix == "hiradix:" and redis.timeout == 1.0 and redis.batch_pages == 128
    assert (redis.tls.ca_file, redis.tls.cert_file, redis.tls.key_file) == (None, None, None)
    assert redis.tls.verify is True
    assert cfg.store.memory.size_bytes == GiB
    assert cfg.ttl.mode is TtlMode.SLIDING
    assert cfg.ttl.device.seconds is None and cfg.ttl.host.seconds is None
    assert cfg.ttl.store.seconds == 86400.0 and cfg.ttl.store.mode is TtlMode.SLIDING
    assert cfg.ttl.max_age is None
    assert cfg.write_policy is WritePolicy.WRITE_THROUGH and cfg.write_through_hits == 2
    assert cfg.eviction_policy is EvictionPolicy.LRU
    assert cfg.prefetch.policy == "pattern" and dict(cfg.prefetch.options) == {}
    assert cfg.prefetch.wait is WaitMode.TIMEOUT
    assert cfg.prefetch.timeout == 0.05 and cfg.prefetch.timeout_per_1k_tokens == 0.02
    assert cfg.compression.codec is Codec.NONE and cfg.compression.level == 3


def test_empty_sections_take_defaults() -> None:
    assert parse_config({"store": None, "ttl": None}) == parse_config({})


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_default_config()
    assert cfg.host.size_ratio == 2.0
    assert cfg.store.kind is StoreKind.NVME
    assert cfg.store.nvme.size_bytes == 4 * GiB
    # The embedded default resolves its relative path against the working directory.
    assert cfg.store.nvme.path == str(tmp_path / ".hiradix" / "pages")
    assert cfg.ttl.store.seconds == 24 * 3600
    assert cfg.compression.codec is Codec.NONE and cfg.compression.level == 3
    assert cfg.source == default_config_path()


# --------------------------------------------------------------------------- enums

ENUM_KEYS = [
    ("store.kind", "mongo", "none, nvme, redis, memory"),
    ("ttl.mode", "forever", "sliding, absolute"),
    ("write_policy", "write_around", "write_through, write_through_selective, write_back"),
    ("eviction_policy", "random", "lru, lfu, fifo, priority"),
    ("prefetch.wait", "never", "best_effort, wait_complete, timeout"),
    ("compression.codec", "lz4", "none, zstd"),
]


@pytest.mark.parametrize(("key", "bad", "allowed"), ENUM_KEYS)
def test_bad_enum_value_names_key_value_and_allowed(key: str, bad: str, allowed: str) -> None:
    message = error_of(nested(key, bad))
    assert message == f"config key '{key}': got '{bad}'; allowed: {allowed}"


@pytest.mark.parametrize(("key", "bad", "allowed"), ENUM_KEYS)
def test_enum_values_are_case_insensitive(key: str, bad: str, allowed: str) -> None:
    last = allowed.split(", ")[-1]
    assert parse_config(nested(key, f" {last.upper()}")) == parse_config(nested(key, last))


def test_enum_non_string_is_an_error() -> None:
    assert "config key 'store.kind': got 3; allowed: none" in error_of({"store": {"kind": 3}})


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("data", "key", "allowed_start"),
    [
        ({"verison": 1}, "verison", "version, namespace, host, store, ttl"),
        ({"host": {"sise": 1}}, "host.sise", "size"),
        ({"store": {"knd": "nvme"}}, "store.knd", "kind, presence_ttl"),
        ({"store": {"redis": {"urll": "x"}}}, "store.redis.urll", "url, password_env"),
        ({"store": {"redis": {"tls": {"ca": "x"}}}}, "store.redis.tls.ca", "ca_file, cert_file"),
        ({"store": {"nvme": {"dir": "x"}}}, "store.nvme.dir", "path, size, fsync"),
        ({"ttl": {"l3": "1h"}}, "ttl.l3", "mode, device, host, store, max_age"),
        ({"ttl": {"store": {"aftr": "1h"}}}, "ttl.store.aftr", "after, mode"),
        ({"prefetch": {"polcy": "hot"}}, "prefetch.polcy", "policy, options"),
        ({"compression": {"lvl": 3}}, "compression.lvl", "codec, level"),
    ],
)
def test_unknown_key_at_every_level(data: dict[str, Any], key: str, allowed_start: str) -> None:
    message = error_of(data)
    assert message.startswith(f"config key '{key}': unknown key; allowed: {allowed_start}")


def test_section_must_be_a_mapping() -> None:
    assert "config key 'store': got 'redis'; allowed: a mapping" in error_of({"store": "redis"})


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store:\n  kind: mongo\n  redis:\n    urll: x\n    batch_pages: 0\n"
        "compression:\n  level: 99\nwrite_through_hits: 0\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 5
    lines = str(info.value).splitlines()
    assert len(lines) == 5 and all(line.startswith(f"{path}: config key '") for line in lines)
    for key in ("store.kind", "store.redis.urll", "store.redis.batch_pages"):
        assert any(f"'{key}'" in line for line in lines)
    assert any("'compression.level': got 99; allowed: an integer from 1 to 22" in x for x in lines)


# --------------------------------------------------------------------------- scalar values


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("version", 2),
        ("version", True),
        ("namespace", 5),
        ("store.write_queue_pages", 0),
        ("store.write_queue_pages", "many"),
        ("store.nvme.fsync", "yes please"),
        ("store.nvme.path", ""),
        ("store.redis.batch_pages", 4097),
        ("store.redis.batch_pages", 1.5),
        ("store.redis.timeout", "0s"),
        ("store.redis.username", 7),
        ("store.redis.cluster", 1),
        ("write_through_hits", 0),
        ("write_through_hits", True),
        ("compression.level", 0),
        ("compression.level", 23),
        ("prefetch.policy", "my policy"),
        ("prefetch.policy", "pkg.mod:"),
        ("prefetch.policy", "pkg..mod:Class"),
        ("prefetch.options", [1, 2]),
        ("prefetch.options", {1: "x"}),
        ("store.memory.size", 0),
        ("ttl.max_age", "0s"),
    ],
)
def test_bad_scalar_values(key: str, bad: Any) -> None:
    message = error_of(nested(key, bad))
    assert message.startswith(f"config key '{key}': got {bad!r}; allowed: ")


@pytest.mark.parametrize(
    "policy", ["none", "arrival", "pattern", "hardening_policies:Anything", "hot"]
)
def test_prefetch_policy_syntax(policy: str, policy_module: str) -> None:
    assert parse_config({"prefetch": {"policy": policy}}).prefetch.policy == policy


def test_prefetch_options_are_read_only(policy_module: str) -> None:
    options = {"window": 4, "nested": {"a": [1, 2]}}
    cfg = parse_config({"prefetch": {"policy": "hardening_policies:Anything", "options": options}})
    assert cfg.prefetch.options["window"] == 4 and cfg.prefetch.options["nested"]["a"] == (1, 2)
    with pytest.raises(TypeError):
        cfg.prefetch.options["window"] = 5  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.prefetch.options["nested"]["a"] = 1
    assert config_to_dict(cfg)["prefetch"]["options"] == {"window": 4, "nested": {"a": [1, 2]}}


def test_wait_budget() -> None:
    base = {"timeout": "50ms", "timeout_per_1k_tokens": "20ms"}
    timeout = parse_config({"prefetch": {**base, "wait": "timeout"}}).prefetch
    assert timeout.wait_budget(0) == pytest.approx(0.05)
    assert timeout.wait_budget(4000) == pytest.approx(0.13)
    assert parse_config({"prefetch": {"wait": "best_effort"}}).prefetch.wait_budget(10**6) == 0
    assert math.isinf(parse_config({"prefetch": {"wait": "wait_complete"}}).prefetch.wait_budget(1))
    with pytest.raises(ValueError):
        timeout.wait_budget(-1)


# --------------------------------------------------------------------------- units

GOOD_SIZES = [
    (4096, 4096),
    ("4096", 4096),
    ("8GiB", 8 * GiB),
    ("8gib", 8 * GiB),
    ("8Gi", 8 * GiB),
    ("8G", 8 * GiB),
    ("16 GiB", 16 * GiB),
    ("512MiB", 512 << 20),
    ("64KiB", 64 << 10),
    ("64k", 64 << 10),
    ("1.5GB", 1_500_000_000),
    ("100MB", 100_000_000),
    ("2TiB", 2 << 40),
    ("1TB", 10**12),
    ("0", 0),
    ("0.5KiB", 512),
    ("10B", 10),
]
BAD_SIZES = ["-1", -1, "8XB", "GiB", "1.5", "8 GiB B", True, 1.5, None, [], "", "1e9"]


@pytest.mark.parametrize(("text", "expected"), GOOD_SIZES)
def test_parse_bytes_good(text: Any, expected: int) -> None:
    assert parse_bytes(text, "k") == expected
    assert parse_bytes(format_bytes(expected), "k") == expected


@pytest.mark.parametrize("bad", BAD_SIZES)
def test_parse_bytes_bad(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^config key 'a\.b': got .*; allowed: a size in bytes"):
        parse_bytes(bad, "a.b")


def test_format_bytes_is_exact_and_human() -> None:
    assert format_bytes(8 * GiB) == "8 GiB"
    assert format_bytes(10**9) == "1 GB"
    assert format_bytes(1_500_000_000) == "1500 MB"
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"


GOOD_DURATIONS = [
    (30, 30.0),
    (0.5, 0.5),
    ("30", 30.0),
    ("50ms", 0.05),
    ("30s", 30.0),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("7d", 604800.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("1.5s", 1.5),
    ("100us", 1e-4),
    ("2w", 1209600.0),
    ("0s", 0.0),
]
BAD_DURATIONS = ["-1s", -1, "1h30", "5 parsecs", "h", "", True, None, float("inf"), "1e3s"]


@pytest.mark.parametrize(("text", "expected"), GOOD_DURATIONS)
def test_parse_duration_good(text: Any, expected: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(expected)
    assert parse_duration(format_duration(expected), "k") == expected


@pytest.mark.parametrize("bad", BAD_DURATIONS)
def test_parse_duration_bad(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^config key 'a\.b': got .*; allowed: a duration"):
        parse_duration(bad, "a.b")


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5400, 86400, 0.05, 1.5, 0)] == [
        "1h30m",
        "1d",
        "50ms",
        "1.5s",
        "0s",
    ]


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_bytes_round_trips(num_bytes: int) -> None:
    assert parse_bytes(format_bytes(num_bytes), "k") == num_bytes


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False) | st.integers(0, 10**9))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds), "k") == seconds


@pytest.mark.parametrize(
    ("key", "attr"),
    [
        ("store.presence_ttl", lambda c: c.store.presence_ttl),
        ("store.redis.timeout", lambda c: c.store.redis.timeout),
        ("prefetch.timeout", lambda c: c.prefetch.timeout),
        ("ttl.max_age", lambda c: c.ttl.max_age),
    ],
)
def test_duration_keys(key: str, attr: Any) -> None:
    assert attr(parse_config(nested(key, "1h30m"))) == 5400.0
    assert f"config key '{key}': got 'soon'" in error_of(nested(key, "soon"))


@pytest.mark.parametrize(
    ("key", "attr"),
    [
        ("store.nvme.size", lambda c: c.store.nvme.size_bytes),
        ("store.memory.size", lambda c: c.store.memory.size_bytes),
    ],
)
def test_size_keys(key: str, attr: Any) -> None:
    assert attr(parse_config(nested(key, "512MiB"))) == 512 << 20
    assert f"config key '{key}': got '-5GiB'" in error_of(nested(key, "-5GiB"))


# --------------------------------------------------------------------------- host.size


@pytest.mark.parametrize(
    ("value", "size_bytes", "size_ratio", "resolved_for_1GiB"),
    [
        (2.0, None, 2.0, 2 * GiB),
        (0.5, None, 0.5, GiB // 2),
        (0.0, None, 0.0, 0),
        (0, 0, None, 0),
        ("32GiB", 32 * GiB, None, 32 * GiB),
        (8 * GiB, 8 * GiB, None, 8 * GiB),
    ],
)
def test_host_size_ratio_or_bytes(
    value: Any, size_bytes: int | None, size_ratio: float | None, resolved_for_1GiB: int
) -> None:
    host = parse_config({"host": {"size": value}}).host
    assert (host.size_bytes, host.size_ratio) == (size_bytes, size_ratio)
    assert host.resolve_bytes(GiB) == resolved_for_1GiB


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "lots", -3, True, "-1GiB"])
def test_host_size_bad(bad: Any) -> None:
    message = error_of({"host": {"size": bad}})
    assert message.startswith(f"config key 'host.size': got {bad!r}; allowed: a ratio")


def test_host_config_needs_exactly_one() -> None:
    with pytest.raises(ValueError):
        HostConfig(size_bytes=None, size_ratio=None)
    with pytest.raises(ValueError):
        HostConfig(size_bytes=1, size_ratio=1.0)


# --------------------------------------------------------------------------- TTL


def test_tier_ttl_short_form_uses_section_mode() -> None:
    ttl = parse_config({"ttl": {"mode": "absolute", "host": "30m", "store": None}}).ttl
    assert (ttl.host.seconds, ttl.host.mode) == (1800.0, TtlMode.ABSOLUTE)
    assert (ttl.store.seconds, ttl.store.mode) == (None, TtlMode.ABSOLUTE)
    assert (ttl.device.seconds, ttl.device.mode) == (None, TtlMode.ABSOLUTE)


def test_tier_ttl_long_form_overrides_mode() -> None:
    ttl = parse_config({"ttl": {"device": {"after": "5m", "mode": "absolute"}}}).ttl
    assert (ttl.device.seconds, ttl.device.mode) == (300.0, TtlMode.ABSOLUTE)
    assert ttl.host.mode is TtlMode.SLIDING
    only_after = parse_config({"ttl": {"store": {"after": "2h"}}}).ttl.store
    assert (only_after.seconds, only_after.mode) == (7200.0, TtlMode.SLIDING)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "config key 'ttl.host': got 'soon'; allowed: null (never), a duration"),
        ("0s", "config key 'ttl.host': got '0s'"),
        ({"after": "x"}, "config key 'ttl.host.after': got 'x'"),
        ({"after": "1h", "mode": "weird"}, "config key 'ttl.host.mode': got 'weird'"),
        ({"ater": "1h"}, "config key 'ttl.host.ater': unknown key; allowed: after, mode"),
    ],
)
def test_tier_ttl_bad(value: Any, message: str) -> None:
    assert message in error_of({"ttl": {"host": value}})


# --------------------------------------------------------------------------- paths


def test_relative_nvme_path_resolves_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, "store:\n  kind: nvme\n  nvme:\n    path: data/pages\n")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(Path("conf") / "hiradix.yaml")
    assert cfg.store.nvme.path == str(sub / "data" / "pages")
    assert cfg.source == os.path.join("conf", "hiradix.yaml")
    assert load_config(path).store.nvme.path == str(sub / "data" / "pages")


def test_absolute_and_home_nvme_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse_config({"store": {"nvme": {"path": "~/pages"}}}, base_dir="/elsewhere")
    assert cfg.store.nvme.path == str(tmp_path / "home" / "pages")
    cfg = parse_config({"store": {"nvme": {"path": "/srv/pages/"}}}, base_dir="/elsewhere")
    assert cfg.store.nvme.path == "/srv/pages"


# --------------------------------------------------------------------------- redis


def redis(**fields: Any) -> dict[str, Any]:
    return {"store": {"kind": "redis", "redis": fields}}


def test_password_env_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIRADIX_TEST_PW", raising=False)
    cfg = parse_config(redis(password_env="HIRADIX_TEST_PW"))  # missing at load: fine
    with pytest.raises(ConfigError, match="HIRADIX_TEST_PW"):  # ... but not when connecting
        cfg.store.redis.password()
    monkeypatch.setenv("HIRADIX_TEST_PW", "s3cret")
    assert cfg.store.redis.password() == "s3cret"
    assert parse_config({}).store.redis.password() is None


@pytest.mark.parametrize("bad", ["1PASSWORD", "my-password", "s3cret pw", 12])
def test_password_env_must_be_a_variable_name(bad: Any) -> None:
    message = error_of(redis(password_env=bad))
    assert message.startswith(f"config key 'store.redis.password_env': got {bad!r}")
    assert "environment variable name" in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://cache.internal",
        "rediss://cache.internal:6380/2",
        "unix:///var/run/redis.sock",
        "redis://user@host:6379",
    ],
)
def test_good_redis_urls(url: str) -> None:
    assert parse_config(redis(url=url)).store.redis.url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "redis://",
        "redis://host:notaport",
        "redis://host/db1",
        "unix://",
        5,
    ],
)
def test_bad_redis_urls(url: Any) -> None:
    assert error_of(redis(url=url)).startswith(f"config key 'store.redis.url': got {url!r}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://***@host:6379/0"),
        ("redis://admin:hunter2@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:hunter2@host:notaport/0", "redis://***@host:notaport/0"),
        ("rediss://u:hunter2@/0", "rediss://***@/0"),
        ("http://:hunter2@host", "http://***@host"),
        ("redis://:hunter2@host/db1", "redis://***@host/db1"),
        ("redis://:hun/ter2@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:hunter2@host:6379/5", "redis://***@host:6379/5"),  # with cluster: true
    ],
)
def test_rejected_redis_url_never_shows_its_password(url: str, shown: str) -> None:
    """Issue 16 item 11: the message goes to launch logs and ``config check`` output."""
    message = error_of(redis(url=url, cluster=True))
    assert "hunter2" not in message and "hun/ter2" not in message
    assert message.startswith(f"config key 'store.redis.url': got {shown!r}; allowed: ")


def test_tls_with_rediss(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store:\n  kind: redis\n  redis:\n    url: rediss://h:6380/0\n"
        "    tls: {ca_file: ca.pem, cert_file: c.pem, key_file: k.pem, verify: false}\n",
    )
    cfg = load_config(path)
    tls = cfg.store.redis.tls
    assert cfg.store.redis.use_tls
    assert tls.ca_file == str(tmp_path / "ca.pem") and tls.key_file == str(tmp_path / "k.pem")
    assert tls.verify is False


@pytest.mark.parametrize(
    ("tls", "key"),
    [
        ({"ca_file": "/ca.pem"}, "store.redis.tls.ca_file"),
        ({"cert_file": "/c.pem"}, "store.redis.tls.cert_file"),
        ({"verify": False}, "store.redis.tls.verify"),
    ],
)
def test_tls_without_rediss_is_an_error(tls: dict[str, Any], key: str) -> None:
    message = error_of(redis(url="redis://h:6379/0", tls=tls))
    assert message.startswith(f"config key '{key}': got ")
    assert "only with a rediss:// URL" in message


def test_tls_key_needs_cert() -> None:
    message = error_of(redis(url="rediss://h", tls={"key_file": "/k.pem"}))
    assert "config key 'store.redis.tls.key_file'" in message and "cert_file" in message


def test_cluster_checks() -> None:
    assert parse_config(redis(url="redis://seed:7000", cluster=True)).store.redis.cluster
    message = error_of(redis(url="unix:///tmp/r.sock", cluster=True))
    assert message.startswith("config key 'store.redis.cluster': got True; allowed: false")
    message = error_of(redis(url="redis://seed:7000/3", cluster=True))
    assert message.startswith("config key 'store.redis.url': got 'redis://seed:7000/3'")


# --------------------------------------------------------------------------- files


def test_load_config_file_errors(tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.yaml": "cannot read config file",
        write(tmp_path, "store: [unclosed", "broken.yaml"): "not valid YAML",
        write(tmp_path, "- a\n- b\n", "list.yaml"): "expected a YAML mapping",
        write(tmp_path, "", "empty.yaml"): "empty document",
        tmp_path: "cannot read config file",
    }
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_parse_config_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["a"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["default.yaml", "redis.yaml", "redis-cluster.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, HiradixConfig)
    if name.startswith("redis"):
        assert cfg.store.kind is StoreKind.REDIS
        assert cfg.store.redis.cluster is (name == "redis-cluster.yaml")
    if name == "redis.yaml":
        assert cfg.ttl.store.seconds == 6 * 3600


def test_configs_default_is_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = REPO / "configs" / "default.yaml"
    assert link.is_symlink() and os.readlink(link) == "../hiradix/default.yaml"
    assert os.path.samefile(link, default_config_path())
    # Loaded through the link it is still the embedded default: paths follow the cwd.
    monkeypatch.chdir(tmp_path)
    assert load_config(link).store.nvme.path == str(tmp_path / ".hiradix" / "pages")
    assert load_config(link).store == load_default_config().store


def test_default_yaml_lists_every_schema_key() -> None:
    with open(default_config_path(), encoding="utf-8") as file:
        data = yaml.safe_load(file)
    assert flatten(data) == set(CONFIG_KEYS)


def test_reference_documents_every_key() -> None:
    reference = config_reference_markdown()
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(CONFIG_KEYS)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 5 and all(cells), row  # key, default, type, allowed, help


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"host": {"size": "48GiB"}, "ttl": {"mode": "absolute", "host": {"after": "1h"}}},
        {"ttl": {"device": {"after": "90s", "mode": "absolute"}, "max_age": "7d"}},
        {"store": {"kind": "redis", "redis": {"url": "rediss://h", "tls": {"ca_file": "a"}}}},
        {"prefetch": {"policy": "hardening_policies:Anything", "options": {"k": [1, {"x": 2}]}}},
        {"prefetch": {"timeout": 0.0123, "timeout_per_1k_tokens": 1.25}},
        {"store": {"nvme": {"size": 1_500_000_000}}, "namespace": "tenant-a"},
    ],
)
def test_config_to_dict_round_trips(
    data: dict[str, Any], tmp_path: Path, policy_module: str
) -> None:
    cfg = parse_config(data, base_dir=str(tmp_path))
    printed = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    assert parse_config(yaml.safe_load(printed), base_dir="/unused") == cfg
    assert flatten(config_to_dict(parse_config({}))) == set(CONFIG_KEYS)


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(AttributeError):
        cfg.namespace = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- issue 16

_POLICY_MODULE = """
from hiradix.policies.base import PrefetchPolicy

class Raises(PrefetchPolicy):
    name = "raises"
    def __init__(self):
        raise RuntimeError("no GPU budget configured")

class Takes(PrefetchPolicy):
    name = "takes"
    def __init__(self, *, depth: int = 1):
        if depth < 1:
            raise ValueError(f"prefetch.options.depth: {depth!r}; allowed: an int >= 1")
        self.depth = depth

class Fragile(PrefetchPolicy):
    name = "fragile"
    def __init__(self, **options):
        raise TypeError(f"cannot use {sorted(options)}")

class Anything(PrefetchPolicy):
    name = "anything"
    def __init__(self, **options):
        self.options = options

NotAPolicy = object
"""


@pytest.fixture
def policy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of test policies, importable as ``hardening_policies``."""
    import sys

    (tmp_path / "hardening_policies.py").write_text(_POLICY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hardening_policies", raising=False)
    return "hardening_policies"


RAISED = "a policy whose constructor succeeds (constructing it raised RuntimeError: no GPU"
TAKES = "what policy 'hardening_policies:Takes' accepts"
FRAGILE = "what policy 'hardening_policies:Fragile' accepts (constructing it raised TypeError"


@pytest.mark.parametrize(
    ("prefetch", "key", "expected"),
    [
        ({"policy": "nope.mod:Cls"}, "prefetch.policy", "cannot import 'nope.mod'"),
        ({"policy": "no_such_policy"}, "prefetch.policy", "unknown policy 'no_such_policy'"),
        ({"policy": "hardening_policies:Missing"}, "prefetch.policy", "has no 'Missing'"),
        ({"policy": "hardening_policies:NotAPolicy"}, "prefetch.policy", "not a subclass"),
        ({"policy": "hardening_policies:Raises"}, "prefetch.policy", RAISED),
        ({"policy": "pattern", "options": {"nope": 1}}, "prefetch.options.nope",
         "unknown option of policy 'pattern'; allowed: "),
        ({"policy": "hardening_policies:Takes", "options": {"depth": 0}},
         "prefetch.options.depth", f"{TAKES} (0; allowed: an int >= 1)"),
        ({"policy": "hardening_policies:Fragile", "options": {"x": [1]}}, "prefetch.options",
         f"got {{'x': [1]}}; allowed: {FRAGILE}: cannot use ['x'])"),
        ({"policy": "hardening_policies:Takes", "options": {"deep": 2}}, "prefetch.options.deep",
         "allowed: depth"),
    ],
)  # fmt: skip
def test_prefetch_policy_is_constructed_at_load(
    policy_module: str, prefetch: dict[str, Any], key: str, expected: str
) -> None:
    """Issue 16 item 12: these passed ``config check`` and then killed every scheduler
    after the model had loaded."""
    message = error_of({"prefetch": prefetch})
    assert message.startswith(f"config key {key!r}: got "), message
    assert expected in message
    assert "allowed: " in message
    assert len(message.splitlines()) == 1


def test_loadable_policies_and_their_options_pass(policy_module: str) -> None:
    cfg = parse_config({"prefetch": {"policy": "hardening_policies:Takes",
                                     "options": {"depth": 3}}})  # fmt: skip
    assert cfg.prefetch.options == {"depth": 3}
    nested = {"k": [1, {"x": 2}]}
    cfg = parse_config({"prefetch": {"policy": "hardening_policies:Anything", "options": nested}})
    assert config_to_dict(cfg)["prefetch"]["options"] == nested


def test_policy_errors_are_reported_with_the_rest_of_the_file(policy_module: str) -> None:
    message = error_of({"store": {"kind": "mongo"}, "prefetch": {"policy": "nope.mod:Cls"}})
    first, second = message.splitlines()
    assert first.startswith("config key 'store.kind'")
    assert second.startswith("config key 'prefetch.policy': got 'nope.mod:Cls'")
    # A policy is not tried with options that did not parse.
    assert "prefetch.policy" not in error_of({"prefetch": {"options": [1]}})


def test_store_mac_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16 item 6: the page MAC key comes from the environment variable named by
    store.mac_key_env, read when the store is set up (never at load)."""
    assert parse_config({}).store.mac_key_env is None
    assert parse_config({}).store.mac_key() is None
    monkeypatch.delenv("HIRADIX_TEST_MAC", raising=False)
    cfg = parse_config({"store": {"mac_key_env": "HIRADIX_TEST_MAC"}})
    assert config_to_dict(cfg)["store"]["mac_key_env"] == "HIRADIX_TEST_MAC"
    with pytest.raises(ConfigError, match="'store.mac_key_env'.*HIRADIX_TEST_MAC.*is not set"):
        cfg.store.mac_key()
    monkeypatch.setenv("HIRADIX_TEST_MAC", "too short")
    with pytest.raises(ConfigError, match="at least 16"):
        cfg.store.mac_key()
    monkeypatch.setenv("HIRADIX_TEST_MAC", "0123456789abcdef0123456789abcdef")
    first = cfg.store.mac_key()
    assert first is not None and len(first) == 32 and b"0123" not in first
    monkeypatch.setenv("HIRADIX_TEST_MAC", "0123456789abcdef0123456789abcdee")
    assert cfg.store.mac_key() != first
    # The key is what the page codec takes: pages signed with it verify only with it.
    from hiradix.codec import PageMeta, decode_page, encode_page
    from hiradix.errors import CorruptPage

    meta = PageMeta("uint8", "l", (64,), bytes(16), b"k")
    page = encode_page(bytes(64), meta, mac_key=cfg.store.mac_key())
    assert decode_page(page, meta, mac_key=cfg.store.mac_key()) == bytes(64)
    with pytest.raises(CorruptPage, match="MAC mismatch"):
        decode_page(page, meta, mac_key=first)
    message = error_of({"store": {"mac_key_env": "my key"}})
    assert message.startswith("config key 'store.mac_key_env': got 'my key'; allowed: ")


def test_nvme_group_access_key() -> None:
    assert parse_config({}).store.nvme.group_access is False
    cfg = parse_config({"store": {"nvme": {"group_access": True}}})
    assert cfg.store.nvme.group_access is True
    assert config_to_dict(cfg)["store"]["nvme"]["group_access"] is True
    message = error_of({"store": {"nvme": {"group_access": "yes"}}})
    assert message.startswith("config key 'store.nvme.group_access': got 'yes'; allowed: ")


def test_config_module_stays_small() -> None:
    """House style: modules under ~600 lines (the schema and tree live beside it)."""
    source = REPO / "hiradix" / "config.py"
    assert len(source.read_text().splitlines()) < 600
