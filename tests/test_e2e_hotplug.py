"""End-to-end (issue 18): switching a running server's L3 store with SGLang's admin API,
through the ``hiradix store`` CLI, while 8 clients keep sending: NVMe -> Redis -> none ->
NVMe. Every output must equal that of SGLang's own cache (a server without hiradix) on the
same prompts; pages written after a switch land in the new store; a bad attach is refused
with the config file's message and changes nothing; without the admin key every endpoint
refuses, as SGLang's do."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hiradix.integration import cli
from hiradix.integration.testbed.redis_servers import RedisServer
from hiradix.integration.testbed.sglang_server import SGLangServer

pytestmark = pytest.mark.e2e

L1_TOKENS = 1024
NEW_TOKENS = 8
KEY = "hotplug-admin-key-0123456789"
STRICT = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def _batches() -> list[list[list[int]]]:
    """Four batches of fresh prompts (a shared system prompt each), each followed by repeats
    of earlier ones (served from whichever tier still holds them)."""
    rng = random.Random(18)
    system = [rng.randrange(4, 1000) for _ in range(64)]
    fresh = [
        [system + [rng.randrange(4, 1000) for _ in range(rng.randrange(200, 330))] for _ in range(12)]
        for _ in range(4)
    ]  # fmt: skip
    batches = []
    for i, prompts in enumerate(fresh):
        earlier = [p for batch in fresh[:i] for p in batch]
        batches.append(prompts + rng.sample(earlier, min(4, len(earlier))))
    return batches


BATCHES = _batches()


def _hiradix_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _status(capsys, url: str) -> dict:
    code, out, err = _hiradix_cli(capsys, "store", "status", "--url", url, "--json")
    assert code == 0, err
    (scheduler,) = json.loads(out)["schedulers"]
    return scheduler


def _pages(capsys, config: str) -> int:
    code, out, err = _hiradix_cli(capsys, "store", "stats", "--config", config, "--json")
    assert code == 0, err
    return int(json.loads(out)["pages"])


def _wait(what: str, check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _http(url: str, method: str, path: str, body=None, key: str | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Clients:
    """8 clients sending one batch; ``run`` calls ``midway()`` once half of it finished,
    with the rest in flight or queued, and records every output."""

    def __init__(self, server: SGLangServer):
        self.server = server
        self.outputs: list[tuple[list[int], list[int]]] = []
        self.in_flight = 0
        self.in_flight_at_switch: list[int] = []
        self._lock = threading.Lock()

    def _one(self, prompt: list[int]) -> None:
        with self._lock:
            self.in_flight += 1
        try:
            out = self.server.generate(prompt, NEW_TOKENS, timeout=300).output_ids
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.outputs.append((prompt, out))

    def run(self, prompts: list[list[int]], midway) -> None:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(self._one, p) for p in prompts]
            for f in futures[: len(futures) // 2]:
                f.result()
            self.in_flight_at_switch.append(self.in_flight)
            midway()
            for f in futures:
                f.result()  # a failed request fails the test


def test_switch_stores_under_load(tiny_model, tmp_path, capsys, monkeypatch):
    redis = RedisServer()
    redis.start()
    try:
        _run(tiny_model, tmp_path, capsys, monkeypatch, redis.url)
    finally:
        redis.stop()


def _run(model: Path, tmp: Path, capsys, monkeypatch, redis_url: str) -> None:
    nvme_cfg = tmp / "nvme.yaml"
    nvme_cfg.write_text(f"store: {{kind: nvme, nvme: {{path: {tmp / 'pages'}}}}}\n")
    redis_cfg = tmp / "redis.yaml"
    redis_cfg.write_text(
        f"store: {{kind: redis, redis: {{url: '{redis_url}', key_prefix: 'hotplug:'}}}}\n"
    )
    bad_cfg = tmp / "bad.yaml"
    bad_cfg.write_text("store: {kind: redis, redis: {url: 'http://127.0.0.1:1'}}\n")
    baseline = SGLangServer(
        model, env=STRICT, log_path=tmp / "baseline.log", max_total_tokens=L1_TOKENS,
        name="baseline",
    )  # fmt: skip
    server = SGLangServer(
        model,
        extra_args=["--enable-hiradix", "--hiradix-config", str(nvme_cfg),
                    "--admin-api-key", KEY],
        env=STRICT, log_path=tmp / "hiradix.log", max_total_tokens=L1_TOKENS, name="hotplug",
    )  # fmt: skip
    with baseline, server:  # both start at once: one wait for the two
        baseline.wait_ready()
        server.wait_ready()
        url = server.base_url
        monkeypatch.setenv("HIRADIX_ADMIN_KEY", KEY)
        clients = Clients(server)
        assert _status(capsys, url)["kind"] == "nvme"

        def attach(config: Path) -> None:
            code, out, err = _hiradix_cli(
                capsys, "store", "attach", "--url", url, "--config", str(config)
            )
            assert code == 0, err
            assert "attached" in out

        # 1. NVMe -> Redis, mid-batch
        clients.run(BATCHES[0], lambda: attach(redis_cfg))
        status = _status(capsys, url)
        assert status["kind"] == "redis" and status["switches"] == 1, status
        code, text = _http(url, "GET", "/hicache/storage-backend", key=KEY)  # SGLang's GET
        answer = json.loads(text)
        assert code == 200 and answer["hicache_storage_backend"] == "redis", answer
        (store,) = answer["hiradix_store"]
        assert store["kind"] == "redis" and store["breaker"] == "closed", store
        _wait("pages in Redis", lambda: _pages(capsys, str(redis_cfg)) > 0)  # written after

        # 2. Redis -> none, mid-batch
        def detach() -> None:
            code, out, err = _hiradix_cli(capsys, "store", "detach", "--url", url)
            assert code == 0 and "detached" in out, err

        clients.run(BATCHES[1], detach)
        _wait(
            "the retired store's jobs", lambda: not _status(capsys, url)["retired_stores_with_jobs"]
        )
        status = _status(capsys, url)
        assert status["kind"] == "none" and status["switches"] == 2, status
        redis_pages, nvme_pages = _pages(capsys, str(redis_cfg)), _pages(capsys, str(nvme_cfg))

        # 3. no store; midway: a bad attach and requests without the key change nothing
        def refused() -> None:
            code, _, err = _hiradix_cli(
                capsys, "store", "attach", "--url", url, "--config", str(bad_cfg)
            )
            assert code == 1 and "config key 'store.redis.url'" in err  # checked before sending
            body = {
                "hicache_storage_backend": "redis",
                "hicache_storage_backend_extra_config_json": json.dumps(
                    {"redis": {"url": "http://127.0.0.1:1"}, "colour": "blue"}
                ),
            }
            code, text = _http(url, "PUT", "/hicache/storage-backend", body, KEY)
            assert code == 400, text
            assert "config key 'store.redis.url'" in text and "config key 'store.colour'" in text
            for method, path, payload in (
                ("PUT", "/hicache/storage-backend", body),
                ("DELETE", "/hicache/storage-backend", None),
                ("GET", "/hicache/storage-backend", None),
                ("POST", "/hicache/storage-backend/clear", None),
            ):
                for key in (None, "wrong-key"):
                    code, text = _http(url, method, path, payload, key)
                    assert code == 401, (method, path, key, code, text)
            monkeypatch.delenv("HIRADIX_ADMIN_KEY")
            code, _, err = _hiradix_cli(capsys, "store", "detach", "--url", url)
            monkeypatch.setenv("HIRADIX_ADMIN_KEY", KEY)
            assert code == 1 and ("401" in err or "nauthorized" in err), err

        clients.run(BATCHES[2], refused)
        status = _status(capsys, url)
        assert status["kind"] == "none" and status["switches"] == 2, status
        assert _pages(capsys, str(redis_cfg)) == redis_pages  # nothing written anywhere
        assert _pages(capsys, str(nvme_cfg)) == nvme_pages

        # 4. none -> NVMe, mid-batch
        clients.run(BATCHES[3], lambda: attach(nvme_cfg))
        status = _status(capsys, url)
        assert status["kind"] == "nvme" and status["switches"] == 3, status
        _wait("new pages on NVMe", lambda: _pages(capsys, str(nvme_cfg)) > nvme_pages)

        # clear through SGLang's endpoint empties the store in use
        _wait("idle", lambda: server.hiradix_metrics()["in_flight"] == 0)
        code, out, err = _hiradix_cli(capsys, "store", "clear", "--url", url)
        assert code == 0 and "cleared" in out, err
        _wait("the clear", lambda: _pages(capsys, str(nvme_cfg)) == 0)

        # every request completed with SGLang's own output
        assert len(clients.outputs) == sum(len(b) for b in BATCHES)
        distinct = list({tuple(p): p for p, _ in clients.outputs}.values())
        results = baseline.generate_many(distinct, concurrency=8, max_new_tokens=NEW_TOKENS)
        expected = {tuple(p): r.output_ids for p, r in zip(distinct, results, strict=True)}
        wrong = [i for i, (p, out) in enumerate(clients.outputs) if out != expected[tuple(p)]]
        assert not wrong, f"{len(wrong)} outputs differ from SGLang's own cache"
        assert max(clients.in_flight_at_switch) > 0  # the switches ran under load
        _wait("idle", lambda: server.hiradix_metrics()["in_flight"] == 0)
        m = server.hiradix_metrics()
        assert m["l1_protected_tokens"] == 0 and m["l2_used_slots"] == m["l2_tokens"], m
        assert _http(url, "POST", "/flush_cache", key=KEY)[0] == 200  # an admin endpoint
        log = server.log_text()
        for bad in ("memory leak detected", "double free", "Traceback"):
            assert bad not in log, f"{bad!r} in {server.log_path}"
