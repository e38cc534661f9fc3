"""What discovering and processing an area will cost, from its coverage tiles alone.

`plan_area` runs the tile route's coverage descent (`discovery.tiles.covered_z14_tiles`) over every
partition of the AOI, through the same client, rate limiter and tile cache as discovery: it spends
coverage-tile requests only (and discovery within the cache age reuses them). From what it finds:

* tile requests needed = coverage tiles read + non-empty z14 tiles (exactly discovery's requests
  from a cold cache), and the days they take at MAPILLARY_TILES_PER_DAY (default 50,000);
* images = coverage lines in those z14 tiles x IMAGES_PER_COVERAGE_LINE. Mapillary's `sequence`
  layer holds one line per sequence (piece), and so does the emulator's, so the count of lines
  follows the image count at any density; the factor is the emulator's images per sequence (103.0
  on the Switzerland world at scale 1.0: 10,946,055 images in 106,223 sequences; 103-117 over the
  Zurich world at scale 0.005, seeds 1-12), calibrated there: Mapillary's own mean sequence length
  in an area may differ, and the estimate scales with it;
* metadata requests = ceil(images / 50), and their time at the entity budget;
* thumbnail bytes and disk at 256 px and 1024 px (disk rounds each file up to a 4 KiB block);
* blur time at this machine's measured rate (the latest `blur` figure in benchmarks/RESULTS.json,
  else a small sample scored here).
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapillary_assets.api.client_config import ClientConfig
from mapillary_assets.pipeline.aoi import AreaOfInterest, partition_tiles, tile_key
from mapillary_assets.pipeline.concurrency import run_all
from mapillary_assets.pipeline.discovery.results import DEFAULT_TILESET, DiscoveryStats
from mapillary_assets.pipeline.discovery.tile_cache import TileCache
from mapillary_assets.pipeline.discovery.tiles import DEFAULT_CACHE_MAX_AGE_S, covered_z14_tiles
from mapillary_assets.storage import DataLayout

IMAGES_PER_COVERAGE_LINE = 103.0
IDS_PER_METADATA_REQUEST = 50
# mean thumbnail sizes: 1024 px as the emulator's and Mapillary's CDN JPEGs (~240 KB, bench_download);
# 256 px about a tenth of that (a sixteenth of the pixels, compressing less well)
THUMBNAIL_BYTES = {256: 24_000, 1024: 240_000}
DISK_BLOCK = 4096
RESULTS_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.json"


@dataclass
class AreaPlan:
    partitions: int
    coverage_tiles: int  # coverage tiles the descent reads (from the cache or requested)
    coverage_requests: int  # of which this plan requested
    nonempty_z14_tiles: int
    coverage_lines: int
    entity_per_minute: int
    tiles_per_day: int
    blur_images_per_s: float
    estimated_images_by_partition: dict[str, int] = field(default_factory=dict)

    @property
    def tile_requests(self) -> int:
        return self.coverage_tiles + self.nonempty_z14_tiles

    @property
    def quota_days(self) -> float:
        return self.tile_requests / self.tiles_per_day

    @property
    def estimated_images(self) -> int:
        return round(self.coverage_lines * IMAGES_PER_COVERAGE_LINE)

    @property
    def metadata_requests(self) -> int:
        return math.ceil(self.estimated_images / IDS_PER_METADATA_REQUEST)

    @property
    def metadata_minutes(self) -> float:
        return self.metadata_requests / self.entity_per_minute

    def thumbnail_bytes(self, size: int) -> int:
        return self.estimated_images * THUMBNAIL_BYTES[size]

    def thumbnail_disk(self, size: int) -> int:
        return self.estimated_images * math.ceil(THUMBNAIL_BYTES[size] / DISK_BLOCK) * DISK_BLOCK

    @property
    def blur_hours(self) -> float:
        return self.estimated_images / self.blur_images_per_s / 3600

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("partitions", f"{self.partitions:,}"),
            ("non-empty z14 tiles", f"{self.nonempty_z14_tiles:,}"),
            (
                "tile requests needed",
                f"{self.tile_requests:,} ({self.coverage_tiles:,} coverage + "
                f"{self.nonempty_z14_tiles:,} z14)",
            ),
            (
                "days at the tile quota",
                f"{self.quota_days:.2f} (at {self.tiles_per_day:,}/day)",
            ),
            ("estimated images", f"{self.estimated_images:,}"),
            (
                "metadata requests",
                f"{self.metadata_requests:,} ({self.metadata_minutes:.1f} min at "
                f"{self.entity_per_minute:,}/min)",
            ),
        ]
        for size in sorted(THUMBNAIL_BYTES):
            rows.append(
                (
                    f"thumbnails {size} px",
                    f"{_gb(self.thumbnail_bytes(size))} ({_gb(self.thumbnail_disk(size))} on disk)",
                )
            )
        rows.append(
            (
                "blur time",
                f"{self.blur_hours * 60:,.1f} min at {self.blur_images_per_s:.0f} images/s",
            )
        )
        rows.append(("coverage requests spent by this plan", f"{self.coverage_requests:,}"))
        return rows

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows())
        return "\n".join(f"{name:<{width}}  {value}" for name, value in self.rows())

    def markdown(self) -> str:
        """The table as Markdown (the `area_plan` asset's metadata)."""
        lines = ["| | |", "|---|---|"]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in self.rows()])


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


async def plan_area(
    client,
    aoi: AreaOfInterest,
    layout: DataLayout,
    partition_zoom: int,
    tileset: str = DEFAULT_TILESET,
    cache_max_age_s: float = DEFAULT_CACHE_MAX_AGE_S,
    concurrency: int = 16,
    blur_images_per_s: float | None = None,
    tiles_per_day: int = ClientConfig.tiles_per_day,
    entity_per_minute: int = ClientConfig.entity_per_minute,
) -> AreaPlan:
    """The plan of `aoi` partitioned at `partition_zoom`, from coverage tiles only, priced at the
    daily tile quota and the entity budget (the client's settings; the documented defaults)."""
    stats = DiscoveryStats()
    cache = TileCache(client, layout, tileset, cache_max_age_s, stats)
    partitions = partition_tiles(aoi, partition_zoom)
    limit = asyncio.Semaphore(max(1, concurrency))
    found: dict[str, tuple[int, int]] = {}

    async def descend(partition) -> None:
        async with limit:
            coverage = await covered_z14_tiles(cache, aoi.geometry, partition, concurrency)
        found[tile_key(partition)] = (len(coverage.z14_tiles), coverage.coverage_lines)

    await run_all(descend(p) for p in partitions)
    return AreaPlan(
        partitions=len(partitions),
        coverage_tiles=stats.coverage_requests + stats.cache_hits,
        coverage_requests=stats.coverage_requests,
        nonempty_z14_tiles=sum(tiles for tiles, _ in found.values()),
        coverage_lines=sum(lines for _, lines in found.values()),
        entity_per_minute=entity_per_minute,
        tiles_per_day=tiles_per_day,
        blur_images_per_s=blur_images_per_s or measured_blur_rate(),
        estimated_images_by_partition={
            key: round(lines * IMAGES_PER_COVERAGE_LINE)
            for key, (_, lines) in sorted(found.items())
        },
    )


def measured_blur_rate(results_path: Path = RESULTS_PATH) -> float:
    """Images/s of the blur stage on all cores: the latest benchmark figure, else a small sample."""
    try:
        figures = json.loads(results_path.read_text())["figures"]
    except (OSError, ValueError, KeyError, TypeError):
        figures = []
    for figure in reversed(figures):
        if figure.get("benchmark") == "blur" and str(figure.get("metric", "")).startswith(
            "images/s all cores"
        ):
            value = figure.get("value")
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
    return _sample_blur_rate()


def _sample_blur_rate(images: int = 16) -> float:
    import cv2

    from mapillary_assets.pipeline.blur import score_images

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(images):
            path = Path(folder) / f"{i}.jpg"
            cv2.imwrite(str(path), rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
            paths.append(path)
        started = time.perf_counter()
        score_images(paths, backend="opencv")
        return images / max(time.perf_counter() - started, 1e-6)
