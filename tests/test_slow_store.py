"""The testbed's slow-store switch: inert without its variable, a clear error for a bad
value, and every store hiradix builds answers that much later when set."""

from __future__ import annotations

import time

import pytest
from hiradix.backends import registry
from hiradix.backends.faults import FaultyStore
from hiradix.integration.testbed import slow_store

from hiradix.config import parse_config


@pytest.fixture
def fresh(monkeypatch):
    """Undo whatever register() does to the factory and the module flag."""
    monkeypatch.setattr(registry, "create_store", registry.create_store)
    monkeypatch.setattr(slow_store, "_registered", False)
    return monkeypatch


def nvme_config(tmp_path):
    return parse_config(
        {"store": {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "1MiB"}}}
    ).store


def test_without_the_variable_nothing_changes(fresh, tmp_path):
    fresh.delenv(slow_store.ENV, raising=False)
    slow_store.register()
    assert not isinstance(registry.create_store(nvme_config(tmp_path)), FaultyStore)


@pytest.mark.parametrize("value", ["fast", "-1", "nan", "inf"])
def test_bad_value_names_the_variable(fresh, value):
    fresh.setenv(slow_store.ENV, value)
    with pytest.raises(ValueError, match=f"{slow_store.ENV}=.*allowed: seconds >= 0"):
        slow_store.register()


def test_every_store_call_takes_longer(fresh, tmp_path):
    fresh.setenv(slow_store.ENV, "0.05")
    slow_store.register()
    store = registry.create_store(nvme_config(tmp_path))
    assert isinstance(store, FaultyStore) and store.latency_s == 0.05
    started = time.perf_counter()
    store.exists_many([])
    assert time.perf_counter() - started >= 0.05
    none = parse_config({"store": {"kind": "none"}}).store
    assert registry.create_store(none) is None
