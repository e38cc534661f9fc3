"""A deterministic synthetic Mapillary world around Zurich, generated lazily per z14 tile.

Everything is a pure function of ``(seed, tile x, tile y, epoch)``: a tile's images are regenerated
on demand with ``numpy.random.default_rng`` and kept in a small LRU, so a world of millions of images
never lives in memory at once.

Simplifications (documented on purpose):

* Every sequence is generated inside one z14 tile and stays there (its street-like random walk is
  folded back at the tile border), so each image lies in exactly one z14 tile of ``mly1_public``.
  Real sequences cross tile borders.
* Images never lie in the lake: a walk that reaches the shore ends there.
* ``computed_geometry`` is a few metres off ``geometry``; it may cross into a neighbouring z14 tile.

Ids carry their own address so that any lookup regenerates a single tile:

* image id = ``2**53 + (x << 35 | y << 21 | sequence_index << 9 | image_index)``: a 16-digit int64
  that is deliberately not float-safe;
* sequence id = 15 hash characters + 7 base-62 characters packing ``(x, y, sequence_index)``
  (22 characters; about one in twenty uses the legacy alphabet with ``-`` and ``_``).

Epochs: the base world is epoch 0; ``advance()`` adds a smaller, independent random stream of
sequences per ``(tile, epoch)``. A world at epoch ``k`` shows the sequences of epochs ``0..k``,
and sequence indices grow across epochs, so ids never change once issued.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import mercantile
import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.prepared import prep

ZOOM = 14
IMAGE_ID_BASE = 2**53
_X_SHIFT, _Y_SHIFT, _SEQ_SHIFT = 35, 21, 9
_TILE_BITS, _SEQ_BITS, _IMG_BITS = 14, 12, 9
MAX_SEQUENCES_PER_TILE = 1 << _SEQ_BITS
MAX_SEQUENCE_LENGTH = 300
MIN_SEQUENCE_LENGTH = 20
_IMAGE_ID_MAX = IMAGE_ID_BASE + (1 << (2 * _TILE_BITS + _SEQ_BITS + _IMG_BITS))

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LEGACY = _BASE62 + "-_"
_SEQ_PAYLOAD_CHARS = 7
_SEQ_ID_LENGTH = 22

CENTRE = (8.540, 47.378)  # Zurich HB
_KM_PER_DEG_LAT = 110.57
_KM_PER_DEG_LON = 111.32 * math.cos(math.radians(CENTRE[1]))
WORLD_RADIUS_KM = 25.0
# (lon, lat, peak images per km2 at scale 1, sigma km)
_CENTRES = (
    (8.540, 47.378, 26_000.0, 0.85),  # HB / Altstadt
    (8.545, 47.411, 12_000.0, 0.7),  # Oerlikon
    (8.487, 47.390, 10_000.0, 0.7),  # Altstetten
    (8.540, 47.378, 18_500.0, 4.0),  # the city around them
)
_OUTSKIRTS_PER_KM2 = 70.0
_GRID = 8  # density samples per tile side
_EPOCH_GROWTH = 0.05  # a later epoch adds ~5% of a tile's base images (Poisson)
_MEAN_SEQUENCE_LENGTH = (MAX_SEQUENCE_LENGTH - MIN_SEQUENCE_LENGTH) / math.log(
    MAX_SEQUENCE_LENGTH / MIN_SEQUENCE_LENGTH
)

# The northern end of Lake Zurich (crude), widening to the south so whole z14 tiles lie in it.
LAKE = Polygon(
    [
        (8.5405, 47.3665),
        (8.5445, 47.3670),
        (8.5487, 47.3656),
        (8.5515, 47.3590),
        (8.5545, 47.3540),
        (8.5610, 47.3470),
        (8.5740, 47.3370),
        (8.5930, 47.3230),
        (8.6150, 47.3050),
        (8.6450, 47.2800),
        (8.6200, 47.2600),
        (8.5800, 47.2750),
        (8.5550, 47.2950),
        (8.5430, 47.3150),
        (8.5390, 47.3300),
        (8.5365, 47.3460),
        (8.5368, 47.3560),
        (8.5385, 47.3630),
    ]
)
_LAKE_PREPARED = prep(LAKE)

_EPOCH0_START_MS = 1_388_534_400_000  # 2014-01-01
_EPOCH0_END_MS = 1_735_689_600_000  # 2025-01-01
_EPOCH_SPAN_MS = 7 * 86_400_000  # sequences of epoch k are captured in week k after that

# make, model, camera_type, is_pano, width, height, weight
_CAMERAS = (
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
_CAMERA_P = np.array([c[6] for c in _CAMERAS], dtype=float) / sum(c[6] for c in _CAMERAS)
_N_CREATORS = 400
_N_ORGANIZATIONS = 12
_SYLLABLES = (
    "ka",
    "ri",
    "mo",
    "zu",
    "le",
    "na",
    "to",
    "shi",
    "ber",
    "al",
    "vin",
    "dor",
    "es",
    "pa",
    "lu",
)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image as the Graph API knows it. ``altitude`` values are true metres; the server wraps
    negative ones as unsigned 32-bit integers, as the real API does."""

    id: str
    sequence: str
    captured_at: int
    geometry: tuple[float, float]
    computed_geometry: tuple[float, float] | None
    compass_angle: float
    computed_compass_angle: float
    altitude: float
    computed_altitude: float
    creator_username: str
    creator_id: int
    organization_id: int | None
    camera_type: str
    make: str
    model: str
    width: int
    height: int
    is_pano: bool
    quality_score: float
    exif_orientation: int
    computed_rotation: tuple[float, float, float]
    atomic_scale: float | int
    merge_cc: float
    camera_parameters: tuple[float, ...] | None
    mesh: dict | None
    sfm_cluster: dict | None
    tile: tuple[int, int]
    epoch: int
    blurred: bool

    @property
    def sequence_id(self) -> str:
        return self.sequence

    @property
    def lon(self) -> float:
        return self.geometry[0]

    @property
    def lat(self) -> float:
        return self.geometry[1]

    @property
    def creator(self) -> dict:
        return {"username": self.creator_username, "id": str(self.creator_id)}


# ---------------------------------------------------------------------------------------------
# hashing and ids


_MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def unit_hash(value: int, salt: int) -> float:
    """A deterministic number in [0, 1) for an integer key and a salt."""
    return splitmix64(value ^ splitmix64(salt)) / 2**64


def encode_image_id(x: int, y: int, sequence_index: int, image_index: int) -> str:
    return str(
        IMAGE_ID_BASE
        + ((x << _X_SHIFT) | (y << _Y_SHIFT) | (sequence_index << _SEQ_SHIFT) | image_index)
    )


def decode_image_id(image_id: str | int) -> tuple[int, int, int, int] | None:
    """``(x, y, sequence_index, image_index)`` or None when the id is not one of ours."""
    try:
        value = int(image_id)
    except (TypeError, ValueError):
        return None
    if isinstance(image_id, str) and (not image_id.isdigit() or image_id.startswith("0")):
        return None
    if not IMAGE_ID_BASE <= value < _IMAGE_ID_MAX:
        return None
    packed = value - IMAGE_ID_BASE
    return (
        packed >> _X_SHIFT,
        (packed >> _Y_SHIFT) & ((1 << _TILE_BITS) - 1),
        (packed >> _SEQ_SHIFT) & ((1 << _SEQ_BITS) - 1),
        packed & ((1 << _IMG_BITS) - 1),
    )


def _image_id_ints(x: int, y: int, seq_index: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    packed = (
        (np.int64(x) << _X_SHIFT)
        | (np.int64(y) << _Y_SHIFT)
        | (seq_index.astype(np.int64) << _SEQ_SHIFT)
    )
    return IMAGE_ID_BASE + (packed | image_index.astype(np.int64))


def encode_sequence_id(seed: int, x: int, y: int, sequence_index: int) -> str:
    payload = (x << (_TILE_BITS + _SEQ_BITS)) | (y << _SEQ_BITS) | sequence_index
    digest = hashlib.blake2b(f"{seed}:{payload}".encode(), digest_size=16).digest()
    alphabet = _LEGACY if digest[0] < 13 else _BASE62  # ~5% legacy-style keys
    prefix = "".join(
        alphabet[b % len(alphabet)] for b in digest[1 : _SEQ_ID_LENGTH - _SEQ_PAYLOAD_CHARS + 1]
    )
    tail = []
    for _ in range(_SEQ_PAYLOAD_CHARS):
        payload, digit = divmod(payload, 62)
        tail.append(_BASE62[digit])
    return prefix + "".join(reversed(tail))


def decode_sequence_id(seed: int, sequence_id: str) -> tuple[int, int, int] | None:
    """``(x, y, sequence_index)`` or None when the id was not issued by a world with this seed."""
    if not isinstance(sequence_id, str) or len(sequence_id) != _SEQ_ID_LENGTH:
        return None
    payload = 0
    for char in sequence_id[-_SEQ_PAYLOAD_CHARS:]:
        digit = _BASE62.find(char)
        if digit < 0:
            return None
        payload = payload * 62 + digit
    if payload >= 1 << (2 * _TILE_BITS + _SEQ_BITS):
        return None
    x = payload >> (_TILE_BITS + _SEQ_BITS)
    y = (payload >> _SEQ_BITS) & ((1 << _TILE_BITS) - 1)
    index = payload & ((1 << _SEQ_BITS) - 1)
    if encode_sequence_id(seed, x, y, index) != sequence_id:
        return None
    return x, y, index


# ---------------------------------------------------------------------------------------------
# geography


def tile_lon(x: np.ndarray | float, z: int = ZOOM):
    return np.asarray(x, dtype=float) / 2.0**z * 360.0 - 180.0


def tile_lat(y: np.ndarray | float, z: int = ZOOM):
    return np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * np.asarray(y, dtype=float) / 2.0**z))))


def density_per_km2(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Images per km2 at scale 1.0: urban peaks, a sparse countryside, nothing in the lake or
    beyond WORLD_RADIUS_KM of the centre."""
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    total = np.zeros(np.broadcast(lon, lat).shape)
    for c_lon, c_lat, peak, sigma in _CENTRES:
        d2 = ((lon - c_lon) * _KM_PER_DEG_LON) ** 2 + ((lat - c_lat) * _KM_PER_DEG_LAT) ** 2
        total += peak * np.exp(-d2 / (2 * sigma * sigma))
    r = np.hypot((lon - CENTRE[0]) * _KM_PER_DEG_LON, (lat - CENTRE[1]) * _KM_PER_DEG_LAT)
    total += _OUTSKIRTS_PER_KM2 * np.clip(1.0 - r / WORLD_RADIUS_KM, 0.0, None)
    total[r > WORLD_RADIUS_KM] = 0.0
    total[shapely.contains_xy(LAKE, lon, lat)] = 0.0
    return total


def _candidate_tile_range() -> tuple[range, range]:
    """z14 columns/rows that can hold images (within WORLD_RADIUS_KM of the centre)."""
    d_lon = (WORLD_RADIUS_KM + 2) / _KM_PER_DEG_LON
    d_lat = (WORLD_RADIUS_KM + 2) / _KM_PER_DEG_LAT
    nw = mercantile.tile(CENTRE[0] - d_lon, CENTRE[1] + d_lat, ZOOM)
    se = mercantile.tile(CENTRE[0] + d_lon, CENTRE[1] - d_lat, ZOOM)
    return range(nw.x, se.x + 1), range(nw.y, se.y + 1)


def _cell_centres(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lon/lat of the GRIDxGRID cell centres of tiles (x, y): arrays shaped (n, GRID, GRID) [row, col]."""
    frac = (np.arange(_GRID) + 0.5) / _GRID
    lon = tile_lon(x[:, None, None] + frac[None, None, :]) + np.zeros((1, _GRID, 1))
    lat = tile_lat(y[:, None, None] + frac[None, :, None]) + np.zeros((1, 1, _GRID))
    return lon, lat


def _tile_area_km2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    west, east = tile_lon(x), tile_lon(x + 1)
    north, south = tile_lat(y), tile_lat(y + 1)
    mid = np.radians((north + south) / 2)
    return (east - west) * 111.32 * np.cos(mid) * (north - south) * _KM_PER_DEG_LAT


# ---------------------------------------------------------------------------------------------
# per-tile generation


@dataclass(slots=True)
class SequenceInfo:
    index: int  # index within the tile, stable across epochs
    id: str
    epoch: int
    offset: int  # first row in the tile arrays
    length: int
    camera: int
    creator: int
    organization_id: int | None
    exif_orientation: int
    atomic_scale: float | int
    merge_cc: float
    camera_parameters: tuple[float, ...] | None
    mesh_base: int | None
    sfm_cluster_id: int | None


class TileImages:
    """All images of one z14 tile at one epoch, as column arrays (rows in sequence/capture order)."""

    __slots__ = (
        "x",
        "y",
        "epoch",
        "sequences",
        "lon",
        "lat",
        "computed_lon",
        "computed_lat",
        "captured_at",
        "compass",
        "computed_compass",
        "altitude",
        "computed_altitude",
        "quality",
        "rotation",
        "sequence_row",
        "image_index",
        "ids",
        "blurred",
    )

    def __init__(
        self,
        x: int,
        y: int,
        epoch: int,
        sequences: list[SequenceInfo],
        columns: dict[str, np.ndarray],
    ):
        self.x, self.y, self.epoch, self.sequences = x, y, epoch, sequences
        for name, values in columns.items():
            setattr(self, name, values)

    def __len__(self) -> int:
        return len(self.lon)


def _empty_columns() -> dict[str, np.ndarray]:
    f = np.zeros(0)
    return {
        "lon": f,
        "lat": f,
        "computed_lon": f,
        "computed_lat": f,
        "captured_at": np.zeros(0, np.int64),
        "compass": f,
        "computed_compass": f,
        "altitude": f,
        "computed_altitude": f,
        "quality": f,
        "rotation": np.zeros((0, 3)),
        "sequence_row": np.zeros(0, np.int32),
        "image_index": np.zeros(0, np.int32),
        "ids": np.zeros(0, np.int64),
        "blurred": np.zeros(0, bool),
    }


class World:
    """The synthetic world. Thread-safe: the emulator serves it from another thread."""

    def __init__(
        self, seed: int = 42, scale: float = 0.005, epoch: int = 0, blurred_fraction: float = 0.1
    ):
        if scale < 0:
            raise ValueError("scale must be >= 0")
        if not 0.0 <= blurred_fraction <= 1.0:
            raise ValueError("blurred_fraction must be within [0, 1]")
        self.seed = int(seed)
        self.scale = float(scale)
        self.epoch = int(epoch)
        self.blurred_fraction = float(blurred_fraction)
        self._lock = threading.RLock()
        self._tiles: OrderedDict[tuple[int, int, int], TileImages] = OrderedDict()
        self._cached_images = 0
        self.max_cached_images = 2_000_000
        self._creators = self._make_creators()
        self._organizations = [
            10_000_000_000_000 + 7919 * k * k + 31 * k for k in range(1, _N_ORGANIZATIONS + 1)
        ]
        self._expected: dict[tuple[int, int], float] | None = None
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        self._counts: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self._summaries: dict[tuple[int, int], dict] = {}

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, scale={self.scale}, epoch={self.epoch})"

    # -- public API ---------------------------------------------------------------------------

    def advance(self) -> int:
        """New sequences appear (in some tiles); returns the new epoch."""
        with self._lock:
            self.epoch += 1
            return self.epoch

    def images_in_z14_tile(self, x: int, y: int) -> list[ImageRecord]:
        tile = self.tile_images(x, y)
        return [self._record(tile, row) for row in range(len(tile))]

    def image(self, image_id: str) -> ImageRecord | None:
        row = self._locate(image_id)
        return None if row is None else self._record(*row)

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
            out.extend(self._record(tile, int(r)) for r in rows)
        return out

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
        base = self._expected_table().get((x, y), 0.0) * self.scale
        return base if epoch == 0 else base * _EPOCH_GROWTH

    def candidate_tiles(self) -> list[tuple[int, int]]:
        """Every z14 tile that can hold images at any epoch."""
        return sorted(k for k, v in self._expected_table().items() if v > 0)

    def tile_sequence_count(self, x: int, y: int, epoch: int | None = None) -> int:
        """Sequences of the tile at ``epoch`` (default: the world's), computed without generating
        images: nonzero exactly when the tile holds images."""
        epoch = self.epoch if epoch is None else epoch
        return sum(len(self._sequence_lengths(x, y, e)) for e in range(epoch + 1))

    def nonempty_tiles(self, epoch: int | None = None) -> list[tuple[int, int]]:
        return [t for t in self.candidate_tiles() if self.tile_sequence_count(*t, epoch=epoch)]

    def tile_images(self, x: int, y: int) -> TileImages:
        key = (x, y, self.epoch)
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = self._generate_tile(x, y, key[2])
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
        return self._record(tile, row)

    # -- internals --------------------------------------------------------------------------------

    def _make_creators(self) -> list[tuple[str, int]]:
        rng = np.random.default_rng([self.seed, 0xC0FFEE])
        creators = []
        for k in range(_N_CREATORS):
            parts = rng.choice(len(_SYLLABLES), size=int(rng.integers(2, 4)))
            name = "".join(_SYLLABLES[p] for p in parts)
            name += ("_" if k % 3 == 0 else "") + str(int(rng.integers(1, 999)))
            creators.append((name, int(100_000_000_000_000 + rng.integers(0, 899_999_999_999_999))))
        return creators

    def _expected_table(self) -> dict[tuple[int, int], float]:
        """Mean base images (scale 1.0) for every candidate tile, plus the cell weights."""
        if self._expected is None:
            with self._lock:
                if self._expected is None:
                    xs, ys = _candidate_tile_range()
                    gx, gy = np.meshgrid(np.array(xs), np.array(ys), indexing="ij")
                    gx, gy = gx.ravel(), gy.ravel()
                    lon, lat = _cell_centres(gx, gy)
                    dens = density_per_km2(lon, lat)
                    expected = dens.mean(axis=(1, 2)) * _tile_area_km2(gx, gy)
                    table = {}
                    for i, (x, y) in enumerate(zip(gx.tolist(), gy.tolist())):
                        if expected[i] > 0:
                            table[(x, y)] = float(expected[i])
                            self._weights[(x, y)] = dens[i].ravel() / dens[i].sum()
                    self._expected = table
        return self._expected

    def _sequence_lengths(self, x: int, y: int, epoch: int) -> tuple[int, ...]:
        key = (x, y, epoch)
        lengths = self._counts.get(key)
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
            self._counts[key] = lengths
        return lengths

    def _sequence_offsets(self, x: int, y: int, epoch: int) -> int:
        return sum(len(self._sequence_lengths(x, y, e)) for e in range(epoch))

    def tile_summary(self, x: int, y: int) -> dict | None:
        """The tile's first sequence (generated alone; cheap): the low-zoom tile layers show it."""
        key = (x, y)
        summary = self._summaries.get(key)
        if summary is not None:
            return summary
        for e in range(self.epoch + 1):
            lengths = self._sequence_lengths(x, y, e)
            if lengths:
                break
        else:
            return None
        rng = np.random.default_rng([self.seed, x, y, e, 1])
        info, cols = self._generate_sequence(rng, x, y, e, 0, lengths[0], *_tile_geometry(x, y))
        summary = {
            "sequence_id": info.id,
            "image_id": int(
                _image_id_ints(x, y, cols["sequence_row"][:1], cols["image_index"][:1])[0]
            ),
            "captured_at": int(cols["captured_at"][0]),
            "is_pano": bool(_CAMERAS[info.camera][3]),
            "organization_id": info.organization_id,
            "first_lon": float(cols["lon"][0]),
            "first_lat": float(cols["lat"][0]),
            "last_lon": float(cols["lon"][-1]),
            "last_lat": float(cols["lat"][-1]),
        }
        self._summaries[key] = summary
        return summary

    def _generate_tile(self, x: int, y: int, epoch: int) -> TileImages:
        bounds, touches_lake = _tile_geometry(x, y)
        sequences: list[SequenceInfo] = []
        parts: list[dict[str, np.ndarray]] = []
        offset = 0
        index = 0
        for e in range(epoch + 1):
            for local, length in enumerate(self._sequence_lengths(x, y, e)):
                if index >= MAX_SEQUENCES_PER_TILE:
                    break
                rng = np.random.default_rng([self.seed, x, y, e, local + 1])
                info, cols = self._generate_sequence(
                    rng, x, y, e, index, length, bounds, touches_lake
                )
                info.offset = offset
                offset += info.length
                sequences.append(info)
                parts.append(cols)
                index += 1
        if not parts:
            return TileImages(x, y, epoch, [], _empty_columns())
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        columns["ids"] = _image_id_ints(x, y, columns["sequence_row"], columns["image_index"])
        salt = self.seed * 1_000_003 + 17
        columns["blurred"] = np.array(
            [unit_hash(int(v), salt) < self.blurred_fraction for v in columns["ids"].tolist()],
            dtype=bool,
        )
        return TileImages(x, y, epoch, sequences, columns)

    def _generate_sequence(
        self,
        rng: np.random.Generator,
        x: int,
        y: int,
        epoch: int,
        index: int,
        length: int,
        bounds: tuple[float, float, float, float],
        touches_lake: bool,
    ):
        west, south, east, north = bounds
        km_lon = 111.32 * math.cos(math.radians((north + south) / 2))
        camera = int(rng.choice(len(_CAMERAS), p=_CAMERA_P))
        make, model, camera_type, is_pano, *_ = _CAMERAS[camera]

        # start: a density-weighted cell of the tile, then a uniform point in it, never in the lake
        weights = self._weights[(x, y)]
        lon0 = lat0 = 0.0
        for attempt in range(20):
            cell = int(rng.choice(_GRID * _GRID, p=weights))
            row, col = divmod(cell, _GRID)
            fx, fy = (col + rng.random()) / _GRID, (row + rng.random()) / _GRID
            if attempt == 19:
                fx, fy = (col + 0.5) / _GRID, (row + 0.5) / _GRID
            lon0 = float(tile_lon(x + fx))
            lat0 = float(tile_lat(y + fy))
            if not touches_lake or not _LAKE_PREPARED.contains(shapely.Point(lon0, lat0)):
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
            lat0 + north_m / (_KM_PER_DEG_LAT * 1000), south + margin_lat, north - margin_lat
        )
        if touches_lake:
            wet = shapely.contains_xy(LAKE, lon, lat)
            if wet.any():
                length = max(1, int(np.argmax(wet)))
                lon, lat = lon[:length], lat[:length]

        d_e = np.diff(lon) * km_lon * 1000
        d_n = np.diff(lat) * _KM_PER_DEG_LAT * 1000
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
        computed_lat = lat + offset_m[:, 1] / (_KM_PER_DEG_LAT * 1000)
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

    def _locate(self, image_id) -> tuple[TileImages, int] | None:
        decoded = decode_image_id(image_id)
        if decoded is None:
            return None
        x, y, seq_index, image_index = decoded
        if (x, y) not in self._expected_table() or not self.tile_sequence_count(x, y):
            return None
        tile = self.tile_images(x, y)
        if seq_index >= len(tile.sequences):
            return None
        seq = tile.sequences[seq_index]
        if image_index >= seq.length:
            return None
        return tile, seq.offset + image_index

    def _record(self, tile: TileImages, row: int) -> ImageRecord:
        seq = tile.sequences[int(tile.sequence_row[row])]
        make, model, camera_type, is_pano, width, height, _ = _CAMERAS[seq.camera]
        username, creator_id = self._creators[seq.creator]
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

    def _rows_in_polygon(self, polygon):
        for x, y in self.nonempty_z14_tiles(polygon):
            tile = self.tile_images(x, y)
            inside = shapely.contains_xy(polygon, tile.lon, tile.lat)
            rows = np.flatnonzero(inside)
            if len(rows):
                yield tile, rows

    # sequence metadata for tile summaries (servers use this for low-zoom layers)
    def camera(self, seq: SequenceInfo) -> tuple:
        return _CAMERAS[seq.camera]

    def creator_of(self, seq: SequenceInfo) -> tuple[str, int]:
        return self._creators[seq.creator]


def _tile_geometry(x: int, y: int) -> tuple[tuple[float, float, float, float], bool]:
    bounds = (
        float(tile_lon(x)),
        float(tile_lat(y + 1)),
        float(tile_lon(x + 1)),
        float(tile_lat(y)),
    )
    return bounds, _LAKE_PREPARED.intersects(box(*bounds))


def _fold(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect values into [low, high] (a walk bouncing off the tile border)."""
    span = high - low
    t = np.mod(values - low, 2 * span)
    return low + np.where(t > span, 2 * span - t, t)
