"""Progress of the chunk stages while the pipeline runs, for the CLI (Dagster-free).

The runs execute in forked worker processes (runners/local.py), so the driver cannot see their
counters; it polls what they leave in the data dir instead: each chunk's stage file is written once,
atomically, when the chunk's stage is done, and its row count sits in the Parquet footer. Polling a
few hundred footers (cached by modification time) every couple of seconds costs next to nothing. The
granularity is a chunk (MAPILLARY_CHUNK_SIZE images).

In a terminal the stages show as a live display (rich): images done/total, rate, ETA. Elsewhere
(a pipe, CI, nohup) each change is one plain line, so logs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from mapillary_assets.storage import DataLayout

POLL_INTERVAL_S = 2.0


def _stage_folder(layout: DataLayout, stage: str) -> str:
    return {
        "metadata": layout.metadata_folder,
        "thumbnails": layout.downloads_folder,
        "blur": layout.blur_folder,
    }[stage]


class StageCounts:
    """Images done per stage (rows of the stage's chunk files) and the total (rows of the assignment)."""

    def __init__(self, layout: DataLayout):
        self.layout = layout
        self._rows: dict[str, tuple[float, int]] = {}  # key -> (modified, rows)

    def _row_count(self, key: str) -> int:
        store = self.layout.store
        try:
            modified = store.modified(key)
            if modified is None:
                return 0
            cached = self._rows.get(key)
            if cached is None or cached[0] != modified:
                cached = (modified, store.parquet_rows(key) or 0)
                self._rows[key] = cached
            return cached[1]
        except (OSError, ValueError):  # gone, or being replaced: counted at the next poll
            return 0

    def total(self) -> int:
        return self._row_count(self.layout.chunk_assignment_key)

    def done(self, stage: str) -> int:
        folder = _stage_folder(self.layout, stage)
        return sum(self._row_count(key) for key in self.layout.store.list(folder))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class _StageState:
    def __init__(self, done: int, now: float):
        self.first_done, self.started, self.done = done, now, done

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0

    def eta(self, total: int, now: float) -> str:
        rate = self.rate(now)
        if self.done >= total:
            return "done"
        return _duration((total - self.done) / rate) if rate > 0 else "?"


class ProgressDisplay:
    """`with ProgressDisplay(layout, stages):` shows the stages' progress until the block ends.
    `terminal` None: a live display when `stream` is a terminal, plain lines otherwise."""

    def __init__(
        self,
        layout: DataLayout,
        stages: Sequence[str],
        stream: TextIO | None = None,
        terminal: bool | None = None,
        interval_s: float = POLL_INTERVAL_S,
    ):
        self.counts = StageCounts(layout)
        self.stages = list(stages)
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.interval_s = interval_s
        self._states: dict[str, _StageState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressDisplay:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
            )

            self._live = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("images  {task.fields[rate]}  ETA {task.fields[eta]}"),
                console=Console(file=self.stream, force_terminal=True),
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        self._thread = threading.Thread(target=self._poll, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.update()  # the final counts
        if self._live is not None:
            self._live.stop()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.update()

    def update(self) -> None:
        """Read the counts once and show what changed."""
        total = self.counts.total()
        if not total:
            return  # before chunking: nothing to count yet
        now = time.monotonic()
        for stage in self.stages:
            done = min(self.counts.done(stage), total)
            state = self._states.get(stage)
            if state is None:
                state = self._states[stage] = _StageState(done, now)
            elif done == state.done and stage in self._tasks:
                continue
            state.done = done
            rate, eta = f"{state.rate(now):,.1f}/s", state.eta(total, now)
            if self._live is not None:
                if stage not in self._tasks:
                    self._tasks[stage] = self._live.add_task(stage, total=total, rate="", eta="")
                self._live.update(
                    self._tasks[stage], completed=done, total=total, rate=rate, eta=eta
                )
            else:
                self._tasks.setdefault(stage, 0)
                print(
                    f"progress: {stage} {done:,}/{total:,} images, {rate}, ETA {eta}",
                    file=self.stream,
                    flush=True,
                )
        if self._live is not None:
            self._live.refresh()
