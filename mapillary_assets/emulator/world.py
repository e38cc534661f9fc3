"""A deterministic synthetic Mapillary world (around Zurich, or Switzerland with ``region="switzerland"``,
see ``regions.py``), generated lazily per z14 tile.

Everything is a pure function of ``(seed, tile x, tile y, epoch)`` (see ``generation.py``): a tile's
images are regenerated on demand and kept in a small LRU, so a world of millions of images never
lives in memory at once. Ids carry their tile (see ``ids.py``), so any lookup regenerates a single
tile. ``advance()`` moves the world to the next epoch: new sequences appear, existing ids never change.

Ground truth without building the world: ``tile_image_count`` (from the density model and the drawn
sequence lengths, no image generated, in a region that turns back at the void) and
``image_ids_in_polygon`` (generates only the tiles the polygon touches).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import mercantile
import numpy as np
import shapely
from shapely.geometry import box
from shapely.prepared import prep

from .generation import CAMERAS, TileGenerator
from .geography import ZOOM
from .ids import decode_image_id, decode_sequence_id, unit_hash
from .records import ImageRecord, SequenceInfo, SequenceLines, TileImages
from .regions import region as region_preset


class World:
    """The synthetic world. Thread-safe: the emulator serves it from another thread."""

    def __init__(
        self,
        seed: int = 42,
        scale: float = 0.005,
        epoch: int = 0,
        blurred_fraction: float = 0.1,
        region: str = "zurich",
    ):
        if scale < 0:
            raise ValueError("scale must be >= 0")
        if not 0.0 <= blurred_fraction <= 1.0:
            raise ValueError("blurred_fraction must be within [0, 1]")
        self.seed = int(seed)
        self.scale = float(scale)
        self.epoch = int(epoch)
        self.blurred_fraction = float(blurred_fraction)
        self.region = region_preset(region)
        self._generator = TileGenerator(
            self.seed, self.scale, self.blurred_fraction, region=self.region
        )
        self._lock = threading.RLock()
        self._tiles: OrderedDict[tuple[int, int, int], TileImages] = OrderedDict()
        self._cached_images = 0
        self.max_cached_images = 2_000_000
        self._summaries: dict[tuple[int, int], dict] = {}
        self._lines: dict[tuple[int, int, int], SequenceLines] = {}
        self._nonempty: dict[int, list[tuple[int, int]]] = {}

    def __repr__(self) -> str:
        region = "" if self.region.name == "zurich" else f", region={self.region.name!r}"
        return f"World(seed={self.seed}, scale={self.scale}, epoch={self.epoch}{region})"

    # -- public API ---------------------------------------------------------------------------

    def advance(self) -> int:
        """New sequences appear (in some tiles); returns the new epoch."""
        with self._lock:
            self.epoch += 1
            return self.epoch

    def images_in_z14_tile(self, x: int, y: int) -> list[ImageRecord]:
        tile = self.tile_images(x, y)
        return [self.record(tile, row) for row in range(len(tile))]

    def image(self, image_id: str) -> ImageRecord | None:
        row = self._locate(image_id)
        return None if row is None else self.record(*row)

    def sequence_image_ids(self, sequence_id: str) -> list[str] | None:
        decoded = decode_sequence_id(self.seed, sequence_id)
        if decoded is None:
            return None
        x, y, index = decoded
        tile = self.tile_images(x, y)
        if index >= len(tile.sequences):
            return None
        seq = tile.sequences[index]
        return [str(v) for v in tile.ids[seq.offset : seq.offset + seq.length].tolist()]

    def nonempty_z14_tiles(self, polygon) -> list[tuple[int, int]]:
        """z14 tiles that intersect ``polygon`` and hold at least one image (anywhere in the tile)."""
        prepared = prep(polygon)
        west, south, east, north = polygon.bounds
        first, last = mercantile.tile(west, north, ZOOM), mercantile.tile(east, south, ZOOM)
        return [
            (x, y)
            for x, y in self.nonempty_tiles()
            if first.x <= x <= last.x
            and first.y <= y <= last.y
            and prepared.intersects(box(*mercantile.bounds(x, y, ZOOM)))
        ]

    def images_in_polygon(self, polygon) -> list[ImageRecord]:
        out = []
        for tile, rows in self._rows_in_polygon(polygon):
            out.extend(self.record(tile, int(r)) for r in rows)
        return out

    def image_ids_in_polygon(self, polygon) -> list[str]:
        """Ids of the images in ``polygon`` (ground truth), generating only the tiles it touches."""
        return [
            str(v) for tile, rows in self._rows_in_polygon(polygon) for v in tile.ids[rows].tolist()
        ]

    def count_in_polygon(self, polygon) -> int:
        """Number of images in ``polygon`` without building records (cheap ground truth at scale 1.0)."""
        return sum(len(rows) for _, rows in self._rows_in_polygon(polygon))

    def is_blurred(self, image_id: str) -> bool:
        try:
            value = int(image_id)
        except (TypeError, ValueError):
            return False
        return unit_hash(value, self.seed * 1_000_003 + 17) < self.blurred_fraction

    # -- cheap structure (no image generation) --------------------------------------------------

    def expected_images(self, x: int, y: int, epoch: int = 0) -> float:
        """Mean number of images the tile receives in ``epoch`` (the base world for 0)."""
        return self._generator.expected_images(x, y, epoch)

    def candidate_tiles(self) -> list[tuple[int, int]]:
        """Every z14 tile that can hold images at any epoch."""
        return sorted(k for k, v in self._generator.expected_table().items() if v > 0)

    def tile_sequence_count(self, x: int, y: int, epoch: int | None = None) -> int:
        """Sequences of the tile at ``epoch`` (default: the world's), computed without generating
        images: nonzero exactly when the tile holds images."""
        epoch = self.epoch if epoch is None else epoch
        return sum(len(self._generator.sequence_lengths(x, y, e)) for e in range(epoch + 1))

    def nonempty_tiles(self, epoch: int | None = None) -> list[tuple[int, int]]:
        epoch = self.epoch if epoch is None else epoch
        tiles = self._nonempty.get(epoch)
        if tiles is None:
            tiles = [t for t in self.candidate_tiles() if self.tile_sequence_count(*t, epoch=epoch)]
            self._nonempty[epoch] = tiles
        return tiles

    def tile_image_count(self, x: int, y: int) -> int:
        """Images of the tile at the world's epoch: from the sequence lengths alone where the region
        turns back at the void (every tile of ``switzerland``), else by generating the tile."""
        count = self._generator.image_count(x, y, self.epoch)
        return len(self.tile_images(x, y)) if count is None else count

    def image_count(self) -> int:
        """Images in the whole world (the sum of ``tile_image_count`` over the non-empty tiles)."""
        return sum(self.tile_image_count(x, y) for x, y in self.nonempty_tiles())

    def tile_images(self, x: int, y: int) -> TileImages:
        key = (x, y, self.epoch)
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = self._generator.tile(x, y, key[2])
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._cached_images += len(tile)
                while self._cached_images > self.max_cached_images and len(self._tiles) > 1:
                    _, dropped = self._tiles.popitem(last=False)
                    self._cached_images -= len(dropped)
            return self._tiles[key]

    def record(self, tile: TileImages, row: int) -> ImageRecord:
        """The record of one row of ``tile_images(x, y)``."""
        seq = tile.sequences[int(tile.sequence_row[row])]
        make, model, camera_type, is_pano, width, height, _ = CAMERAS[seq.camera]
        username, creator_id = self._generator.creators[seq.creator]
        clon = float(tile.computed_lon[row])
        image_id = int(tile.ids[row])
        mesh = sfm = None
        if seq.mesh_base is not None:
            mesh_id = str(seq.mesh_base + int(tile.image_index[row]))
            mesh = {"id": mesh_id, "url": f"https://mly-emulator.invalid/mesh/{mesh_id}"}
        if seq.sfm_cluster_id is not None:
            sfm = {
                "id": str(seq.sfm_cluster_id),
                "url": f"https://mly-emulator.invalid/sfm/{seq.sfm_cluster_id}",
            }
        rot = tile.rotation[row]
        return ImageRecord(
            id=str(image_id),
            sequence=seq.id,
            captured_at=int(tile.captured_at[row]),
            geometry=(float(tile.lon[row]), float(tile.lat[row])),
            computed_geometry=None if math.isnan(clon) else (clon, float(tile.computed_lat[row])),
            compass_angle=float(tile.compass[row]),
            computed_compass_angle=float(tile.computed_compass[row]),
            altitude=float(tile.altitude[row]),
            computed_altitude=float(tile.computed_altitude[row]),
            creator_username=username,
            creator_id=creator_id,
            organization_id=seq.organization_id,
            camera_type=camera_type,
            make=make,
            model=model,
            width=width,
            height=height,
            is_pano=is_pano,
            quality_score=float(tile.quality[row]),
            exif_orientation=seq.exif_orientation,
            computed_rotation=(float(rot[0]), float(rot[1]), float(rot[2])),
            atomic_scale=seq.atomic_scale,
            merge_cc=seq.merge_cc,
            camera_parameters=seq.camera_parameters,
            mesh=mesh,
            sfm_cluster=sfm,
            tile=(tile.x, tile.y),
            epoch=seq.epoch,
            blurred=bool(tile.blurred[row]),
        )

    def tile_summary(self, x: int, y: int) -> dict | None:
        """The tile's first sequence (generated alone; cheap): the low-zoom tile layers show it."""
        key = (x, y)
        summary = self._summaries.get(key)
        if summary is not None:
            return summary
        summary = self._generator.first_sequence_summary(x, y, self.epoch)
        if summary is not None:
            self._summaries[key] = summary
        return summary

    def tile_lines(self, x: int, y: int) -> SequenceLines:
        """The tile's coverage lines (one per sequence; the z6-13 `sequence` layers show them),
        kept once computed: ~130 bytes a sequence (its id string the most), ~14 MB for the country
        world at scale 1.0."""
        key = (x, y, self.epoch)
        lines = self._lines.get(key)
        if lines is None:
            lines = self._lines[key] = self._generator.sequence_lines(x, y, self.epoch)
        return lines

    # -- internals --------------------------------------------------------------------------------

    def _locate(self, image_id) -> tuple[TileImages, int] | None:
        decoded = decode_image_id(image_id)
        if decoded is None:
            return None
        x, y, seq_index, image_index = decoded
        if (x, y) not in self._generator.expected_table() or not self.tile_sequence_count(x, y):
            return None
        tile = self.tile_images(x, y)
        if seq_index >= len(tile.sequences):
            return None
        seq = tile.sequences[seq_index]
        if image_index >= seq.length:
            return None
        return tile, seq.offset + image_index

    def _rows_in_polygon(self, polygon):
        for x, y in self.nonempty_z14_tiles(polygon):
            tile = self.tile_images(x, y)
            inside = shapely.contains_xy(polygon, tile.lon, tile.lat)
            rows = np.flatnonzero(inside)
            if len(rows):
                yield tile, rows

    # sequence metadata for the vector tiles
    def camera(self, seq: SequenceInfo) -> tuple:
        return CAMERAS[seq.camera]

    def creator_of(self, seq: SequenceInfo) -> tuple[str, int]:
        return self._generator.creators[seq.creator]
