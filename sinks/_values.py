"""Value conversions that more than one sink needs (pure functions)."""

from __future__ import annotations

from typing import Any


def bits_text(value: Any, length: int | None) -> Any:
    """A BIT value as a string of 0/1: from bool, int, big-endian bytes (MySQL's order) or text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return format(value, f"0{length or 1}b")
    if isinstance(value, bytes | bytearray):
        text = "".join(format(b, "08b") for b in value)
        return text[-length:] if length and len(text) > length else text
    return value
