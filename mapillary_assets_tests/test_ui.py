"""The lineage and a partitions page, as a person sees them: the real webserver on 127.0.0.1 driven by
Debian's Chromium through Playwright (which never downloads a browser of its own here). Screenshots are
kept under test-artifacts/ui/ (git-ignored)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest
import requests

from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME, tile_partitions
from mapillary_assets.emulator import EmulatorServer, World
from mapillary_assets.net import free_port
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets_tests.support.dagster_server import dagster_server
from mapillary_assets_tests.support.emulated_runs import emulator_resources
from mapillary_assets_tests.support.world import REPO_ROOT, TEST_SCALE, TEST_TOKEN

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
ASSETS = [
    "discovered_images",
    "image_chunks",
    "image_metadata",
    "thumbnail_downloads",
    "blur_scores",
    "filter_areas",
    "staging_tables",
    "mapillary_geopackage",
]
GROUPS = ["discovery", "metadata", "images", "filters", "staging", "publish"]
# Wide enough for the graph to fit at a zoom where nodes show full names (zoomed out, they are abbreviated).
VIEWPORT = {"width": 3200, "height": 1600}
LOAD_TIMEOUT_MS = 120_000  # a shared, busy machine


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """The webserver alone (no daemon: nothing is launched from the UI here), with the whole pipeline
    materialised in its instance (discovery as one ranged run) so the asset pages have something to show."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is not installed (apt-get install chromium): the browser test needs it"
        )
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    root = tmp_path_factory.mktemp("ui")
    with (
        EmulatorServer(World(seed=7, scale=TEST_SCALE), token=TEST_TOKEN) as emulator,
        dagster_server(root / "home", daemon=False) as server,
    ):
        defs = build_definitions(emulator_resources(emulator, root / "data"))
        with server.open_instance() as instance:
            run_pipeline(instance, defs, log=lambda *_: None)
        yield server


@pytest.fixture(scope="module")
def browser(webserver):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    yield page
    context.close()


def open_page(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first-visit "join the community" dialog
    try:
        skip.click(timeout=5_000)
    except Exception:  # noqa: BLE001 - not shown (already dismissed in this instance)
        pass


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_global_lineage_shows_every_asset_in_its_group(webserver, page):
    open_page(page, f"{webserver.url}/asset-groups")
    assert "Global asset lineage" in page.title()
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for()
    page.keyboard.press("Alt+KeyE")  # "Expand all groups" (graph settings menu, shortcut ⌥E)
    for asset in ASSETS:
        node = page.get_by_text(asset, exact=True)
        node.first.wait_for()
        assert node.first.is_visible(), asset
    path = screenshot(page, "global-asset-lineage")
    assert path.stat().st_size > 20_000


def test_partitions_page_of_discovered_images_shows_every_tile_materialised(webserver, page):
    page.set_viewport_size({"width": 1600, "height": 1000})
    open_page(page, f"{webserver.url}/assets/discovered_images?view=partitions")
    keys = tile_partitions().get_partition_keys()
    page.get_by_text(f"Materialized ({len(keys)})").wait_for()
    for key in keys:
        assert page.get_by_text(key, exact=True).first.is_visible(), key
    page.get_by_text(
        keys[0], exact=True
    ).first.click()  # the partition's latest materialisation ...
    page.get_by_text("View all historical events (1)").wait_for()
    for metadata in ("images", "tile_requests", "tileset"):  # ... with what the asset reported
        page.get_by_text(metadata, exact=True).first.wait_for()
    screenshot(page, "discovered-images-partitions")


def test_asset_pages_show_the_pictures(webserver, page):
    """Each picture (a PNG data URI in Markdown metadata) is an <img> the browser decoded, on the page of
    the materialisation that recorded it. Dagster shows long Markdown behind "[Show Markdown]", in a dialog."""
    page.set_viewport_size({"width": 1600, "height": 1400})
    with webserver.open_instance() as instance:
        chunk = instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)[0]
    pages = {
        "discovered_images": (
            tile_partitions().get_partition_keys()[0],
            {"tile_map": "partition tiles by image count"},
        ),
        "blur_scores": (
            chunk,
            {"histogram": "blur_value histogram", "contact_sheet": "blurriest and sharpest"},
        ),
        "mapillary_geopackage": (None, {"map": "published images and sequences"}),
    }
    for asset, (partition, pictures) in pages.items():
        query = f"view=partitions&partition={partition}" if partition else "view=events"
        open_page(page, f"{webserver.url}/assets/{asset}?{query}")
        for name, alt in pictures.items():
            row = page.locator("tr", has=page.get_by_text(name, exact=True))
            row.get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog")
            image = dialog.locator(f'img[alt="{alt}"]')
            image.wait_for()
            assert image.get_attribute("src").startswith("data:image/png;base64,"), alt
            width = page.wait_for_function(
                "i => i.complete && i.naturalWidth", arg=image.element_handle()
            )
            assert width.json_value() >= 200, alt
            screenshot(page, f"picture-{asset}-{name}")
            dialog.get_by_role("button", name="Close").click()
            dialog.wait_for(state="hidden")


SCHEDULE_DRY_RUN = """
mutation DryRun($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick { evaluationResult {
      skipReason error { message } runRequests { runKey runConfigYaml tags { key value } } } }
    ... on Error { message }
  }
}"""
SENSOR_DRY_RUN = """
mutation DryRun($selector: SensorSelector!, $cursor: String) {
  sensorDryRun(selectorData: $selector, cursor: $cursor) {
    __typename
    ... on DryRunInstigationTick { evaluationResult { skipReason error { message } runRequests { runKey } } }
    ... on Error { message }
  }
}"""
AUTOMATION_STATES = """
query States($schedule: ScheduleSelector!, $sensor: SensorSelector!) {
  scheduleOrError(scheduleSelector: $schedule) { ... on Schedule { scheduleState { status } } }
  sensorOrError(sensorSelector: $sensor) { ... on Sensor { sensorState { status } } }
}"""


def test_mapillary_assets_ui_serves_the_pipeline_with_its_pools_and_automation(tmp_path):
    """`mapillary-assets ui`: emulator + `dagster dev` on 127.0.0.1, pools set, schedule and sensor on and
    evaluating in the real code server, and a clean stop."""
    emulator_port = free_port()

    def ui_command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mapillary_assets.cli",
            "ui",
            "--port",
            str(port),
            "--emulator-port",
            str(emulator_port),
            "--data-dir",
            str(tmp_path / "data"),
            "--scale",
            "0.001",
        ]

    with dagster_server(tmp_path / "home", command=ui_command) as server:
        assert server.url.startswith("http://127.0.0.1:")
        stats = requests.get(f"http://127.0.0.1:{emulator_port}/_emulator/stats", timeout=10)
        assert stats.status_code == 200 and "requests" in stats.json()
        with server.open_instance() as instance:
            assert instance.event_log_storage.get_concurrency_info("mapillary_api").limit == 4

        schedule = {**server.repository_selector, "scheduleName": "refresh_schedule"}
        sensor = {**server.repository_selector, "sensorName": "new_images_sensor"}
        states = server.graphql(AUTOMATION_STATES, {"schedule": schedule, "sensor": sensor})
        assert states["scheduleOrError"]["scheduleState"]["status"] == "RUNNING"
        assert states["sensorOrError"]["sensorState"]["status"] == "RUNNING"

        monday = dt.datetime(2026, 11, 23, 3, tzinfo=dt.UTC).timestamp()
        tick = server.graphql(SCHEDULE_DRY_RUN, {"selector": schedule, "timestamp": monday})[
            "scheduleDryRun"
        ]
        evaluation = tick["evaluationResult"]
        assert evaluation["error"] is None, evaluation["error"]
        assert [r["runKey"] for r in evaluation["runRequests"]] == [
            f"refresh-20261123T0300:{keys[0]}..{keys[-1]}"
            for keys in [tile_partitions().get_partition_keys()]
        ]
        assert "tile_cache_max_age_hours: 24.0" in evaluation["runRequests"][0]["runConfigYaml"]

        tick = server.graphql(SENSOR_DRY_RUN, {"selector": sensor, "cursor": None})["sensorDryRun"]
        assert tick["evaluationResult"]["error"] is None, tick["evaluationResult"]["error"]
        assert tick["evaluationResult"]["skipReason"].startswith("nothing new")

        # SIGTERM to `mapillary-assets ui` stops dagster dev and everything it started, then the emulator.
        assert server.stop(), (
            f"processes were left behind and had to be killed\n{server.log_tail()}"
        )
