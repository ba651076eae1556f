"""``hiradix store attach|detach|status|clear --url URL``: switch the L3 store of a running
server through SGLang's HiCache admin API (``integration/sglang/store_admin.py`` serves it).

* ``attach --config FILE``: the ``store:`` section of FILE (a hiradix config file; checked
  here first, with the same messages as ``hiradix config check``; relative paths resolve
  against FILE's directory) becomes the server's store at its next scheduler step.
* ``detach``: no L3 store from the next step on; L1 and L2 keep serving.
* ``status``: the store in use per scheduler (data-parallel rank), its breaker and counters
  (``GET /hicache/storage-backend``, which hiradix extends; else ``GET /server_info``).
* ``clear``: delete every page of the store in use.

The server must run with ``--admin-api-key``; the key is read from the environment
variable named by ``--admin-key-env`` (default ``HIRADIX_ADMIN_KEY``), never from the
command line. Exit codes: 0 done, 1 refused (bad config, wrong key, no store), 2 server
unreachable. Only the standard library is used (no SGLang import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from hiradix.config import config_to_dict, load_config

__all__ = ["ACTIONS", "main"]

ACTIONS = ("attach", "detach", "status", "clear")
ENDPOINT = "/hicache/storage-backend"
DEFAULT_KEY_ENV = "HIRADIX_ADMIN_KEY"
STATUS_KEY = "hiradix_store"  # store_admin.STATUS_KEY (not imported: it imports torch)


def store_request(path: str) -> dict[str, Any]:
    """The attach request body for the store section of the config file ``path``."""
    config = load_config(path)  # ConfigError: reported by the caller like `config check`
    section = config_to_dict(config)["store"]  # resolved: absolute paths, every key
    kind = section.pop("kind")
    return {
        "hicache_storage_backend": kind,
        "hicache_storage_backend_extra_config_json": json.dumps(section),
    }


def call(
    url: str, method: str, path: str, key: str | None, body: Any = None, timeout: float = 30.0
) -> tuple[int, str]:
    """(HTTP status, body text); OSError when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def _print_status(server: Any, schedulers: list[Any]) -> None:
    print(f"tokenizer view: {json.dumps(server)}")
    for rank, status in enumerate(schedulers):
        if status is None:
            print(f"scheduler {rank}: not a hiradix cache")
            continue
        print(f"scheduler {rank}: {status['store']} (switches {status['switches']})")
        for name in ("breaker", "block_tokens", "queued_write_pages", "lookups_in_flight"):
            if name in status:
                print(f"  {name}: {status[name]}")
        for name, value in status["since_attach"].items():
            print(f"  {name} since attach: {value}")
        if status["pending"]:
            print(f"  pending: {', '.join(status['pending'])}")


def _status(url: str, key: str | None, as_json: bool) -> int:
    code, text = call(url, "GET", ENDPOINT, key)
    if code != 200:
        print(f"error: GET {ENDPOINT}: HTTP {code}: {text.strip()}", file=sys.stderr)
        return 1
    server = json.loads(text)
    schedulers = server.pop(STATUS_KEY, None)
    if schedulers is None:  # the GET without hiradix's addition: the schedulers' own view
        code, text = call(url, "GET", "/server_info", key)
        if code != 200:
            print(f"error: GET /server_info: HTTP {code}: {text.strip()}", file=sys.stderr)
            return 1
        states = json.loads(text).get("internal_states") or []
        schedulers = [state.get(STATUS_KEY) for state in states]
    if as_json:
        print(json.dumps({"server": server, "schedulers": schedulers}, indent=2))
    else:
        _print_status(server, schedulers)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one admin action against ``args.url``; returns the exit code."""
    url = args.url
    if not url:
        print(f"error: 'hiradix store {args.action}' needs --url", file=sys.stderr)
        return 2
    key = os.environ.get(args.admin_key_env or DEFAULT_KEY_ENV) or None
    try:
        if args.action == "status":
            return _status(url, key, args.json)
        if args.action == "attach":
            if not args.config:
                print("error: 'hiradix store attach' needs --config FILE", file=sys.stderr)
                return 2
            code, text = call(url, "PUT", ENDPOINT, key, store_request(args.config))
        elif args.action == "detach":
            code, text = call(url, "DELETE", ENDPOINT, key)
        else:
            code, text = call(url, "POST", f"{ENDPOINT}/clear", key)
    except OSError as error:
        print(f"error: cannot reach {url}: {error}", file=sys.stderr)
        return 2
    out = sys.stdout if code == 200 else sys.stderr
    print(text.strip() or f"HTTP {code}", file=out)
    return 0 if code == 200 else 1
