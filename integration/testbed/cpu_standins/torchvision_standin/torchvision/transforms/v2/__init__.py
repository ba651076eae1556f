"""Stand-in for ``torchvision.transforms.v2`` (transformers imports it when torchvision
looks installed): names import, calls raise."""

from ..functional import InterpolationMode  # noqa: F401
from . import functional  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from ... import _unavailable

    return _unavailable(f"torchvision.transforms.v2.{name}")
