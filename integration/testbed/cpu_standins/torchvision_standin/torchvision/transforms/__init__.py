"""Stand-in for ``torchvision.transforms``: names import, calls raise."""

from . import functional, v2  # noqa: F401
from .functional import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from .. import _unavailable

    return _unavailable(f"torchvision.transforms.{name}")
