"""Mapillary API errors and their classification (pure: no HTTP, no I/O).

The API's HTTP status is unreliable (an invalid token answers 500, a throttle 403), so errors are
classified by the JSON body's `error.code` first and by the status only when the body says nothing.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import time
from collections.abc import Mapping

from mapillary_assets.api.coercion import int_or_none

__all__ = [
    "AuthError",
    "DailyQuotaSpent",
    "MapillaryError",
    "PermanentError",
    "RequestTooLargeError",
    "ThrottledError",
    "TransientError",
    "UrlExpiredError",
    "classify_error",
    "parse_retry_after",
]

AUTH_MESSAGE = "token rejected (code 190): set MAPILLARY_ACCESS_TOKEN to a valid token"
THROTTLE_CODES = frozenset({4, 17, 613})
_MAX_DETAIL_CHARS = 300


class MapillaryError(Exception):
    """Base of every error the client raises; `transient` says whether retrying later can help."""

    default_transient = False

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        subcode: int | None = None,
        status: int | None = None,
        transient: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.subcode = subcode
        self.status = status
        self.transient = self.default_transient if transient is None else transient
        self.retry_after = retry_after

    def with_context(self, context: str) -> MapillaryError:
        """A copy whose message ends with `context` (e.g. the redacted request), same class and attributes."""
        return type(self)(f"{self.message} [{context}]", **self._attrs())

    def __reduce__(self):
        # Keyword-only attributes would be lost by Exception's default pickling (Dagster pickles errors).
        return (_rebuild, (type(self), self.message, self._attrs()))

    def _attrs(self) -> dict:
        return {
            "code": self.code,
            "subcode": self.subcode,
            "status": self.status,
            "transient": self.transient,
            "retry_after": self.retry_after,
        }

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v!r}" for k, v in self._attrs().items() if v is not None)
        return f"{type(self).__name__}({self.message!r}{', ' if attrs else ''}{attrs})"


def _rebuild(cls: type[MapillaryError], message: str, attrs: dict) -> MapillaryError:
    return cls(message, **attrs)


class AuthError(MapillaryError):
    """Code 190 / HTTP 401: the token is invalid or the app was de-authorised. Fatal."""


class ThrottledError(MapillaryError):
    """Code 4/17/613 or HTTP 429: the app's request budget is spent; wait `retry_after` and retry."""

    default_transient = True


class DailyQuotaSpent(MapillaryError):
    """The day's tile quota (MAPILLARY_TILES_PER_DAY) is spent: no tile request before `resume_at`
    (unix seconds, the start of the next quota day). Transient: the same request succeeds then."""

    default_transient = True

    def __init__(self, message: str, *, resume_at: float, **attrs) -> None:
        attrs.setdefault("retry_after", max(0.0, resume_at - time.time()))
        super().__init__(message, **attrs)
        self.resume_at = resume_at

    @classmethod
    def for_quota(cls, per_day: int, resume_at: float) -> DailyQuotaSpent:
        when = datetime.datetime.fromtimestamp(resume_at, datetime.UTC)
        hours, rest = divmod(max(0, round(resume_at - time.time())), 3600)
        return cls(
            f"the daily tile quota is spent ({per_day:,} tile requests per day, "
            f"MAPILLARY_TILES_PER_DAY): tile requests resume at {when:%Y-%m-%d %H:%M:%S} UTC "
            f"(in {hours} h {rest // 60} min {rest % 60} s)",
            resume_at=resume_at,
        )

    def _attrs(self) -> dict:
        return {**super()._attrs(), "resume_at": self.resume_at}


class RequestTooLargeError(MapillaryError):
    """Code 1: the answer would be too large; the caller shrinks the request (e.g. splits the bbox)."""


class PermanentError(MapillaryError):
    """Code 100 (unknown id or field) and other 4xx: retrying the same request cannot succeed."""


class TransientError(MapillaryError):
    """5xx without a usable body, timeouts, connection resets, code -2 (query timeout): retry later."""

    default_transient = True


class UrlExpiredError(MapillaryError):
    """CDN 403 "URL signature expired": ask the Graph API for a fresh thumbnail URL."""


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_object(body: bytes) -> dict | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed["error"]
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


def _body_text(body: bytes) -> str:
    return _short(body[: 2 * _MAX_DETAIL_CHARS].decode("utf-8", errors="replace")) if body else ""


def classify_error(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> MapillaryError:
    """The MapillaryError for a failed response (status, raw body, response headers)."""
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    error = _error_object(body)
    code = subcode = None
    api_message = ""
    declared_transient = None
    if error is not None:
        code = int_or_none(error.get("code"))
        subcode = int_or_none(error.get("error_subcode"))
        api_message = _short(str(error.get("message") or ""))
        if isinstance(error.get("is_transient"), bool):
            declared_transient = error["is_transient"]
    attrs = {"code": code, "subcode": subcode, "status": status}

    def describe(prefix: str) -> str:
        parts = [f"HTTP {status}"]
        if code is not None:
            parts.append(f"code {code}" + (f"/{subcode}" if subcode is not None else ""))
        detail = api_message or (_body_text(body) if error is None else "")
        return f"{prefix} ({', '.join(parts)})" + (f": {detail}" if detail else "")

    if code == 190 or (status == 401 and code is None):
        return AuthError(AUTH_MESSAGE, **attrs)
    if code in THROTTLE_CODES or (status == 429 and code is None):
        return ThrottledError(describe("throttled"), retry_after=retry_after, **attrs)
    if code == 1:
        return RequestTooLargeError(describe("request too large, ask for less data"), **attrs)
    if code == 100:
        return PermanentError(describe("request rejected"), **attrs)
    if code == -2:
        # "Query Timeout" says is_transient: false, yet the same request succeeds when retried.
        return TransientError(describe("query timeout"), retry_after=retry_after, **attrs)
    if code == 2 or declared_transient:
        return TransientError(describe("temporary API error"), retry_after=retry_after, **attrs)
    if error is None and status == 403 and b"signature expired" in body.lower():
        return UrlExpiredError(describe("thumbnail URL expired, fetch a fresh URL"), **attrs)
    if status == 401:
        return AuthError(AUTH_MESSAGE, **attrs)
    if status == 429:
        return ThrottledError(describe("throttled"), retry_after=retry_after, **attrs)
    if status >= 500 or status in (408, 425):
        return TransientError(describe("server error"), retry_after=retry_after, **attrs)
    if 400 <= status < 500:
        return PermanentError(describe("request rejected"), **attrs)
    return TransientError(describe("unexpected response"), retry_after=retry_after, **attrs)
