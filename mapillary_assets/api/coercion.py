"""Lenient conversions of the scalar values in API payloads (pure).

The API sends ids and numbers as ints, floats or strings depending on the endpoint and the field;
these turn each into one Python type, or None when the value is absent or unusable. Ids are never
routed through float: 64-bit ids lose digits there. Also the client's two header/query conversions:
`app_usage_percent` (the `x-app-usage` header) and `query_value` (a filter value in a query string).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "app_usage_percent",
    "bool_or_none",
    "float_or_none",
    "id_str",
    "int_or_none",
    "query_value",
]


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


def app_usage_percent(headers: Mapping[str, str]) -> float | None:
    """The highest percentage of an `x-app-usage` header (call count, CPU time, total time), or None."""
    raw = headers.get("x-app-usage") or headers.get("X-App-Usage")
    if not raw:
        return None
    try:
        usage = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    numbers = [
        float(usage[key])
        for key in ("call_count", "total_cputime", "total_time")
        if isinstance(usage.get(key), (int, float)) and not isinstance(usage.get(key), bool)
    ]
    return max(numbers) if numbers else None


def query_value(value: Any) -> str:
    """A query-string value: booleans as true/false, datetimes as ISO 8601 (UTC if naive), lists joined."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value)
    return str(value)
