"""Generating a z14 tile's sequences and images, a pure function of ``(seed, tile x, tile y, epoch)``
with ``numpy.random.default_rng``; how many images a tile gets and where they cluster comes from
``geography.py``.

Simplifications (documented on purpose):

* Every sequence is generated inside one z14 tile and stays there (its street-like random walk is
  folded back at the tile border), so each image lies in exactly one z14 tile of ``mly1_public``.
  Real sequences cross tile borders.
* Images never lie in the region's void (Zurich's lake; Switzerland's lakes and high mountains): in
  Zurich a walk that reaches the shore ends there; in a region that ``turns_back`` it walks back along
  its own track, so every sequence keeps its drawn length and ``image_count`` needs no generation.
* ``computed_geometry`` is a few metres off ``geometry``; it may cross into a neighbouring z14 tile.

Epochs: the base world is epoch 0; a later epoch adds a smaller, independent random stream of
sequences per ``(tile, epoch)``. A tile at epoch ``k`` holds the sequences of epochs ``0..k``, and
sequence indices grow across epochs, so ids never change once issued.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .geography import DENSITY_GRID, KM_PER_DEG_LAT, tile_lat, tile_lon
from .ids import MAX_SEQUENCES_PER_TILE, encode_sequence_id, image_id_ints, unit_hash
from .records import SequenceInfo, SequenceLines, TileImages
from .regions import REGIONS, Region

MAX_SEQUENCE_LENGTH = 300
MIN_SEQUENCE_LENGTH = 20
_EPOCH_GROWTH = 0.05  # a later epoch adds ~5% of a tile's base images (Poisson)
_MEAN_SEQUENCE_LENGTH = (MAX_SEQUENCE_LENGTH - MIN_SEQUENCE_LENGTH) / math.log(
    MAX_SEQUENCE_LENGTH / MIN_SEQUENCE_LENGTH
)

_EPOCH0_START_MS = 1_388_534_400_000  # 2014-01-01
_EPOCH0_END_MS = 1_735_689_600_000  # 2025-01-01
_EPOCH_SPAN_MS = 7 * 86_400_000  # sequences of epoch k are captured in week k after that

# make, model, camera_type, is_pano, width, height, weight
CAMERAS = (
    ("Apple", "iPhone 12", "perspective", False, 4032, 3024, 20),
    ("Samsung", "SM-G991B", "perspective", False, 4000, 3000, 16),
    ("Google", "Pixel 6", "perspective", False, 4080, 3060, 8),
    ("GoPro", "HERO9 Black", "fisheye", False, 4000, 3000, 12),
    ("GoPro", "MAX", "equirectangular", True, 5760, 4320, 10),
    ("Insta360", "ONE X2", "spherical", True, 6080, 4560, 8),
    ("Ricoh", "RICOH THETA Z1", "equirectangular", True, 6720, 5040, 4),
    ("Garmin", "VIRB 360", "spherical", True, 5640, 4230, 3),
    ("Xiaomi", "Redmi Note 8", "perspective", False, 2048, 1536, 8),
    ("Sony", "DSC-RX100M5", "brown", False, 5472, 4104, 1),
)
_CAMERA_P = np.array([c[6] for c in CAMERAS], dtype=float) / sum(c[6] for c in CAMERAS)
_N_CREATORS = 400
_N_ORGANIZATIONS = 12
_SYLLABLES = tuple("ka ri mo zu le na to shi ber al vin dor es pa lu".split())


class TileGenerator:
    """Generates tiles on demand and remembers only the cheap structure (expected image counts,
    sequence lengths). Thread-safe."""

    def __init__(
        self, seed: int, scale: float, blurred_fraction: float, region: Region = REGIONS["zurich"]
    ):
        self.seed, self.scale, self.blurred_fraction = seed, scale, blurred_fraction
        self.region = region
        self._lock = threading.Lock()
        self.creators = _make_creators(seed)  # (username, id) per creator index
        self._organizations = [
            10_000_000_000_000 + 7919 * k * k + 31 * k for k in range(1, _N_ORGANIZATIONS + 1)
        ]
        self._expected: dict[tuple[int, int], float] | None = None
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        self._lengths: dict[tuple[int, int, int], tuple[int, ...]] = {}

    def expected_table(self) -> dict[tuple[int, int], float]:
        """Mean base images (scale 1.0) of every tile that can hold images."""
        if self._expected is None:
            with self._lock:
                if self._expected is None:
                    table, self._weights = self.region.expected_images_by_tile()
                    self._expected = table
        return self._expected

    def expected_images(self, x: int, y: int, epoch: int = 0) -> float:
        """Mean number of images the tile receives in ``epoch`` (the base world for 0)."""
        base = self.expected_table().get((x, y), 0.0) * self.scale
        return base if epoch == 0 else base * _EPOCH_GROWTH

    def sequence_lengths(self, x: int, y: int, epoch: int) -> tuple[int, ...]:
        """Lengths of the sequences the tile gains in ``epoch`` (no images generated)."""
        key = (x, y, epoch)
        lengths = self._lengths.get(key)
        if lengths is None:
            lam = self.expected_images(x, y, epoch)
            if lam <= 0:
                lengths = ()
            else:
                rng = np.random.default_rng([self.seed, x, y, epoch, 0])
                n = int(rng.poisson(lam / _MEAN_SEQUENCE_LENGTH))
                u = rng.random(n)
                raw = MIN_SEQUENCE_LENGTH * (MAX_SEQUENCE_LENGTH / MIN_SEQUENCE_LENGTH) ** u
                lengths = tuple(int(v) for v in raw)
            self._lengths[key] = lengths
        return lengths

    def image_count(self, x: int, y: int, epoch: int) -> int | None:
        """Images of the tile at ``epoch`` from its sequence lengths alone (what ``tile`` yields), or
        None where a walk may end early at the shore (a region that does not turn back)."""
        if not self.region.turns_back and self.expected_table().get((x, y), 0.0) > 0:
            if self.region.tile_geometry(x, y)[1]:
                return None
        lengths = [n for e in range(epoch + 1) for n in self.sequence_lengths(x, y, e)]
        return sum(lengths[:MAX_SEQUENCES_PER_TILE])

    def tile(self, x: int, y: int, epoch: int) -> TileImages:
        """Every image of the tile at ``epoch``."""
        bounds, touches_void = self.region.tile_geometry(x, y)
        sequences: list[SequenceInfo] = []
        parts: list[dict[str, np.ndarray]] = []
        offset = 0
        for info, cols in self._sequences(x, y, epoch, bounds, touches_void):
            info.offset = offset
            offset += info.length
            sequences.append(info)
            parts.append(cols)
        if not parts:
            return TileImages.empty(x, y, epoch)
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        columns["ids"] = image_id_ints(x, y, columns["sequence_row"], columns["image_index"])
        salt = self.seed * 1_000_003 + 17
        columns["blurred"] = np.array(
            [unit_hash(int(v), salt) < self.blurred_fraction for v in columns["ids"].tolist()],
            dtype=bool,
        )
        return TileImages(x, y, epoch, sequences, columns)

    def first_sequence_summary(self, x: int, y: int, epoch: int) -> dict | None:
        """The tile's first sequence (generated alone; cheap), or None for an empty tile."""
        for e in range(epoch + 1):
            lengths = self.sequence_lengths(x, y, e)
            if lengths:
                break
        else:
            return None
        rng = np.random.default_rng([self.seed, x, y, e, 1])
        info, cols = self._sequence(rng, x, y, e, 0, lengths[0], *self.region.tile_geometry(x, y))
        return _summary(info, cols, x, y)

    def sequence_lines(self, x: int, y: int, epoch: int) -> SequenceLines:
        """One coverage line per sequence of the tile at ``epoch`` (each sequence generated alone,
        no image ids or blur flags: the cost of a tile's sequences, not of its images)."""
        bounds, touches_void = self.region.tile_geometry(x, y)
        return SequenceLines.from_summaries(
            [
                _summary(info, cols, x, y)
                for info, cols in self._sequences(x, y, epoch, bounds, touches_void)
            ]
        )

    def _sequences(self, x: int, y: int, epoch: int, bounds, touches_void: bool):
        """(info, columns) of every sequence of the tile at ``epoch``, in index order."""
        index = 0
        for e in range(epoch + 1):
            for local, length in enumerate(self.sequence_lengths(x, y, e)):
                if index >= MAX_SEQUENCES_PER_TILE:
                    return
                rng = np.random.default_rng([self.seed, x, y, e, local + 1])
                yield self._sequence(rng, x, y, e, index, length, bounds, touches_void)
                index += 1

    def _sequence(
        self,
        rng: np.random.Generator,
        x: int,
        y: int,
        epoch: int,
        index: int,
        length: int,
        bounds: tuple[float, float, float, float],
        touches_void: bool,
    ):
        west, south, east, north = bounds
        km_lon = 111.32 * math.cos(math.radians((north + south) / 2))
        camera = int(rng.choice(len(CAMERAS), p=_CAMERA_P))
        make, model, camera_type, is_pano, *_ = CAMERAS[camera]

        # start: a density-weighted cell of the tile, then a uniform point in it, never in the lake
        weights = self._weights[(x, y)]
        lon0 = lat0 = 0.0
        for attempt in range(20):
            cell = int(rng.choice(DENSITY_GRID * DENSITY_GRID, p=weights))
            row, col = divmod(cell, DENSITY_GRID)
            fx, fy = (col + rng.random()) / DENSITY_GRID, (row + rng.random()) / DENSITY_GRID
            if attempt == 19:
                fx, fy = (col + 0.5) / DENSITY_GRID, (row + 0.5) / DENSITY_GRID
            lon0 = float(tile_lon(x + fx))
            lat0 = float(tile_lat(y + fy))
            if not touches_void or not self.region.point_in_void(lon0, lat0):
                break

        # a street-like walk: grid-aligned headings, occasional right-angle turns, steady spacing
        spacing_m = rng.uniform(3.0, 15.0)
        grid_angle = np.radians(unit_hash(x * 16384 + y, self.seed) * 90.0)
        turns = np.where(rng.random(length) < 0.04, rng.choice((-1, 1), size=length), 0)
        quadrant = np.cumsum(turns) + int(rng.integers(0, 4))
        heading = grid_angle + quadrant * (np.pi / 2) + rng.normal(0, 0.03, length)
        step = spacing_m * (1 + 0.08 * rng.standard_normal(length))
        step[0] = 0.0
        east_m = np.cumsum(step * np.sin(heading))
        north_m = np.cumsum(step * np.cos(heading))
        margin_lon = (east - west) * 0.01
        margin_lat = (north - south) * 0.01
        lon = _fold(lon0 + east_m / (km_lon * 1000), west + margin_lon, east - margin_lon)
        lat = _fold(
            lat0 + north_m / (KM_PER_DEG_LAT * 1000), south + margin_lat, north - margin_lat
        )
        if touches_void:
            wet = self.region.in_void(lon, lat)
            if wet.any():
                dry = max(1, int(np.argmax(wet)))
                if self.region.turns_back:
                    track = _back_and_forth(dry, length)
                    lon, lat = lon[track], lat[track]
                else:
                    length = dry
                    lon, lat = lon[:length], lat[:length]

        d_e = np.diff(lon) * km_lon * 1000
        d_n = np.diff(lat) * KM_PER_DEG_LAT * 1000
        travel = (
            np.degrees(np.arctan2(d_e, d_n)) % 360.0
            if length > 1
            else np.array([rng.uniform(0, 360)])
        )
        travel = np.append(travel, travel[-1])[:length]
        if is_pano:
            compass = (travel + rng.uniform(0, 360)) % 360.0
        else:
            compass = (travel + rng.normal(0, 4, length)) % 360.0
        computed_compass = (compass + rng.normal(0, 2.5, length)) % 360.0

        # computed (SfM) positions: a few metres off; missing for some sequences and some images
        offset_m = rng.normal(0, 2.5, (length, 2))
        computed_lon = lon + offset_m[:, 0] / (km_lon * 1000)
        computed_lat = lat + offset_m[:, 1] / (KM_PER_DEG_LAT * 1000)
        missing = rng.random(length) < (1.0 if rng.random() < 0.04 else 0.02)
        computed_lon[missing] = np.nan
        computed_lat[missing] = np.nan

        if epoch == 0:
            start_ms = int(rng.integers(_EPOCH0_START_MS, _EPOCH0_END_MS))
        else:
            start_ms = (
                _EPOCH0_END_MS
                + (epoch - 1) * _EPOCH_SPAN_MS
                + int(rng.integers(0, _EPOCH_SPAN_MS - 3_600_000))
            )
        speed = rng.uniform(1.2, 12.0)
        interval_ms = np.maximum(200, (step[:length] / speed * 1000).astype(np.int64))
        interval_ms[0] = 0
        captured_at = start_ms + np.cumsum(interval_ms)

        ground = 395.0 + 60.0 * rng.random()
        altitude = np.round(ground + rng.normal(0, 3.0, length), 3)
        glitch = rng.random(length) < 0.01
        altitude[glitch] = -rng.integers(1, 40, int(glitch.sum())).astype(float)
        computed_altitude = np.round(ground + 1.5 + rng.normal(0, 1.0, length), 3)
        glitch = rng.random(length) < 0.005
        computed_altitude[glitch] = -rng.integers(1, 40, int(glitch.sum())).astype(float)

        quality = np.clip(rng.uniform(0.3, 1.0) + rng.normal(0, 0.05, length), 0.0, 1.0).round(4)
        rotation = rng.normal(0, 0.6, (length, 3)).round(6)

        organization = (
            self._organizations[int(rng.integers(0, _N_ORGANIZATIONS))]
            if rng.random() < 0.25
            else None
        )
        if is_pano:
            camera_parameters = None
        else:
            camera_parameters = (
                round(rng.uniform(0.5, 1.1), 6),
                round(rng.normal(0, 0.05), 6),
                round(rng.normal(0, 0.01), 6),
            )
        info = SequenceInfo(
            index=index,
            id=encode_sequence_id(self.seed, x, y, index),
            epoch=epoch,
            offset=0,
            length=length,
            camera=camera,
            creator=int(rng.integers(0, _N_CREATORS)),
            organization_id=organization,
            exif_orientation=int(rng.choice((1, 1, 1, 1, 1, 1, 1, 3, 6, 8))),
            atomic_scale=1 if rng.random() < 0.1 else round(float(rng.uniform(0.85, 1.15)), 6),
            merge_cc=float(int(rng.integers(10**17, 9 * 10**18))),
            camera_parameters=camera_parameters,
            mesh_base=int(rng.integers(10**14, 10**15)) if rng.random() < 0.85 else None,
            sfm_cluster_id=int(rng.integers(10**14, 10**15)) if rng.random() < 0.92 else None,
        )
        cols = {
            "lon": lon,
            "lat": lat,
            "computed_lon": computed_lon,
            "computed_lat": computed_lat,
            "captured_at": captured_at.astype(np.int64),
            "compass": compass.round(6),
            "computed_compass": computed_compass.round(6),
            "altitude": altitude,
            "computed_altitude": computed_altitude,
            "quality": quality,
            "rotation": rotation,
            "sequence_row": np.full(length, index, np.int32),
            "image_index": np.arange(length, dtype=np.int32),
        }
        return info, cols


def _summary(info: SequenceInfo, cols: dict[str, np.ndarray], x: int, y: int) -> dict:
    """A sequence as the low-zoom layers show it: its id, its first image, its end points."""
    return {
        "sequence_id": info.id,
        "image_id": int(image_id_ints(x, y, cols["sequence_row"][:1], cols["image_index"][:1])[0]),
        "captured_at": int(cols["captured_at"][0]),
        "is_pano": bool(CAMERAS[info.camera][3]),
        "organization_id": info.organization_id,
        "first_lon": float(cols["lon"][0]),
        "first_lat": float(cols["lat"][0]),
        "last_lon": float(cols["lon"][-1]),
        "last_lat": float(cols["lat"][-1]),
    }


def _make_creators(seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng([seed, 0xC0FFEE])
    creators = []
    for k in range(_N_CREATORS):
        parts = rng.choice(len(_SYLLABLES), size=int(rng.integers(2, 4)))
        name = "".join(_SYLLABLES[p] for p in parts)
        name += ("_" if k % 3 == 0 else "") + str(int(rng.integers(1, 999)))
        creators.append((name, int(100_000_000_000_000 + rng.integers(0, 899_999_999_999_999))))
    return creators


def _back_and_forth(dry: int, length: int) -> np.ndarray:
    """Indices of ``length`` steps walking the first ``dry`` points to and fro (0, 1, .., dry-1, dry-2, ..)."""
    if dry == 1:
        return np.zeros(length, dtype=np.int64)
    phase = np.arange(length) % (2 * dry - 2)
    return np.where(phase < dry, phase, 2 * dry - 2 - phase)


def _fold(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect values into [low, high] (a walk bouncing off the tile border)."""
    span = high - low
    t = np.mod(values - low, 2 * span)
    return low + np.where(t > span, 2 * span - t, t)
