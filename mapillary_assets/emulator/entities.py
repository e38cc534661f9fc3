"""The Graph API's image entity as JSON: the fields a request may ask for and the text of each.

Entity JSON is written by hand (strings in the world are plain ASCII: no escaping needed), with the
requested fields only, in request order after ``id``; absent values are left out, never ``null``.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ApiError
from .records import ImageRecord

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
OPTIONAL_FIELDS = frozenset({"computed_geometry", "creator"})  # dropped by omit_optional_fields


def parse_fields(raw: str | None) -> tuple[tuple[str, ...], bool]:
    """``(fields, has_urls)`` of a ``fields=`` parameter; raises ApiError for an unknown field."""
    names = [f.strip() for f in (raw or "").split(",") if f.strip()]
    for name in names:
        if name not in ENTITY_FIELDS:
            raise ApiError(
                400, f"Tried accessing nonexisting field ({name}) on node type (Image)", 100
            )
    ordered = tuple(dict.fromkeys(["id", *names]))
    return ordered, any(n in THUMB_FIELDS for n in ordered)


def render_entity(
    record: ImageRecord,
    fields: tuple[str, ...],
    omit: bool,
    thumbnail_url: Callable[[str, str], str],
) -> bytes:
    """The entity JSON of ``record``; ``omit`` drops OPTIONAL_FIELDS, ``thumbnail_url(id, size)``
    signs the thumb_*_url fields."""
    parts = []
    for name in fields:
        if omit and name in OPTIONAL_FIELDS:
            continue
        size = THUMB_FIELDS.get(name)
        if size is not None:
            parts.append(f'"{name}":"{thumbnail_url(record.id, size)}"')
            continue
        text = _JSON_WRITERS[name](record)
        if text is not None:
            parts.append(f'"{name}":{text}')
    return ("{" + ",".join(parts) + "}").encode()


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


# JSON text of each field; None = absent
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
