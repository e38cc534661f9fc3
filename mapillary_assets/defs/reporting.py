"""What assets report: progress log lines a person can read, and materialisation metadata."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd


def progress_logger(
    log: logging.Logger | Any, label: str, unit: str = "ids", every_s: float = 5.0
) -> Callable[[int, int, int], None]:
    """A `progress(done, total, failed)` callback that logs e.g.
    "chunk-000003: 3,000/5,000 ids, 412 ids/s, 2 failed" at most every `every_s` seconds."""
    started = time.monotonic()
    last_logged = [0.0]

    def report(done: int, total: int, failed: int) -> None:
        now = time.monotonic()
        if done < total and now - last_logged[0] < every_s:
            return
        last_logged[0] = now
        rate = done / max(now - started, 1e-9)
        log.info(f"{label}: {done:,}/{total:,} {unit}, {rate:,.0f} {unit}/s, {failed:,} failed")

    return report


PREVIEW_ROWS = 10


def preview_rows(frame: pd.DataFrame, rows: int = PREVIEW_ROWS) -> pd.DataFrame:
    """The first `rows` rows as a frame of their own: a `head()` shares its parent's column buffers
    (numpy blocks, Arrow chunks) and so keeps the whole frame alive."""
    head = frame.head(rows)
    return pd.DataFrame(
        {name: pd.array(head[name].tolist(), dtype=head[name].dtype) for name in head.columns}
    )


def preview_markdown(
    frame: pd.DataFrame, rows: int = PREVIEW_ROWS, columns: list[str] | None = None
) -> str:
    shown = frame[columns] if columns else frame
    return shown.head(rows).to_markdown(index=False) if len(shown) else "(no rows)"


def partition_counts_metadata(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Materialisation metadata from each partition's numbers (`{partition: {name: count}}`).

    A ranged run records one materialisation per partition, all with the same metadata (Dagster has no
    per-partition metadata there, dagster-io/dagster#18123). So a single partition gets its own numbers,
    and a ranged run its totals as `run_<name>` beside a `per_partition` table: no partition ever shows
    another's numbers as its own."""
    if len(counts) <= 1:
        return dict(next(iter(counts.values()), {}))
    names = list(next(iter(counts.values())))
    table = (
        pd.DataFrame.from_dict(counts, orient="index")[names].rename_axis("partition").reset_index()
    )
    return {
        "partitions_in_run": len(counts),
        **{f"run_{name}": int(table[name].sum()) for name in names},
        "per_partition": dg.MetadataValue.md(table.to_markdown(index=False)),
    }
