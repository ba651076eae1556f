"""The prefetch-policy registry: a small name table, plus out-of-tree classes.

It imports the built-in policies to fill the table; they never import it.

``create_policy(config.prefetch)`` resolves ``config.policy`` as, in order:

1. a registered name (the built-ins: none, arrival, session, hot, pattern, and anything
   added with :func:`register_policy`);
2. a ``"package.module:Class"`` string, imported now;
3. an entry point named so in the group ``hiradix.prefetch_policies``.

and constructs the class with ``config.options`` as keyword arguments. An unknown name
raises ``ValueError`` listing the valid ones; an option the class does not take raises
``ValueError`` naming it and the options the class does take.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from hiradix.config_types import PrefetchConfig
from hiradix.policies.base import PrefetchPolicy
from hiradix.policies.builtin import ArrivalPolicy, HotPolicy, NonePolicy, SessionPolicy
from hiradix.policies.pattern import PatternPolicy

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hiradix.prefetch_policies"

# The policy modules never import this one: the table names them, not the reverse.
_POLICIES: dict[str, type[PrefetchPolicy]] = {
    cls.name: cls for cls in (NonePolicy, ArrivalPolicy, SessionPolicy, HotPolicy, PatternPolicy)
}


def register_policy(name: str, cls: type[PrefetchPolicy]) -> None:
    """Add ``cls`` under ``name``; a duplicate name raises ``ValueError``."""
    if not isinstance(cls, type) or not issubclass(cls, PrefetchPolicy):
        raise TypeError(f"register_policy({name!r}): {cls!r} is not a PrefetchPolicy subclass")
    if name in _POLICIES:
        raise ValueError(f"prefetch policy {name!r} is already registered")
    _POLICIES[name] = cls


def registered_policies() -> dict[str, type[PrefetchPolicy]]:
    """Name -> class of every registered policy (a copy)."""
    return dict(_POLICIES)


def _entry_point_names() -> list[str]:
    try:
        return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # noqa: BLE001 - a broken distribution's metadata must not break config loading
        return []


def _unknown(name: str) -> ValueError:
    valid = sorted(set(_POLICIES) | set(_entry_point_names()))
    return ValueError(
        f"prefetch.policy: unknown policy {name!r}; allowed: {', '.join(valid)}, "
        "or 'package.module:Class'"
    )


def _check_class(obj: Any, spec: str) -> type[PrefetchPolicy]:
    if not isinstance(obj, type) or not issubclass(obj, PrefetchPolicy):
        raise ValueError(  # noqa: TRY004 - a config error, as for an unknown name
            f"prefetch.policy: {spec!r} is {obj!r}, not a subclass of "
            "hiradix.policies.base.PrefetchPolicy"
        )
    return obj


def resolve_policy_class(spec: str) -> type[PrefetchPolicy]:
    """The class ``spec`` names (see the module docstring); raises ``ValueError``."""
    if spec in _POLICIES:
        return _POLICIES[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"prefetch.policy: cannot import {module_name!r}: {error}") from None
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ValueError(f"prefetch.policy: {module_name!r} has no {attr!r}") from None
        return _check_class(obj, spec)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return _check_class(ep.load(), spec)
    raise _unknown(spec)


def _check_options(cls: type[PrefetchPolicy], options: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in options:
        if name not in allowed:
            raise ValueError(
                f"prefetch.options.{name}: unknown option of policy {cls.name!r}; "
                f"allowed: {', '.join(allowed) or '(none)'}"
            )


def _plain(value: Any) -> Any:
    """Config values are frozen (mapping proxies, tuples); policies get plain copies."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def create_policy(config: PrefetchConfig) -> PrefetchPolicy:
    """A new policy from ``config.policy`` and ``config.options``; raises ``ValueError``."""
    cls = resolve_policy_class(config.policy)
    options = {name: _plain(value) for name, value in config.options.items()}
    _check_options(cls, options)
    policy = cls(**options)
    logger.debug("hiradix: prefetch policy %r (%s)", config.policy, cls.__qualname__)
    return policy
