"""The emulator's hashing and its image and sequence ids.

Ids carry their own address so that any lookup regenerates a single z14 tile:

* image id = ``2**53 + (x << 35 | y << 21 | sequence_index << 9 | image_index)``: a 16-digit int64
  that is deliberately not float-safe;
* sequence id = 15 hash characters + 7 base-62 characters packing ``(x, y, sequence_index)``
  (22 characters; about one in twenty uses the legacy alphabet with ``-`` and ``_``).
"""

from __future__ import annotations

import hashlib

import numpy as np

IMAGE_ID_BASE = 2**53
_X_SHIFT, _Y_SHIFT, _SEQ_SHIFT = 35, 21, 9
_TILE_BITS, _SEQ_BITS, _IMG_BITS = 14, 12, 9
MAX_SEQUENCES_PER_TILE = 1 << _SEQ_BITS
_IMAGE_ID_MAX = IMAGE_ID_BASE + (1 << (2 * _TILE_BITS + _SEQ_BITS + _IMG_BITS))

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LEGACY = _BASE62 + "-_"
_SEQ_PAYLOAD_CHARS = 7
_SEQ_ID_LENGTH = 22

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


def image_id_ints(x: int, y: int, seq_index: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """``encode_image_id`` for many images of tile (x, y), as int64 values."""
    packed = (
        (np.int64(x) << _X_SHIFT)
        | (np.int64(y) << _Y_SHIFT)
        | (seq_index.astype(np.int64) << _SEQ_SHIFT)
    )
    return IMAGE_ID_BASE + (packed | image_index.astype(np.int64))


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
