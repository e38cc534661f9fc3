"""The world's region presets: where images are (``geography.py`` for Zurich, ``switzerland.py`` for the
country) and what a sequence does when its walk reaches a place that holds no image.

``zurich`` (the default) is the city world the tests and benchmarks were built on: a walk that reaches
the lake ends there. ``switzerland`` (~41,000 km2, >= 10 M images at scale 1.0): a walk that reaches a
lake or a high-mountain zone turns back along its own track, so every sequence keeps the length drawn
for it and a tile's image count is known without generating the tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import geography, switzerland


@dataclass(frozen=True)
class Region:
    name: str
    # {(x, y): mean images at scale 1.0}, {(x, y): DENSITY_GRID**2 cell weights} for every tile that can hold images
    expected_images_by_tile: Callable[[], tuple[dict, dict]]
    # (west, south, east, north) of the z14 tile, and whether it touches a place without images
    tile_geometry: Callable[[int, int], tuple[tuple[float, float, float, float], bool]]
    in_void: Callable[[np.ndarray, np.ndarray], np.ndarray]
    point_in_void: Callable[[float, float], bool]
    # True: a walk reaching the void turns back (sequence lengths, hence tile counts, are exact)
    turns_back: bool
    # the AOI file covering the region (in mapillary_assets/data)
    aoi_file: str


REGIONS = {
    "zurich": Region(
        "zurich",
        geography.expected_images_by_tile,
        geography.tile_geometry,
        geography.in_lake,
        geography.point_in_lake,
        turns_back=False,
        aoi_file="zurich.geojson",
    ),
    "switzerland": Region(
        "switzerland",
        switzerland.expected_images_by_tile,
        switzerland.tile_geometry,
        switzerland.in_void,
        switzerland.point_in_void,
        turns_back=True,
        aoi_file="switzerland.geojson",
    ),
}


def region(name: str) -> Region:
    try:
        return REGIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown region {name!r}: choose one of {', '.join(sorted(REGIONS))}"
        ) from None
