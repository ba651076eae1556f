"""Config value parsers: byte sizes, durations and plain values, and the config error type.

Config files say ``16GiB`` and ``30m``; the code wants ``int`` bytes and ``float`` seconds.
Every parser here takes the dotted config key it is parsing, so that a bad value fails
with a message naming the key, the value given and what is allowed
(:class:`ConfigError`). The ``format_*`` functions print values back in a form the
parsers accept, so a printed config loads to the same values. :class:`ValueParser`
bundles a parser with the description of what it allows, which ``hiradix.config`` uses
for both its error messages and its generated reference.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BOOL_PARSER",
    "BYTES_ALLOWED",
    "DURATION_ALLOWED",
    "ConfigError",
    "ValueParser",
    "bad_value",
    "bytes_parser",
    "duration_parser",
    "enum_parser",
    "format_bytes",
    "format_duration",
    "int_parser",
    "parse_bytes",
    "parse_duration",
    "string_parser",
]


class ConfigError(ValueError):
    """A config file or value is invalid.

    ``errors`` holds one message per problem (each names its dotted key); ``str()`` joins
    them one per line, each prefixed with ``source`` when one is given.
    """

    def __init__(self, errors: str | Sequence[str], *, source: str | None = None) -> None:
        self.errors: tuple[str, ...] = (errors,) if isinstance(errors, str) else tuple(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + message for message in self.errors))


def bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    """The standard error for a bad value: names the key, the value and what is allowed."""
    return ConfigError(f"config key {key!r}: got {value!r}; allowed: {allowed}")


# Binary units are powers of 1024, decimal units powers of 1000; bare K/M/G/T/P are
# binary because that is what people mean when they size memory.
_BINARY = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_BYTE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _letter, _power in _BINARY.items():
    for _suffix in (_letter, _letter + "i", _letter + "ib"):
        _BYTE_UNITS[_suffix] = 1024**_power
    _BYTE_UNITS[_letter + "b"] = 1000**_power

BYTES_ALLOWED = (
    "a size in bytes: a non-negative integer or a string like '8GiB', '512MiB', '1.5GB', "
    "'16 GiB' (KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024, KB/MB/GB/TB powers of 1000)"
)
_BYTES_RE = re.compile(r"\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


def parse_bytes(value: Any, key: str) -> int:
    """Parse a byte size (``4096``, ``"8GiB"``, ``"1.5GB"``) into whole bytes.

    Fractions of a byte are truncated when a unit is given (``"1.3GiB"``); a unitless
    fraction (``"1.5"``) is an error. Negative values are errors.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise bad_value(key, value, BYTES_ALLOWED)
    if isinstance(value, int):
        if value < 0:
            raise bad_value(key, value, BYTES_ALLOWED)
        return value
    match = _BYTES_RE.fullmatch(value.lower())
    if match is None or match.group(3) not in _BYTE_UNITS or match.group(1) == "-":
        raise bad_value(key, value, BYTES_ALLOWED)
    multiplier = _BYTE_UNITS[match.group(3)]
    exact = Fraction(match.group(2)) * multiplier
    if multiplier == 1 and exact.denominator != 1:
        raise bad_value(key, value, BYTES_ALLOWED)
    return int(exact)


def format_bytes(num_bytes: int) -> str:
    """Print a byte count exactly, in the largest unit that divides it: ``"8 GiB"``.

    Chooses between binary and decimal units by whichever gives the shorter number, so
    ``1000000000`` prints as ``"1 GB"`` and ``1073741824`` as ``"1 GiB"``.
    """
    if num_bytes < 0:
        raise ValueError(f"format_bytes: negative byte count {num_bytes}")
    candidates = [f"{num_bytes} B"]
    for names, base in (
        (("KiB", "MiB", "GiB", "TiB", "PiB"), 1024),
        (("KB", "MB", "GB", "TB", "PB"), 1000),
    ):
        for power in range(len(names), 0, -1):
            if num_bytes and num_bytes % base**power == 0:
                candidates.append(f"{num_bytes // base**power} {names[power - 1]}")
                break
    return min(candidates, key=lambda text: (len(text.split()[0]), "i" not in text))


DURATION_ALLOWED = (
    "a duration: non-negative seconds as a number, or a string like '50ms', '30s', '5m', "
    "'2h', '7d', '1h30m' (units us, ms, s, m, h, d, w)"
)
# Exact fractions, so that "50ms" parses to the float nearest 0.05 (and prints back).
_DURATION_UNITS = {
    "us": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(604800),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART_RE = re.compile(rf"({_NUMBER})\s*(us|ms|s|m|h|d|w)\s*")
_DURATION_FULL_RE = re.compile(rf"\s*(?:{_NUMBER}\s*(?:us|ms|s|m|h|d|w)\s*)+")
_BARE_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\s*")


def parse_duration(value: Any, key: str) -> float:
    """Parse a duration (``30``, ``0.05``, ``"50ms"``, ``"1h30m"``) into seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad_value(key, value, DURATION_ALLOWED)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise bad_value(key, value, DURATION_ALLOWED)
        return float(value)
    text = value.lower()
    bare = _BARE_NUMBER_RE.fullmatch(text)
    if bare is not None:
        return float(bare.group(1))
    if _DURATION_FULL_RE.fullmatch(text) is None:
        raise bad_value(key, value, DURATION_ALLOWED)
    total = sum(
        (
            Fraction(number) * _DURATION_UNITS[unit]
            for number, unit in _DURATION_PART_RE.findall(text)
        ),
        Fraction(0),
    )
    return float(total)


def format_duration(seconds: float) -> str:
    """Print seconds in a form :func:`parse_duration` reads back: ``"1h30m"``, ``"50ms"``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"format_duration: bad duration {seconds!r}")
    if seconds == int(seconds):
        remaining = int(seconds)
        if remaining == 0:
            return "0s"
        parts = []
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            count, remaining = divmod(remaining, size)
            if count:
                parts.append(f"{count}{unit}")
        return "".join(parts)
    # repr() is the shortest decimal that reads back to the same float; Decimal keeps it
    # exact while scaling to milliseconds and prints it without an exponent.
    exact = Decimal(repr(float(seconds)))
    if seconds < 1:
        return f"{(exact * 1000).normalize():f}ms"
    return f"{exact.normalize():f}s"


@dataclass(frozen=True, slots=True)
class ValueParser:
    """Parses one YAML value for a dotted key; ``allowed`` is what errors and docs print."""

    func: Callable[[Any, str], Any]
    kind: str  # the type column of the reference: "bytes", "duration", "choice", ...
    allowed: str
    brief: str = ""  # a shorter ``allowed`` for the reference table; "" = ``allowed``

    @property
    def doc(self) -> str:
        return self.brief or self.allowed

    def __call__(self, value: Any, key: str) -> Any:
        return self.func(value, key)


def enum_parser(cls: type[enum.Enum]) -> ValueParser:
    """Accepts an enum member's string value (case-insensitive); returns the member."""
    allowed = ", ".join(str(member.value) for member in cls)

    def parse(value: Any, key: str) -> enum.Enum:
        if isinstance(value, str):
            for member in cls:
                if value.strip().lower() == member.value:
                    return member
        raise bad_value(key, value, allowed)

    return ValueParser(parse, "choice", allowed)


def int_parser(low: int, high: int | None = None) -> ValueParser:
    """Accepts an integer (not a bool, not a float) in ``[low, high]``."""
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad_value(key, value, allowed)
        if high is not None and value > high:
            raise bad_value(key, value, allowed)
        return value

    return ValueParser(parse, "integer", allowed)


def _parse_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise bad_value(key, value, "true, false")
    return value


BOOL_PARSER = ValueParser(_parse_bool, "boolean", "true, false")


def string_parser(
    *, nullable: bool = False, pattern: str | None = None, what: str = "a string"
) -> ValueParser:
    """Accepts a string (matching ``pattern``, described by ``what``), or null if nullable."""
    allowed = f"null or {what}" if nullable else what
    compiled = re.compile(pattern) if pattern else None

    def parse(value: Any, key: str) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or (compiled and not compiled.fullmatch(value)):
            raise bad_value(key, value, allowed)
        return value

    return ValueParser(parse, "string", allowed)


def bytes_parser(*, positive: bool = False) -> ValueParser:
    """:func:`parse_bytes`, optionally refusing 0."""
    allowed = BYTES_ALLOWED + ("; not 0" if positive else "")

    def parse(value: Any, key: str) -> int:
        size = parse_bytes(value, key)
        if positive and size == 0:
            raise bad_value(key, value, allowed)
        return size

    brief = "a size: `8GiB`, `1.5GB`, `4096`" + (", not 0" if positive else "")
    return ValueParser(parse, "bytes", allowed, brief)


def duration_parser(*, nullable: bool = False, positive: bool = False) -> ValueParser:
    """:func:`parse_duration`, optionally accepting null (never) and refusing 0."""
    allowed = ("null (never) or " if nullable else "") + DURATION_ALLOWED
    allowed += "; not 0" if positive else ""

    def parse(value: Any, key: str) -> float | None:
        if value is None and nullable:
            return None
        try:
            seconds = parse_duration(value, key)
        except ConfigError:
            raise bad_value(key, value, allowed) from None
        if positive and seconds == 0:
            raise bad_value(key, value, allowed)
        return seconds

    brief = ("null (never) or " if nullable else "") + "a duration: `50ms`, `1h30m`, seconds"
    brief += ", not 0" if positive else ""
    return ValueParser(parse, "duration", allowed, brief)
