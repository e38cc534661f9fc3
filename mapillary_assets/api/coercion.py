"""Lenient conversions of the scalar values in API payloads (pure).

The API sends ids and numbers as ints, floats or strings depending on the endpoint and the field;
these turn each into one Python type, or None when the value is absent or unusable. Ids are never
routed through float: 64-bit ids lose digits there.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bool_or_none", "float_or_none", "id_str", "int_or_none"]


def int_or_none(value: Any) -> int | None:
    """An int from an int, an integral float or a digit string; None for anything else (never via float for strings)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def id_str(value: Any) -> str | None:
    """An id as a decimal string; ints are formatted directly (never through float)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Precision was already lost upstream; at least do not render "1.2e+15".
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def bool_or_none(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None
