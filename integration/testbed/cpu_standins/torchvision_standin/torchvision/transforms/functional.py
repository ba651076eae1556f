"""Stand-in for ``torchvision.transforms.functional``: ``InterpolationMode`` is real
(modules use its members as default argument values at import time); calls raise."""

from enum import Enum


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from .. import _unavailable

    return _unavailable(f"torchvision.transforms.functional.{name}")
