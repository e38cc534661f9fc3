"""The fault-free reference: one complete run of the reference world, built once per test session,
that the reliability tests compare their final data and their costs against."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from mapillary_assets.api.rate_windows import busiest_window
from mapillary_assets_tests.support.emulated_runs import emulated_run, read_images


@dataclass
class Reference:
    """A complete fault-free run of the test world: its data folder, its GeoPackage `images` layer and
    what it cost (emulator requests by kind, wall seconds)."""

    data_dir: Path
    requests: dict[str, int]
    seconds: float
    busiest_minute: dict[str, int]  # most requests in any 60 s, by rate-limit family
    images: object = field(repr=False, default=None)  # GeoDataFrame, loaded lazily

    def load_images(self):
        if self.images is None:
            self.images = read_images(self.data_dir)
        return self.images


def shared_temp_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the per-worker base's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def fault_free_reference(root: Path) -> Reference:
    """Build the reference once per test session (under a file lock, so parallel workers share it)."""
    folder = Path(root) / "reliability-reference"
    summary = folder / "summary.json"
    with FileLock(str(folder) + ".lock"):
        if not summary.exists():
            if folder.exists():
                shutil.rmtree(folder)
            _build_reference(folder)
    figures = json.loads(summary.read_text())
    return Reference(
        folder / "data", figures["requests"], figures["seconds"], figures["busiest_minute"]
    )


def _build_reference(folder: Path) -> None:
    with emulated_run(folder) as run:
        started = time.monotonic()
        run.run_pipeline()
        seconds = time.monotonic() - started
        requests = run.server.stats()
        peaks = {
            family: busiest_window(run.server.request_times(family))
            for family in ("tiles", "entity")
        }
    (folder / "summary.json").write_text(
        json.dumps({"requests": requests, "seconds": seconds, "busiest_minute": peaks})
    )
