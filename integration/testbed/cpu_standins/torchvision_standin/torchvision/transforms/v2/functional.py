"""Stand-in for ``torchvision.transforms.v2.functional``: names import, calls raise."""

from ..functional import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from ... import _unavailable

    return _unavailable(f"torchvision.transforms.v2.functional.{name}")
