"""Import-only stand-in for torchvision on CPU SGLang runs (see ../../README.md).

Defines just the modules sglang and transformers import at module level. Anything
that is actually *used* raises, so a text-only server cannot silently depend on it.
"""

__version__ = "0.0.0+cpu_standin"

from . import io, transforms  # noqa: E402,F401  (imported eagerly, as the real package does)


def _unavailable(name):
    def _raise(*args, **kwargs):
        raise RuntimeError(
            f"torchvision stand-in: {name} called on a CPU run; install a real "
            "torchvision matching torch to use vision features"
        )

    _raise.__name__ = name.rsplit(".", 1)[-1]
    _raise.__qualname__ = name
    return _raise


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(f"torchvision.{name}")
