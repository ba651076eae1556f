"""Stand-in for ``torchvision.io``: names import, calls raise (see torchvision/__init__.py)."""

from enum import Enum


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from . import _unavailable

    return _unavailable(f"torchvision.io.{name}")
