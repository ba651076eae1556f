"""The CPU testbed: stand-ins, environment, and a real plain SGLang server (no hiradix)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hiradix.integration.testbed.model_builder import build_tiny_model, kv_bytes_per_token
from hiradix.integration.testbed.sglang_server import (
    SGLangServer,
    cpu_server_env,
    needed_standin_dirs,
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset, built once per session (about 5 s)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


def test_standins_import_and_raise_when_called() -> None:
    env = cpu_server_env()
    for standin in needed_standin_dirs():
        assert str(standin) in env["PYTHONPATH"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    probe = (
        "import torchvision.transforms as T, torchvision.io\n"
        "from torchvision.transforms.functional import InterpolationMode\n"
        "from torchvision.transforms.v2 import functional\n"
        "from sgl_kernel import copy_all_layer_kv_cache_cpu as f\n"
        "assert InterpolationMode.BICUBIC.value == 'bicubic'\n"
        "try:\n    f()\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    if any(d.name == "sgl_kernel_standin" for d in needed_standin_dirs()):
        assert "sgl_kernel stand-in: copy_all_layer_kv_cache_cpu called" in out.stdout


def test_the_product_declares_no_testbed_plugin() -> None:
    """An installed hiradix adds one SGLang plugin, its own (issue 13)."""
    from importlib.metadata import entry_points

    assert sorted(ep.name for ep in entry_points(group="sglang.srt.plugins")) == ["hiradix"]


_SPAWN_PROBE = """
import multiprocessing


def scheduler_like(queue):
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from hiradix.integration.testbed import cpu_attention, cpu_mla, slow_store

    queue.put((cpu_attention._registered, cpu_mla._registered, slow_store._registered))


if __name__ == "__main__":
    from importlib.metadata import entry_points

    print(sorted(ep.name for ep in entry_points(group="sglang.srt.plugins")))
    context = multiprocessing.get_context("spawn")  # as SGLang starts its schedulers
    queue = context.Queue()
    child = context.Process(target=scheduler_like, args=(queue,))
    child.start()
    print(queue.get(timeout=240))
    child.join(timeout=60)
"""


def test_testbed_patches_reach_spawned_processes_of_servers_it_starts(tmp_path: Path) -> None:
    """With the testbed's environment, SGLang's plugin loader finds the testbed's entry
    points in a spawned child (a scheduler is one) and their variables switch them on."""
    from hiradix.integration.testbed import cpu_attention, cpu_mla, slow_store

    probe = tmp_path / "probe.py"
    probe.write_text(_SPAWN_PROBE)
    env = cpu_server_env(
        {cpu_attention.ENV: cpu_attention.MODE, cpu_mla.ENV: cpu_mla.MODE, slow_store.ENV: "0.01"}
    )
    out = subprocess.run(
        [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    names, registered = out.stdout.strip().splitlines()[-2:]
    assert names == "['hiradix', 'hiradix_cpu_attention', 'hiradix_cpu_mla', 'hiradix_slow_store']"
    assert registered == "(True, True, True)", out.stderr[-3000:]


def test_kv_bytes_per_token() -> None:
    assert kv_bytes_per_token("tiny") == 2 * 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="valid"):
        kv_bytes_per_token("huge")


@pytest.mark.e2e
def test_plain_server_caches_prefix_and_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    shared = [rng.randrange(4, 1024) for _ in range(200)]
    prompts = [shared + [rng.randrange(4, 1024) for _ in range(50)] for _ in range(4)]
    server = SGLangServer(tiny_model, log_path=tmp_path / "sglang.log", max_total_tokens=8192)
    with server:
        server.wait_ready(timeout=120)
        first = [server.generate(p, max_new_tokens=8) for p in prompts]
        again = server.generate_many(prompts, concurrency=4, max_new_tokens=8)
        pids = server.pids()
        assert len(pids) >= 3, f"expected launcher, scheduler, detokenizer: {pids}"
        assert all(r.cached_tokens > 0 for r in first[1:]), server.log_path  # shared prefix
        assert all(r.cached_tokens >= len(p) - 1 for r, p in zip(again, prompts))
        assert [r.output_ids for r in again] == [r.output_ids for r in first]
        assert all(len(r.output_ids) == 8 for r in first)
        assert server.flush_cache()
        assert server.generate(prompts[0], max_new_tokens=8).output_ids == first[0].output_ids
        assert "sglang:" in server.get_metrics_text()
        started = time.monotonic()
        rc = server.stop()
    assert rc == 0, server.log_path
    assert time.monotonic() - started < 30
    leftover = [p for p in pids if psutil.pid_exists(p) and _not_zombie(p)]
    assert leftover == [], f"processes left behind: {leftover} (log: {server.log_path})"


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
