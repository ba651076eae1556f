"""The CPU testbed: real SGLang servers and real redis-servers for tests, the demo and
benchmarks. Not part of the product: nothing in ``hiradix``, ``backends`` or
``integration/sglang`` imports it (map in ``integration/README.md``)."""

from __future__ import annotations

import os


def env_switch(env: str, mode: str) -> bool:
    """Whether a testbed patch is asked for: ``env`` set to ``mode``. Unset or empty: off;
    any other value raises ``ValueError`` naming the allowed one."""
    value = os.environ.get(env, "")
    if value and value != mode:
        raise ValueError(f"{env}={value!r} is not supported; allowed: {mode!r} or unset")
    return bool(value)
