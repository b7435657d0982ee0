"""Byte sizes and durations written for people: ``48 MiB``, ``10 min``, ``20 ms``."""

from __future__ import annotations

import re

_BINARY = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b?)\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def format_bytes(value: int) -> str:
    """The largest binary unit that divides the value: 50331648 -> '48 MiB'."""
    for name, size in _BINARY:
        if value >= size and value % size == 0:
            return f"{value // size} {name}"
    return f"{value} B"


def parse_bytes(text: str) -> int:
    """'48MiB', '48M', '48 mib', '512k' or a plain number of bytes; binary units."""
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2) and match.group(3) != "b"):
        raise ValueError(f"not a size: {text!r} (write e.g. 48MiB, 512KiB or 1000)")
    number = float(match.group(1)) * _FACTORS[match.group(2).lower()]
    if number != int(number):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(number)


def format_seconds(value: float) -> str:
    """600 -> '600 s = 10 min', 30 -> '30 s', 2.5 -> '2.5 s'."""
    text = f"{value:g} s"
    if value >= 120 and value % 60 == 0:
        text += f" = {value / 60:g} min"
    return text


def format_milliseconds(value: float) -> str:
    return f"{value:g} ms"


def format_value(value: object, unit: str) -> str:
    """A default as --help and the README show it."""
    if unit == "bytes" and isinstance(value, int):
        return format_bytes(value)
    if unit == "s" and isinstance(value, (int, float)):
        return format_seconds(float(value))
    if unit == "ms" and isinstance(value, (int, float)):
        return format_milliseconds(float(value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
