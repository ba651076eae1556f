"""Shared pytest setup. Fixtures that start real processes live next to the tests that use
them, except the module-scoped redis-server of the in-process L3 tests (``redis_url``)."""

from __future__ import annotations

import os
import random

# CPU tests must never take SGLang's CUDA code paths, even on a GPU host (see
# SGLANG-0.5.23.md section 6: the kernel flags are process-global).
if os.environ.get("HIRADIX_GPU_TESTS") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Verify mode (hiradix/verify.py) is on in every test, in-process caches and the servers the
# tests start alike (they inherit the environment): a page that comes back up a tier with
# other KV than went down fails the test.
os.environ.setdefault("HIRADIX_VERIFY", "fatal")
# The TP consensus checker (integration/sglang/agreed_step.py) likewise, wherever TP > 1.
os.environ.setdefault("HIRADIX_CONSENSUS_CHECK", "1")

# In-process tests import SGLang modules that import torchvision at module level; on a CPU
# machine the import-only stand-in serves (never when a real torchvision is installed).
import importlib.util
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_STANDIN = _REPO / "integration" / "testbed" / "cpu_standins" / "torchvision_standin"
if importlib.util.find_spec("torchvision") is None and _STANDIN.is_dir():
    sys.path.insert(0, str(_STANDIN))


import pytest


@pytest.fixture(scope="session", autouse=False)
def sglang_context():
    """A published dummy SGLang config for in-process tests of the release path."""
    from sglang_sim import publish_test_config

    override = publish_test_config()
    yield
    override.restore()


@pytest.fixture(scope="module")
def redis_url():
    """A real redis-server, one per test module; each test keeps apart by its own key prefix."""
    from hiradix.integration.testbed.redis_servers import RedisServer

    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(params=["nvme", "redis"])
def store_cfg(request, tmp_path, redis_url):
    """An L3 store section: NVMe files in the test's temp dir, or the module's redis-server
    under a random key prefix."""
    if request.param == "nvme":
        return {"kind": "nvme", "nvme": {"path": str(tmp_path / "pages"), "size": "64MiB"}}
    prefix = f"t{random.randrange(10**9)}:"
    return {"kind": "redis", "redis": {"url": redis_url, "key_prefix": prefix}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The ``tiny`` random Llama preset with a locally trained tokenizer, built once."""
    from hiradix.integration.testbed.model_builder import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is visible (``HIRADIX_GPU_TESTS=1`` on a GPU host)."""
    if os.environ.get("HIRADIX_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device: run HIRADIX_GPU_TESTS=1 pytest -m gpu on a GPU host"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
