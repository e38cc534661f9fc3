"""What the synthetic world is made of: an image as the Graph API knows it (``ImageRecord``), a
sequence's shared attributes (``SequenceInfo``) and a generated z14 tile as column arrays
(``TileImages``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    @classmethod
    def empty(cls, x: int, y: int, epoch: int) -> TileImages:
        f = np.zeros(0)
        columns = {
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
        return cls(x, y, epoch, [], columns)

    def __len__(self) -> int:
        return len(self.lon)


@dataclass(frozen=True, slots=True)
class SequenceLines:
    """The coverage of one z14 tile: one line per sequence, from its first to its last image, with the
    properties of Mapillary's `sequence` layer (columns, one row per sequence in id order)."""

    sequence_ids: tuple[str, ...]
    image_ids: np.ndarray  # int64, the first image of each sequence
    captured_at: np.ndarray  # int64 ms, of that image
    is_pano: np.ndarray  # bool
    organization_ids: np.ndarray  # int64, -1 where the sequence has none
    first_lon: np.ndarray
    first_lat: np.ndarray
    last_lon: np.ndarray
    last_lat: np.ndarray

    @classmethod
    def from_summaries(cls, summaries: list[dict]) -> SequenceLines:
        def column(key: str, dtype) -> np.ndarray:
            return np.array([s[key] for s in summaries], dtype=dtype)

        organizations = [s["organization_id"] for s in summaries]
        return cls(
            sequence_ids=tuple(s["sequence_id"] for s in summaries),
            image_ids=column("image_id", np.int64),
            captured_at=column("captured_at", np.int64),
            is_pano=column("is_pano", bool),
            organization_ids=np.array([-1 if o is None else o for o in organizations], np.int64),
            first_lon=column("first_lon", float),
            first_lat=column("first_lat", float),
            last_lon=column("last_lon", float),
            last_lat=column("last_lat", float),
        )

    def __len__(self) -> int:
        return len(self.sequence_ids)
