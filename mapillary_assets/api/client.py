"""Async client for the Mapillary API v4 (vector tiles, Graph API, thumbnail CDN).

The same code talks to the real API and to the emulator: only the base URLs and the token differ.
The access token never leaves this module except inside the HTTP request itself: it is wrapped
in `Secret` (api/client_config.py), URLs are redacted before they reach a log line or an exception, and aiohttp's own
exceptions (whose text can include the request URL, with the token for tile requests) are
replaced by MapillaryErrors raised outside any `except` block, so no traceback chains to them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
from yarl import URL

from mapillary_assets.api.client_config import REDACTED, TOKEN_MISSING_MESSAGE, ClientConfig
from mapillary_assets.api.coercion import app_usage_percent, query_value
from mapillary_assets.api.errors import (
    DailyQuotaSpent,
    MapillaryError,
    PermanentError,
    ThrottledError,
    TransientError,
    classify_error,
)
from mapillary_assets.api.ratelimit import SharedRateLimiter

__all__ = ["MapillaryClient", "MAX_IDS_PER_REQUEST", "MAX_SEARCH_LIMIT"]

logger = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 50
MAX_SEARCH_LIMIT = 2000
FAMILIES = ("tiles", "entity", "search", "cdn")
_MAX_URL_IN_MESSAGE = 240
_TILESET_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_USER_AGENT = "mapillary-assets/0.1 (+aiohttp)"


def _check_ids(image_ids: Sequence[str]) -> list[str]:
    ids = [str(i) for i in image_ids]
    if len(ids) > MAX_IDS_PER_REQUEST:
        raise ValueError(
            f"at most {MAX_IDS_PER_REQUEST} ids per request, got {len(ids)}: split the batch"
        )
    for image_id in ids:
        if not _ID_PATTERN.match(image_id):
            raise ValueError(f"not a Mapillary id: {image_id!r}")
    return ids


class MapillaryClient:
    """`async with MapillaryClient(settings) as client:` — one aiohttp session, shared rate limiters.

    Transient errors are retried here (exponential backoff with full jitter, Retry-After honoured,
    throttling pauses every task and process sharing the rate-limit store); AuthError,
    PermanentError, RequestTooLargeError and UrlExpiredError are raised at once. Every tile request
    is first counted against the day's tile quota (`tiles_per_day`, shared like the buckets); once it
    is spent, DailyQuotaSpent (transient, with `resume_at`) is raised instead of sending.
    """

    def __init__(self, settings: ClientConfig) -> None:
        if not settings.token.reveal().strip():
            raise ValueError(TOKEN_MISSING_MESSAGE)
        self.settings = settings
        shared = {"store": settings.rate_limit_store, "redis_url": settings.rate_limit_redis_url}
        self.limiters: dict[str, SharedRateLimiter] = {
            "tiles": SharedRateLimiter(
                "tiles",
                settings.tiles_per_minute,
                per_day=settings.tiles_per_day,
                day_seconds=settings.quota_day_seconds,
                **shared,
            ),
            "entity": SharedRateLimiter("entity", settings.entity_per_minute, **shared),
            "search": SharedRateLimiter("search", settings.search_per_minute, **shared),
        }
        self.request_counts: collections.Counter = collections.Counter()
        self.retry_counts: collections.Counter = collections.Counter()
        self._sent_tile_requests = 0  # sent and not yet answered
        self._session: aiohttp.ClientSession | None = None
        token = settings.token.reveal()
        # Every spelling of the token that could appear in a URL or message, longest first.
        self._token_forms = sorted(
            {token, quote(token, safe=""), quote_plus(token), quote(token)}, key=len, reverse=True
        )

    def __repr__(self) -> str:
        return f"MapillaryClient(graph_url={self.settings.graph_url!r}, tiles_url={self.settings.tiles_url!r})"

    async def __aenter__(self) -> MapillaryClient:
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            headers={"User-Agent": _USER_AGENT},
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ endpoints

    async def get_tile(self, z: int, x: int, y: int, tileset: str = "mly1_public") -> bytes:
        """Raw vector-tile bytes (uncompressed protobuf, or gzip as served); b"" when the tile is empty."""
        if not _TILESET_PATTERN.match(tileset):
            raise ValueError(f"not a tileset name: {tileset!r}")
        if not (0 <= z <= 30 and 0 <= x < 2**z and 0 <= y < 2**z):
            raise ValueError(f"not a tile: {z}/{x}/{y}")
        token = quote(self.settings.token.reveal(), safe="")
        url = URL(
            f"{self.settings.tiles_url}/maps/vtp/{tileset}/2/{z}/{x}/{y}?access_token={token}",
            encoded=True,
        )
        status, body = await self._call("tiles", url, empty_statuses=(204, 404))
        return body if status not in (204, 404) else b""

    async def get_image(self, image_id: str, fields: Sequence[str]) -> dict:
        (image_id,) = _check_ids([image_id])
        url = URL(f"{self.settings.graph_url}/{image_id}").with_query(self._fields_query(fields))
        return await self._graph_json("entity", url)

    async def get_images(self, image_ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict]:
        """`GET /?ids=...`: entities keyed by id (at most 50 ids; an unknown id fails the whole batch)."""
        ids = _check_ids(image_ids)
        if not ids:
            return {}
        url = URL(f"{self.settings.graph_url}/").with_query(
            {"ids": ",".join(ids), **self._fields_query(fields)}
        )
        result = await self._graph_json("entity", url)
        return {str(key): value for key, value in result.items() if isinstance(value, dict)}

    async def get_images_by_image_ids(
        self, image_ids: Sequence[str], fields: Sequence[str]
    ) -> list[dict]:
        """`GET /images?image_ids=...` (at most 50 ids, like `?ids=`)."""
        ids = _check_ids(image_ids)
        if not ids:
            return []
        url = URL(f"{self.settings.graph_url}/images").with_query(
            {"image_ids": ",".join(ids), **self._fields_query(fields)}
        )
        return self._data_list(await self._graph_json("entity", url))

    async def get_sequence_image_ids(self, sequence_id: str) -> list[str]:
        """Image ids of a sequence, in capture order."""
        sequence_id = str(sequence_id)
        if not _ID_PATTERN.match(sequence_id):
            raise ValueError(f"not a sequence id: {sequence_id!r}")
        url = URL(f"{self.settings.graph_url}/image_ids").with_query({"sequence_id": sequence_id})
        return [
            str(item["id"])
            for item in self._data_list(await self._graph_json("entity", url))
            if "id" in item
        ]

    async def search_images(
        self,
        bbox: tuple[float, float, float, float],
        fields: Sequence[str],
        limit: int = MAX_SEARCH_LIMIT,
        **filters: Any,
    ) -> list[dict]:
        """`GET /images?bbox=...`; dense boxes fail with RequestTooLargeError (split the box and retry)."""
        min_lon, min_lat, max_lon, max_lat = (float(v) for v in bbox)
        if not (min_lon < max_lon and min_lat < max_lat):
            raise ValueError(f"bbox must be (min_lon, min_lat, max_lon, max_lat), got {bbox!r}")
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}")
        query = {
            "bbox": ",".join(repr(v) for v in (min_lon, min_lat, max_lon, max_lat)),
            "limit": str(limit),
            **self._fields_query(fields),
        }
        query.update(
            {name: query_value(value) for name, value in filters.items() if value is not None}
        )
        url = URL(f"{self.settings.graph_url}/images").with_query(query)
        return self._data_list(await self._graph_json("search", url))

    async def get_thumbnail(self, url: str) -> bytes:
        """Bytes of a signed CDN thumbnail URL (no token sent); an expired URL raises UrlExpiredError."""
        target = URL(url, encoded=True)
        if target.scheme not in ("http", "https") or not target.host:
            raise ValueError("thumbnail URL must be an absolute http(s) URL")
        _, body = await self._call("cdn", target, send_auth=False)
        return body

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _fields_query(fields: Sequence[str]) -> dict[str, str]:
        if isinstance(fields, str):
            fields = [fields]
        return {"fields": ",".join(fields)} if fields else {}

    @staticmethod
    def _data_list(result: dict) -> list[dict]:
        data = result.get("data", [])
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    async def _graph_json(self, family: str, url: URL) -> dict:
        _, body = await self._call(family, url, parse_json=True)
        return json.loads(body)

    def _scrub(self, text: str) -> str:
        for form in self._token_forms:
            if form:
                text = text.replace(form, REDACTED)
        # Percent-encodings are case-insensitive: %7C and %7c.
        return re.sub(r"(access_token=)[^&\s\]\)\"']*", r"\1" + REDACTED, text, flags=re.IGNORECASE)

    def _describe(self, url: URL, family: str) -> str:
        if family == "cdn":
            # Signed CDN URLs: the signature is a credential of sorts, and it is long. Keep the path.
            text = str(url.with_query(None))
        else:
            text = self._scrub(str(url))
        if len(text) > _MAX_URL_IN_MESSAGE:
            text = text[: _MAX_URL_IN_MESSAGE - 3] + "..."
        return f"GET {text}"

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2**attempt)
        return random.uniform(0.0, ceiling)

    async def _call(
        self,
        family: str,
        url: URL,
        *,
        send_auth: bool = True,
        parse_json: bool = False,
        empty_statuses: tuple[int, ...] = (),
    ) -> tuple[int, bytes]:
        """One logical request with retries; returns (status, body) of the successful attempt."""
        if self._session is None:
            raise RuntimeError(
                "MapillaryClient is not open: use `async with MapillaryClient(settings) as client:`"
            )
        limiter = self.limiters.get(family)
        # Built only when a log line or an error needs it: most requests succeed with DEBUG off.
        description: str | None = None
        headers = {}
        if send_auth and family != "tiles":
            headers["Authorization"] = f"OAuth {self.settings.token.reveal()}"
        attempts = self.settings.max_retries + 1
        error: MapillaryError | None = None
        for attempt in range(attempts):
            if limiter is not None:
                paused = limiter.paused_for()
                if paused > self.settings.backoff_max_s:
                    error = ThrottledError(
                        f"throttled: requests are paused for {paused:.0f} s more (longer than backoff_max_s="
                        f"{self.settings.backoff_max_s:g})",
                        transient=True,
                        retry_after=paused,
                    )
                    break
                await limiter.acquire()
            if family == "tiles":
                await self._count_against_daily_quota(limiter, url)
            self.request_counts[family] += 1
            started = time.monotonic()
            try:
                status, body, response_headers, error = await self._send(url, headers)
            finally:
                if family == "tiles":
                    self._sent_tile_requests -= 1
            debug = logger.isEnabledFor(logging.DEBUG)
            if debug and description is None:
                description = self._describe(url, family)
            elapsed_ms = (time.monotonic() - started) * 1000
            if error is None:
                if debug:
                    logger.debug(
                        "%s -> %d (%d bytes, %.0f ms)", description, status, len(body), elapsed_ms
                    )
                if limiter is not None:  # the CDN has no limiter, so its headers need no parsing
                    usage = app_usage_percent(response_headers)
                    if usage is not None:
                        limiter.note_usage(usage)
                if 200 <= status < 300 or status in empty_statuses:
                    if parse_json:
                        error = self._json_error(status, body, response_headers)
                    if error is None:
                        return status, body
                else:
                    error = classify_error(status, body, response_headers)
            elif debug:
                logger.debug("%s -> %s (%.0f ms)", description, error.message, elapsed_ms)
            if not error.transient:
                break
            if attempt == attempts - 1:
                break
            if isinstance(error, ThrottledError):
                delay = error.retry_after
                if delay is None:
                    delay = min(
                        self.settings.backoff_max_s, self.settings.backoff_base_s * 2**attempt
                    )
                if delay > self.settings.backoff_max_s:
                    if limiter is not None:
                        limiter.pause_until(time.time() + delay)
                    break
                if limiter is not None:
                    # Every task and process sharing the limiter waits; our next acquire() does too.
                    limiter.pause_until(time.time() + delay)
                    wait = 0.0
                else:
                    wait = delay
            else:
                wait = self._backoff(attempt)
                if error.retry_after is not None:
                    wait = max(wait, min(error.retry_after, self.settings.backoff_max_s))
            self.retry_counts[family] += 1
            description = description or self._describe(url, family)
            logger.info(
                "%s failed (%s); retry %d/%d in %.2f s",
                description,
                error.message,
                attempt + 1,
                attempts - 1,
                wait,
            )
            if wait > 0:
                await asyncio.sleep(wait)
        assert error is not None
        description = description or self._describe(url, family)
        suffix = (
            f"; gave up after {attempt + 1} attempts" if error.transient and attempt > 0 else ""
        )
        raise error.with_context(description + suffix)

    async def _count_against_daily_quota(self, limiter: SharedRateLimiter, url: str) -> None:
        """Count the tile request about to be sent against the day's quota, or raise DailyQuotaSpent
        once the tile requests already sent are answered (their callers cache them: none is lost)."""
        resume_at = limiter.take_daily()
        if resume_at is None:
            self._sent_tile_requests += 1
            return
        while self._sent_tile_requests > 0:
            await asyncio.sleep(0.01)
        raise DailyQuotaSpent.for_quota(self.settings.tiles_per_day, resume_at).with_context(
            self._describe(url, "tiles")
        )

    def _json_error(
        self, status: int, body: bytes, headers: Mapping[str, str]
    ) -> MapillaryError | None:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return TransientError(f"response is not valid JSON ({len(body)} bytes)", status=status)
        if not isinstance(parsed, dict):
            return PermanentError(
                f"expected a JSON object, got {type(parsed).__name__}", status=status
            )
        if isinstance(parsed.get("error"), dict):
            return classify_error(status if status >= 400 else 500, body, headers)
        return None

    async def _send(
        self, url: URL, headers: Mapping[str, str]
    ) -> tuple[int, bytes, Mapping[str, str], MapillaryError | None]:
        """One HTTP attempt. Never raises aiohttp's exceptions: their text may hold the token."""
        assert self._session is not None
        failure: str | None = None
        permanent = False
        try:
            async with self._session.get(url, headers=headers) as response:
                body = await response.read()
                return response.status, body, response.headers, None
        except TimeoutError:
            failure = f"timed out after {self.settings.timeout_s:g} s"
        except aiohttp.InvalidURL:
            failure, permanent = "invalid URL", True
        except aiohttp.TooManyRedirects:
            failure, permanent = "too many redirects", True
        except (aiohttp.ClientError, OSError) as exc:
            failure = f"connection failed ({type(exc).__name__}: {self._scrub(str(exc))[:200]})"
        # Built here, outside the except blocks, so the error carries no __context__ to aiohttp's.
        error_class = PermanentError if permanent else TransientError
        return 0, b"", {}, error_class(failure or "request failed")
