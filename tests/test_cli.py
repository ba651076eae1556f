"""The ``hiradix`` command line: config subcommands (as real processes) and lazy dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from hiradix.integration import cli

from hiradix.config import CONFIG_KEYS, default_config_path, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hiradix.integration.cli", *args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_check_ok_prints_resolved_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store:\n  kind: nvme\n  nvme: {path: pages, size: 2GiB}\nttl: {store: 90m}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["store"]["nvme"] == {"path": str(tmp_path / "pages"), "size": "2 GiB",
                                        "fsync": False, "group_access": False}  # fmt: skip
    assert printed["ttl"]["store"] == "1h30m"
    assert parse_config(printed, source=str(path)) == load_config(path)


def test_config_check_errors_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("store:\n  kind: mongo\n  redis: {urll: x}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [
        f"error: {path}: config key 'store.kind': got 'mongo'; allowed: none, nvme, redis, memory",
        (
            f"error: {path}: config key 'store.redis.urll': unknown key; allowed: url, "
            "password_env, username, cluster, key_prefix, timeout, batch_pages, tls"
        ),
    ]


def test_config_check_never_prints_a_redis_password(tmp_path: Path) -> None:
    """Issue 16 item 11: a refused URL is shown with its userinfo redacted."""
    path = tmp_path / "pw.yaml"
    path.write_text("store:\n  kind: redis\n  redis: {url: 'redis://app:hunter2@cache:6379/0'}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1 and "hunter2" not in result.stdout + result.stderr
    assert "config key 'store.redis.url': got 'redis://***@cache:6379/0'" in result.stderr


def test_config_check_constructs_the_prefetch_policy(tmp_path: Path) -> None:
    """Issue 16 item 12: a policy that cannot load fails ``config check``, not the server."""
    path = tmp_path / "policy.yaml"
    path.write_text("prefetch:\n  policy: nope.mod:Cls\n  options: {depth: 2}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"error: {path}: config key 'prefetch.policy': got 'nope.mod:Cls'; allowed: "
    )
    assert "cannot import 'nope.mod'" in result.stderr


def test_config_check_missing_file_exit_1(tmp_path: Path) -> None:
    result = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nope.yaml'}: cannot read config file")


@pytest.mark.parametrize("name", ["default.yaml", "redis.yaml", "redis-cluster.yaml"])
def test_config_check_shipped_files(name: str) -> None:
    assert run_cli("config", "check", f"configs/{name}").returncode == 0


def test_show_default_prints_the_embedded_file() -> None:
    result = run_cli("config", "show-default")
    assert result.returncode == 0
    with open(default_config_path(), encoding="utf-8") as file:
        assert result.stdout == file.read()


def test_reference_lists_every_key() -> None:
    result = run_cli("config", "reference")
    assert result.returncode == 0
    assert all(f"| `{key}` |" in result.stdout for key in CONFIG_KEYS)


@pytest.mark.parametrize(
    "argv", [[], ["config"], ["config", "check"], ["store", "stats"], ["bogus"], ["config",
             "check", "x.yaml", "--extra"]],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str]) -> None:
    result = run_cli(*argv)
    assert result.returncode == 2 and "usage: hiradix" in result.stderr


def test_console_script_installed() -> None:
    script = Path(sys.executable).parent / "hiradix"
    assert script.exists(), f"{script} missing: reinstall with `pip install -e .`"
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "hiradix"]
    if entry.value != "hiradix.integration.cli:main":
        pytest.skip(f"installed console script is stale ({entry.value}); rerun scripts/setup.sh")
    result = subprocess.run(
        [str(script), "config", "reference"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0 and "store.kind" in result.stdout


# --------------------------------------------------------------------------- lazy dispatch


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, calls: list[Any]) -> None:
    module = types.ModuleType(name)

    def main(arg: Any) -> int:
        calls.append(arg)
        return 7

    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)


def test_store_dispatches_to_store_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    fake_module(monkeypatch, "hiradix.integration.store_cli", calls)
    assert cli.main(["store", "gc", "--config", "c.yaml", "--delete", "--json"]) == 7
    (args,) = calls
    assert (args.action, args.config, args.delete, args.json) == ("gc", "c.yaml", True, True)
    assert cli.main(["store", "stats", "--config", "c.yaml"]) == 7
    assert (calls[1].action, calls[1].delete, calls[1].json) == ("stats", False, False)


def test_store_without_store_cli_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "hiradix.integration.store_cli", None)  # import fails
    assert cli.main(["store", "verify", "--config", "c.yaml"]) == 2
    assert "error: 'hiradix store verify' is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "module"),
    [("demo", "hiradix.integration.sglang.demo"), ("sim", "hiradix.integration.sim_cli")],
)
def test_passthrough_commands_get_the_remaining_args(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    fake_module(monkeypatch, module, calls)
    rest = ["--config", "x.yaml", "--port", "30000", "positional", "--help"]
    assert cli.main([command, *rest]) == 7
    assert calls == [rest]


def test_passthrough_missing_module_returns_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "hiradix.integration.sim_cli", None)
    assert cli.main(["sim", "--trace", "t.jsonl"]) == 2
    assert "'hiradix sim' is not available" in capsys.readouterr().err


def test_main_reads_sys_argv(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["hiradix", "config", "reference"])
    assert cli.main() == 0
    assert "`store.kind`" in capsys.readouterr().out
    assert os.path.exists(default_config_path())


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "sglang.launch_server", "--help"],
        ["-m", "hiradix.integration.cli", "serve", "--help"],
    ],
)
def test_sglang_help_lists_the_hiradix_flags(command):
    """The plugin adds --enable-hiradix and --hiradix-config to SGLang's own launcher, and
    ``hiradix serve`` passes everything through to it."""
    from hiradix.integration.testbed.sglang_server import cpu_server_env

    out = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=300,
        env=cpu_server_env(), check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--enable-hiradix" in out.stdout and "--hiradix-config" in out.stdout


def test_bad_config_fails_the_launch_before_any_process_starts(tmp_path):
    from hiradix.integration.testbed.sglang_server import cpu_server_env

    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {kind: mongo}\n")
    out = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
         "--device", "cpu", "--enable-hiradix", "--hiradix-config", str(bad)],
        capture_output=True, text=True, timeout=300, env=cpu_server_env(), check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "config key 'store.kind': got 'mongo'; allowed: none, nvme, redis, memory" in out.stderr
