"""The ``hiradix`` command line: config checks, L3 store maintenance, demo and simulator.

    hiradix config check FILE        validate FILE and print the resolved config (YAML)
    hiradix config show-default      print the embedded default config file
    hiradix config reference         print the markdown reference of every config key
    hiradix store {stats,verify,gc} --config FILE [--delete] [--json]
    hiradix store {attach --config FILE,detach,status,clear} --url URL   (a running server)
    hiradix demo [--config FILE] [demo options...]
    hiradix sim [simulator options...]

``store``, ``demo`` and ``sim`` are implemented elsewhere (``store_cli``,
``sglang.demo``, ``sim_cli``) and imported only when used, so that ``hiradix config``
works without sglang or a store client installed. Exit codes: 0 success, 1 invalid
config (or a failed subcommand), 2 usage error or a subcommand that is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

import yaml

from hiradix.config import (
    ConfigError,
    config_reference_markdown,
    config_to_dict,
    default_config_path,
    load_config,
)

logger = logging.getLogger(__name__)

_STORE_MODULE = "hiradix.integration.store_cli"
_STORE_ADMIN_MODULE = "hiradix.integration.store_admin_cli"
_STORE_ADMIN_ACTIONS = ("attach", "detach", "status", "clear")  # against a running server
_DEMO_MODULE = "hiradix.integration.sglang.demo"
_SIM_MODULE = "hiradix.integration.sim_cli"
_PASSTHROUGH = ("demo", "sim")  # subcommands whose own parser reads the remaining args


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hiradix")
    except PackageNotFoundError:
        return "unknown"


def _print_config_error(error: ConfigError) -> None:
    for line in str(error).splitlines():
        print(f"error: {line}", file=sys.stderr)


def _config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as error:
        _print_config_error(error)
        return 1
    print(f"# {args.file}: OK (resolved; every key shown)")
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0


def _config_show_default(args: argparse.Namespace) -> int:
    with open(default_config_path(), encoding="utf-8") as file:
        print(file.read(), end="")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    print(config_reference_markdown(), end="")
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command given without its action: show what there is to run."""
    parser.print_help(sys.stderr)
    return 2


def _load_entry(module_name: str, command: str) -> Callable[..., int] | None:
    """``module.main``, or None after printing why it cannot be imported."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(
            f"error: 'hiradix {command}' is not available: cannot import {module_name} ({error})",
            file=sys.stderr,
        )
        return None
    entry: Callable[..., int] | None = getattr(module, "main", None)
    if entry is None:
        print(f"error: {module_name} has no main()", file=sys.stderr)
    return entry


def _store(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    admin = args.action in _STORE_ADMIN_ACTIONS
    if admin and not args.url:
        parser.error(f"store {args.action} needs --url (the server's HTTP address)")
    if not admin and not args.config:
        parser.error(f"store {args.action} needs --config FILE")
    entry = _load_entry(_STORE_ADMIN_MODULE if admin else _STORE_MODULE, f"store {args.action}")
    if entry is None:
        return 2
    try:
        return int(entry(args))
    except ConfigError as error:
        _print_config_error(error)
        return 1


def _passthrough(module_name: str, command: str, rest: list[str]) -> int:
    entry = _load_entry(module_name, command)
    return 2 if entry is None else int(entry(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiradix", description="hiradix: hierarchical KV cache for SGLang."
    )
    parser.add_argument("--version", action="version", version=f"hiradix {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = commands.add_parser("config", help="check, show and document config files")
    config.set_defaults(handler=lambda args: _usage(config))
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_commands.add_parser("check", help="validate FILE and print it resolved")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=_config_check)
    show = config_commands.add_parser("show-default", help="print the embedded default config")
    show.set_defaults(handler=_config_show_default)
    reference = config_commands.add_parser("reference", help="print the key reference (md)")
    reference.set_defaults(handler=_config_reference)

    store = commands.add_parser(
        "store", help="inspect and maintain the L3 store; switch a running server's store"
    )
    store.add_argument("action", choices=("stats", "verify", "gc", *_STORE_ADMIN_ACTIONS))
    store.add_argument("--config", metavar="FILE", help="hiradix config file (its store section)")
    store.add_argument("--delete", action="store_true", help="delete bad or expired pages")
    store.add_argument("--json", action="store_true", help="print JSON instead of a table")
    store.add_argument("--url", metavar="URL", help="a running server (attach/detach/status/clear)")
    store.add_argument(
        "--admin-key-env",
        metavar="NAME",
        default="HIRADIX_ADMIN_KEY",
        help="environment variable holding the server's --admin-api-key",
    )
    store.set_defaults(handler=lambda args: _store(args, store))

    commands.add_parser(
        "demo",
        add_help=False,  # --help goes to the demo's own parser
        help="run the SGLang demo (options are passed to it)",
        usage="hiradix demo [--config FILE] [demo options...]",
    )
    commands.add_parser(
        "serve",
        add_help=False,  # --help goes to SGLang's launcher, which lists the hiradix flags
        help="start an SGLang server (python -m sglang.launch_server; all options pass through)",
        usage="hiradix serve --model-path PATH --enable-hiradix [--hiradix-config FILE] ...",
    )
    commands.add_parser(
        "sim",
        add_help=False,
        help="replay a trace in the simulator (options are passed to it)",
        usage="hiradix sim [simulator options...]",
    )
    return parser


def _serve(rest: list[str]) -> int:
    """Hand over to SGLang's launcher in this process: its plugin loading registers
    hiradix's backend and flags before it parses ``rest``."""
    import runpy

    sys.argv = ["hiradix serve", *rest]
    try:
        runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``hiradix`` command; returns the process exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        return _passthrough(_DEMO_MODULE, "demo", rest)
    if args.command == "sim":
        return _passthrough(_SIM_MODULE, "sim", rest)
    if args.command == "serve":
        return _serve(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    return _usage(parser) if handler is None else handler(args)


if __name__ == "__main__":
    sys.exit(main())
