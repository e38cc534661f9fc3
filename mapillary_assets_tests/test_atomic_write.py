"""storage.atomic_write_bytes: the bytes land whole under the final name, and a failed write leaves nothing."""

import errno
import os

import pytest

from mapillary_assets.storage import TEMP_MARKER, atomic_write_bytes, files


@pytest.mark.parametrize("durable", [False, True])
def test_writes_every_byte_and_leaves_no_temporary_file(tmp_path, durable):
    data = bytes(range(256)) * 4096  # 1 MiB, more than one write() may take at once
    target = tmp_path / "shard" / "1.jpg"
    atomic_write_bytes(target, data, durable=durable)
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["1.jpg"]


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "1.jpg"
    target.write_bytes(b"damaged")
    atomic_write_bytes(target, b"complete", durable=False)
    assert target.read_bytes() == b"complete"


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write

    def at_most_7_bytes(fd, data):
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(files.os, "write", at_most_7_bytes)
    target = tmp_path / "1.jpg"
    atomic_write_bytes(target, b"0123456789" * 10, durable=False)
    assert target.read_bytes() == b"0123456789" * 10


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "1.jpg"
    target.write_bytes(b"old")
    closed = []
    real_close = os.close

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def recording_close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(files.os, "write", disk_full)
    monkeypatch.setattr(files.os, "close", recording_close)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(target, b"new", durable=False)
    assert raised.value.errno == errno.ENOSPC
    assert len(closed) == 1  # the descriptor is not leaked
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]
