"""The emulator's request handlers, one per endpoint, and ``endpoint()``, which wraps each of them.

Every API request passes, in order: counting, latency, outage (503), random 5xx, auth, the daily tile
quota (spent: 429 code 4 with ``Retry-After`` up to the next quota day, counted as
``daily_quota_refused``), rate limit (sliding 60 s window per family; over budget: 429, or 403 with
``rate_limit_status=403``, code 4, ``Retry-After``), then the handler. Graph responses carry
``x-app-usage``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import mercantile
import numpy as np
from aiohttp import web

from . import thumbnails
from .entities import THUMB_FIELDS
from .errors import ApiError, error_response, invalid_token, unknown_id
from .faults import injected_failure
from .ids import decode_image_id
from .records import ImageRecord
from .state import EmulatorState
from .tiles import TILESETS
from .world import World

MAX_BATCH_IDS = 50
MAX_SEARCH_LIMIT = 2000
MAX_BBOX_AREA = 0.01

Handler = Callable[[web.Request, EmulatorState, float], Awaitable[web.StreamResponse]]


def endpoint(state: EmulatorState, kind: str, family: str, auth: str | None, handler: Handler):
    """Wraps a handler with counting, faults, auth and rate limiting."""
    graph = auth == "graph"

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state.count(kind, f"family:{family}", "requests")
        faults = state.faults
        if faults.latency_s or faults.latency_jitter_s:
            await asyncio.sleep(
                faults.latency_s + faults.latency_jitter_s * state.fault_rng.random()
            )
        now = time.time()
        response = injected_failure(faults, now, state.fault_rng)
        if response is not None:
            state.count("faulted")
        else:
            try:
                if auth is not None and not _authorised(request, state.token):
                    state.count("auth_failed")
                    error = invalid_token()
                    if not graph:
                        error.status = 401
                    raise error
                day_wait = state.daily_quota_wait(family, now)
                if day_wait is not None:
                    state.count("daily_quota_refused")
                    raise ApiError(
                        429,
                        "Application request limit reached: the daily tile quota is spent",
                        4,
                        transient=True,
                        headers={"Retry-After": str(max(1, math.ceil(day_wait)))},
                    )
                wait = state.admit(family, now)
                if wait is not None:
                    state.count("rate_limited")
                    raise ApiError(
                        state.rate_limit_status,
                        "Application request limit reached",
                        4,
                        transient=True,
                        headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )
                response = await handler(request, state, now)
            except ApiError as error:
                response = error_response(error, state.trace_id())
        if graph:
            response.headers["x-app-usage"] = (
                f'{{"call_count": {state.usage_percent(family, time.time())}, '
                f'"total_cputime": 0, "total_time": 0}}'
            )
        return response

    return wrapped


def _authorised(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "oauth" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        )
    supplied = request.query.get("access_token")
    return supplied is not None and hmac.compare_digest(supplied.encode(), token.encode())


def _json(payload: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=payload, content_type="application/json")


async def tile(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    info = request.match_info
    tileset = info["tileset"]
    if tileset not in TILESETS:
        raise ApiError(404, f"Unknown tileset ({tileset})", 100)
    try:
        z, x, y = int(info["z"]), int(info["x"]), int(info["y"])
    except ValueError:
        raise ApiError(404, "Invalid tile coordinates", 100) from None
    if not (0 <= z <= 14 and 0 <= x < 2**z and 0 <= y < 2**z):
        raise ApiError(404, f"Tile {z}/{x}/{y} does not exist", 100)
    data = await state.tiles.get(tileset, z, x, y)
    state.count_tile_fetch(tileset, z, x, y)
    if not data:
        return web.Response(status=204)
    return web.Response(body=data, content_type="application/x-protobuf")


async def entity(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    image_id = request.match_info["image_id"]
    fields, has_urls = state.parse_fields(request.query.get("fields"))
    body = state.entity_json(image_id, fields, has_urls, now)
    if body is None:
        raise unknown_id(image_id)
    return _json(body)


def _split_ids(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


async def batch(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    ids = _split_ids(request.query.get("ids"))
    if not ids:
        raise ApiError(400, "Unsupported get request. Please read the Graph API documentation", 100)
    if len(ids) > MAX_BATCH_IDS:
        raise ApiError(400, f"Too many IDs. Maximum: {MAX_BATCH_IDS}.", 100)
    fields, has_urls = state.parse_fields(request.query.get("fields"))
    # a thumbnail URL lookup, not a metadata request: counted apart for the benchmarks
    if has_urls and all(name == "id" or name in THUMB_FIELDS for name in fields):
        state.count("batch:url_lookup")
    parts = []
    for image_id in dict.fromkeys(ids):
        body = state.entity_json(image_id, fields, has_urls, now)
        if body is None:
            raise unknown_id(image_id)
        parts.append(b'"' + image_id.encode() + b'":' + body)
    return _json(b"{" + b",".join(parts) + b"}")


async def images_by_ids(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    fields, has_urls = state.parse_fields(request.query.get("fields"))
    ids = _split_ids(request.query.get("image_ids"))
    if len(ids) > MAX_BATCH_IDS:
        raise ApiError(400, f"Too many IDs. Maximum: {MAX_BATCH_IDS}.", 100)
    parts = [
        body
        for body in (state.entity_json(i, fields, has_urls, now) for i in dict.fromkeys(ids))
        if body is not None
    ]
    return _json(b'{"data":[' + b",".join(parts) + b"]}")


async def search(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    query = request.query
    fields, has_urls = state.parse_fields(query.get("fields"))
    try:
        west, south, east, north = (float(v) for v in query["bbox"].split(","))
    except (KeyError, ValueError):
        raise ApiError(
            400, "Invalid parameter (bbox): expected minLon,minLat,maxLon,maxLat", 100
        ) from None
    if not (
        west < east
        and south < north
        and -180 <= west
        and east <= 180
        and -85.06 <= south
        and north <= 85.06
    ):
        raise ApiError(400, "Invalid parameter (bbox): expected minLon,minLat,maxLon,maxLat", 100)
    if (east - west) * (north - south) >= MAX_BBOX_AREA:
        raise ApiError(
            400,
            "Invalid parameter (bbox): the bounding box area must be below 0.01 square degrees",
            100,
        )
    try:
        limit = int(query.get("limit", MAX_SEARCH_LIMIT))
    except ValueError:
        raise ApiError(400, "Invalid parameter (limit)", 100) from None
    limit = max(1, min(limit, MAX_SEARCH_LIMIT))
    matches = _bbox_rows(state.world, west, south, east, north)
    total = sum(len(rows) for _, rows in matches)
    if total > state.search_max_matches:
        raise ApiError(
            500,
            "Please reduce the amount of data you're asking for, then retry your request",
            1,
            transient=False,
        )
    keep = _search_filter(query)
    world = state.world
    parts: list[bytes] = []
    for tile, rows in matches:
        for row in rows.tolist():
            if len(parts) >= limit:
                break
            if keep is not None and not keep(world.record(tile, row)):
                continue
            parts.append(state.entity_json(str(int(tile.ids[row])), fields, has_urls, now))
    return _json(b'{"data":[' + b",".join(parts) + b"]}")


def _bbox_rows(world: World, west: float, south: float, east: float, north: float):
    out = []
    for t in mercantile.tiles(west, south, east, north, 14):
        if not world.tile_sequence_count(t.x, t.y):
            continue
        tile = world.tile_images(t.x, t.y)
        inside = (tile.lon >= west) & (tile.lon <= east) & (tile.lat >= south) & (tile.lat <= north)
        rows = np.flatnonzero(inside)
        if len(rows):
            out.append((tile, rows))
    return out


def _search_filter(query) -> Callable[[ImageRecord], bool] | None:
    checks: list[Callable[[ImageRecord], bool]] = []
    for name, op in (("start_captured_at", "ge"), ("end_captured_at", "le")):
        if name in query:
            ms = _iso_ms(query[name], name)
            checks.append(
                (lambda r, ms=ms: r.captured_at >= ms)
                if op == "ge"
                else (lambda r, ms=ms: r.captured_at <= ms)
            )
    if "organization_id" in query:
        orgs = set(_split_ids(query["organization_id"]))
        checks.append(lambda r: r.organization_id is not None and str(r.organization_id) in orgs)
    if "sequence_ids" in query:
        seqs = set(_split_ids(query["sequence_ids"]))
        checks.append(lambda r: r.sequence in seqs)
    if "is_pano" in query:
        want = query["is_pano"].lower() in ("true", "1")
        checks.append(lambda r: r.is_pano == want)
    if "creator_username" in query:
        name = query["creator_username"]
        checks.append(lambda r: r.creator_username == name)
    if not checks:
        return None
    return lambda r: all(check(r) for check in checks)


def _iso_ms(text: str, name: str) -> int:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"Invalid parameter ({name}): expected ISO 8601", 100) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


async def sequence(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    sequence_id = request.query.get("sequence_id", "")
    ids = state.world.sequence_image_ids(sequence_id) if sequence_id else None
    if ids is None:
        raise unknown_id(sequence_id)
    body = json.dumps({"data": [{"id": i} for i in ids]}, separators=(",", ":")).encode()
    return _json(body)


async def thumbnail(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    size = request.match_info["size"]
    name = request.match_info["name"]
    image_id = name[:-4] if name.endswith(".jpg") else name
    query = request.query
    if (
        size not in thumbnails.SIZES
        or decode_image_id(image_id) is None
        or not state.check_signature(
            size, image_id, query.get("stp", ""), query.get("oe", ""), query.get("oh", ""), now
        )
    ):
        return web.Response(status=403, text="URL signature expired")
    record = state.world.image(image_id)
    if record is None:
        return web.Response(status=404, text="Not Found")
    data = thumbnails.thumbnail_bytes(image_id, size, record.blurred)
    faults = state.faults
    damage = thumbnails.jpeg_fault(image_id, faults.corrupt_jpeg_rate, faults.truncated_jpeg_rate)
    if damage is not None:
        data = thumbnails.damage(data, image_id, damage)
    return web.Response(body=data, content_type="image/jpeg")
