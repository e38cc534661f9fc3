"""Deterministic thumbnail JPEGs.

A pool of street-like scenes (sky gradient, facades with window grids, a road with lane marks,
fine sensor noise) is rendered lazily per width, each in a sharp and a strongly blurred variant, and
encoded once as baseline JPEG. An image's thumbnail is the pool entry picked by a hash of its id (the
blurred variant when the world says the image is blurred), with a JPEG comment naming the image, so
every image has distinct bytes while serving costs a dictionary lookup.

At 1024 px the variance of the Laplacian (``cv2.Laplacian(gray, cv2.CV_64F).var()``) is far above 300
for sharp variants and far below 40 for blurred ones.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from .ids import unit_hash

SIZES = {"256": 256, "1024": 1024, "2048": 2048, "original": 2048}
POOL_SIZE = 24
JPEG_QUALITY = 88
_lock = threading.Lock()
_cache: dict[tuple[int, int, bool], bytes] = {}


def width_for(size: str | int) -> int:
    width = SIZES.get(str(size))
    if width is None:
        raise KeyError(f"unknown thumbnail size {size!r}")
    return width


def variant_of(image_id: str | int) -> int:
    return int(unit_hash(int(image_id), 0x7E11) * POOL_SIZE)


def thumbnail_bytes(image_id: str | int, size: str | int, blurred: bool) -> bytes:
    """The JPEG served for ``image_id`` at ``size`` ("256", "1024", "2048" or "original")."""
    base = scene_jpeg(variant_of(image_id), width_for(size), blurred)
    comment = f"mapillary-emulator image {image_id}".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


def jpeg_fault(image_id: str | int, corrupt_rate: float, truncated_rate: float) -> str | None:
    """ "corrupt", "truncated" or None: fixed per image id for given rates, so tests can predict it."""
    u = unit_hash(int(image_id), 0xBAD_1E6)
    if u < corrupt_rate:
        return "corrupt"
    if u < corrupt_rate + truncated_rate:
        return "truncated"
    return None


def damage(data: bytes, image_id: str | int, kind: str) -> bytes:
    """Truncated: the first 40-80% of the bytes (no end marker). Corrupt: the start-of-image marker,
    then noise and an end marker: it looks like a JPEG but does not decode."""
    u = unit_hash(int(image_id), 0xC0DE)
    if kind == "truncated":
        return data[: int(len(data) * (0.4 + 0.4 * u))]
    rng = np.random.default_rng(int(u * 2**32))
    noise = rng.integers(0, 256, len(data) - 4, dtype=np.uint8)
    noise[noise == 0xFF] = 0x00  # no stray markers: the decoder finds no frame at all
    return b"\xff\xd8" + noise.tobytes() + b"\xff\xd9"


def scene_jpeg(variant: int, width: int, blurred: bool) -> bytes:
    key = (variant, width, blurred)
    data = _cache.get(key)
    if data is None:
        image = render_scene(variant, width)
        if blurred:
            sigma = width / 110.0
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)
        ok, encoded = cv2.imencode(
            ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
        )
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
            raise RuntimeError("JPEG encoding failed")
        data = encoded.tobytes()
        with _lock:
            _cache[key] = data
    return data


def render_scene(variant: int, width: int) -> np.ndarray:
    """A BGR street scene, 4:3, deterministic for (variant, width)."""
    height = width * 3 // 4
    rng = np.random.default_rng([variant, 0x5CE7E])
    s = width / 1024.0
    horizon = int(height * rng.uniform(0.38, 0.5))

    # sky: vertical gradient
    top = np.array(rng.uniform([150, 90, 40], [235, 170, 110]))
    bottom = np.array(rng.uniform([200, 190, 170], [250, 240, 225]))
    t = np.linspace(0, 1, horizon)[:, None]
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[:horizon] = (top * (1 - t) + bottom * t)[:, None, :]

    # ground
    image[horizon:] = rng.uniform(70, 110)

    # facades with window grids, drawn back to front
    x = int(-rng.uniform(0, 80) * s)
    while x < width:
        w = int(rng.uniform(90, 260) * s)
        roof = int(horizon - rng.uniform(0.15, 0.42) * height)
        base_y = int(horizon + rng.uniform(0.02, 0.1) * height)
        colour = rng.uniform(60, 220, 3)
        cv2.rectangle(image, (x, roof), (x + w, base_y), tuple(float(c) for c in colour), -1)
        win_w, win_h = max(3, int(rng.uniform(10, 22) * s)), max(4, int(rng.uniform(14, 30) * s))
        gap_x, gap_y = max(2, int(rng.uniform(8, 18) * s)), max(2, int(rng.uniform(10, 20) * s))
        dark = colour * rng.uniform(0.2, 0.45)
        for wy in range(roof + gap_y, base_y - win_h - gap_y, win_h + gap_y):
            for wx in range(x + gap_x, x + w - win_w - gap_x, win_w + gap_x):
                lit = rng.random() < 0.2
                shade = (230.0, 225.0, 170.0) if lit else tuple(float(c) for c in dark)
                cv2.rectangle(image, (wx, wy), (wx + win_w, wy + win_h), shade, -1)
        x += w + int(rng.uniform(0, 30) * s)

    # road: a trapezoid to the vanishing point with dashed lane marks
    vanish = int(width * rng.uniform(0.35, 0.65))
    road = np.array(
        [
            [vanish - 4 * s, horizon],
            [vanish + 4 * s, horizon],
            [width * 1.1, height],
            [-width * 0.1, height],
        ],
        dtype=np.int32,
    )
    cv2.fillPoly(image, [road], (float(rng.uniform(60, 90)),) * 3)
    for k in range(12):
        a, b = k / 12, (k + 0.5) / 12
        y0, y1 = horizon + (height - horizon) * a * a, horizon + (height - horizon) * b * b
        x0 = vanish + (width / 2 - vanish) * a * a
        x1 = vanish + (width / 2 - vanish) * b * b
        cv2.line(
            image,
            (int(x0), int(y0)),
            (int(x1), int(y1)),
            (235.0, 235.0, 235.0),
            max(1, int(6 * s * b)),
        )

    # fine texture: sensor noise and asphalt grain
    image += rng.normal(0, 7.0, image.shape[:2])[:, :, None].astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
