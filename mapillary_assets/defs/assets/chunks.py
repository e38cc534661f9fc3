"""Per-chunk assets: metadata, thumbnail downloads and blur scores, one partition per id chunk.

Each partition is resumable: it removes the temporary files a killed attempt left (its own only:
other partitions write into the same folders concurrently), reads what an earlier attempt stored,
does only what is missing, and rewrites its file atomically. Transient failures are stored too,
then fail the partition so "backfill failed partitions" retries exactly those.
"""

import asyncio
import contextlib
from pathlib import Path

import dagster as dg
import pandas as pd

from mapillary_assets.defs.assets.discovery import image_chunks
from mapillary_assets.defs.partitions import chunk_partitions
from mapillary_assets.defs.pools import API_POOL, GPU_POOL
from mapillary_assets.defs.reporting import (
    partition_counts_metadata,
    preview_markdown,
    progress_logger,
)
from mapillary_assets.defs.resources import (
    DataStorageResource,
    MapillaryApiResource,
    PipelineSettings,
)
from mapillary_assets.pipeline import thumbnail_urls
from mapillary_assets.pipeline.blur import analysis_box, read_file, score_images
from mapillary_assets.pipeline.charts import blur_histogram_png, contact_sheet_png, png_markdown
from mapillary_assets.pipeline.chunks import chunk_image_ids
from mapillary_assets.pipeline.download import download_thumbnails, thumbnail_field
from mapillary_assets.pipeline.metadata import fetch_metadata, ids_to_fetch, merge_with_existing
from mapillary_assets.pipeline.thumbnail_shards import FetchedShards
from mapillary_assets.storage import (
    DataLayout,
    Store,
    disk_full_error,
    is_disk_full,
    validate_image_id,
)

CHUNK_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=4)


def _chunk_ids(layout: DataLayout, chunk_key: str) -> list[str]:
    # only this chunk's rows: the assignment holds every id (1.2 M at full scale), read by every chunk run
    return chunk_image_ids(
        layout.store.read_table(layout.chunk_assignment_key, filters=[("chunk", "==", chunk_key)]),
        chunk_key,
    )


def _read_if_exists(store: Store, key: str) -> pd.DataFrame | None:
    return store.read_parquet(key) if store.exists(key) else None


def _remove_leftovers(log, chunk_key: str, store: Store, keys) -> None:
    """A killed attempt of this partition may have left `<file>.tmp-*` beside its files: remove them."""
    removed = store.remove_leftovers_of(keys)
    if removed:
        log.info(f"{chunk_key}: removed {removed} temporary file(s) left by an interrupted attempt")


def _thumbnail_keys(layout: DataLayout, image_ids, size: int):
    for image_id in image_ids:
        try:
            validate_image_id(image_id)
        except ValueError:
            continue  # never turned into a key
        yield layout.thumbnail_key(image_id, size)


def _stored_images(layout: DataLayout, downloads: pd.DataFrame) -> list[Path]:
    return [layout.root / key for key in downloads.loc[downloads["status"] == "ok", "path"]]


@contextlib.contextmanager
def disk_full_as_error(layout: DataLayout, thumbnail_size: int):
    """A write that found the disk full ends the run with one StorageError saying how full and how much
    the remaining thumbnails need (the writes are atomic: nothing half-written stays, a re-run resumes)."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(layout, thumbnail_size) from None


def _fail_if_transient(kind: str, transient_by_chunk: dict[str, int]) -> None:
    failing = {chunk: n for chunk, n in transient_by_chunk.items() if n}
    if failing:
        listed = ", ".join(f"{chunk} ({n})" for chunk, n in failing.items())
        raise dg.Failure(
            description=f"{sum(failing.values())} {kind} failed transiently in {listed}; the rest is stored. "
            "Backfill the failed partitions to retry only what is missing.",
            metadata={"transient_failures": sum(failing.values())},
        )


@dg.asset(
    partitions_def=chunk_partitions,
    deps=[image_chunks],
    group_name="metadata",
    kinds={"python", "parquet"},
    pool=API_POOL,
    backfill_policy=CHUNK_BACKFILL,
    description="Graph API metadata of every image in the chunk (batch lookups of 50 ids), with failed ids "
    "recorded as permanent or transient. The same requests carry the thumbnail URLs, which the chunk's "
    "download step reuses from memory (never stored).",
)
def image_metadata(
    context: dg.AssetExecutionContext,
    mapillary_api: MapillaryApiResource,
    storage: DataStorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    layout = storage.layout
    store = layout.store

    async def fetch_all():
        outcome = {}
        async with mapillary_api.client() as client:
            for key in context.partition_keys:
                rows_key, failures_key = layout.metadata_key(key), layout.metadata_failures_key(key)
                _remove_leftovers(context.log, key, store, [rows_key, failures_key])
                rows, failures = (
                    _read_if_exists(store, rows_key),
                    _read_if_exists(store, failures_key),
                )
                todo = ids_to_fetch(_chunk_ids(layout, key), rows, failures)
                result = await fetch_metadata(
                    client,
                    todo,
                    progress=progress_logger(context.log, key),
                    thumbnail_field=thumbnail_field(settings.thumbnail_size),
                )
                thumbnail_urls.remember(layout.root, key, result.thumbnail_urls)
                rows, failures = merge_with_existing(rows, failures, result)
                store.write_parquet(rows_key, rows)
                store.write_parquet(failures_key, failures)
                outcome[key] = (rows, failures, len(todo), result.requests)
        return outcome

    with disk_full_as_error(layout, settings.thumbnail_size):
        outcome = asyncio.run(fetch_all())
    rows = pd.concat([r for r, *_ in outcome.values()])
    failures = pd.concat([f for _, f, *_ in outcome.values()])
    fetched, requests = sum(o[2] for o in outcome.values()), sum(o[3] for o in outcome.values())
    context.log.info(
        f"metadata: {len(rows):,} images stored, {fetched:,} fetched with {requests:,} requests, "
        f"{len(failures):,} failed ({int(failures['transient'].sum()) if len(failures) else 0} transient)"
    )
    _fail_if_transient("ids", {k: int(o[1]["transient"].sum()) for k, o in outcome.items()})
    counts = {
        key: {
            "images": len(r),
            "fetched_now": todo,
            "requests": n,
            "failed_permanent": int((~f["transient"]).sum()) if len(f) else 0,
        }
        for key, (r, f, todo, n) in outcome.items()
    }
    return dg.MaterializeResult(
        metadata={
            **partition_counts_metadata(counts),
            "preview": dg.MetadataValue.md(preview_markdown(rows)),
        }
    )


@dg.asset(
    partitions_def=chunk_partitions,
    deps=[image_metadata],
    group_name="images",
    kinds={"python", "jpeg"},
    pool=API_POOL,
    backfill_policy=CHUNK_BACKFILL,
    description="Thumbnails of the chunk's images, fetched from freshly resolved URLs, verified as complete "
    "JPEGs and written atomically into a sharded folder tree (a local data dir) or as the chunk's one tar "
    "shard (a bucket), whose offsets the downloads rows carry.",
)
def thumbnail_downloads(
    context: dg.AssetExecutionContext,
    mapillary_api: MapillaryApiResource,
    storage: DataStorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    layout = storage.layout
    store = layout.store

    async def download_all():
        outcome = {}
        async with mapillary_api.client() as client:
            for key in context.partition_keys:
                failures = _read_if_exists(store, layout.metadata_failures_key(key))
                unknown = (
                    set(failures.loc[~failures["transient"], "image_id"])
                    if failures is not None
                    else set()
                )
                chunk_ids = _chunk_ids(layout, key)
                _remove_leftovers(
                    context.log,
                    key,
                    store,
                    [
                        layout.downloads_key(key),
                        *_thumbnail_keys(layout, chunk_ids, settings.thumbnail_size),
                    ],
                )
                ids = [i for i in chunk_ids if i not in unknown]
                frame = await download_thumbnails(
                    client,
                    layout,
                    ids,
                    size=settings.thumbnail_size,
                    concurrency=settings.download_concurrency,
                    progress=progress_logger(context.log, key, unit="images"),
                    known_urls=thumbnail_urls.take(layout.root, key),
                    chunk_key=key,
                )
                store.write_parquet(layout.downloads_key(key), frame)
                outcome[key] = frame
        return outcome

    with disk_full_as_error(layout, settings.thumbnail_size):
        outcome = asyncio.run(download_all())
    frame = pd.concat(outcome.values())
    ok = int((frame["status"] == "ok").sum())
    context.log.info(
        f"downloads: {ok:,}/{len(frame):,} thumbnails on disk, {len(frame) - ok:,} failed"
    )
    _fail_if_transient("downloads", {k: int(f["transient"].sum()) for k, f in outcome.items()})
    counts = {
        key: {
            "thumbnails": int((f["status"] == "ok").sum()),
            "failed": int((f["status"] != "ok").sum()),
            "bytes": int(f["bytes"].sum()),
        }
        for key, f in outcome.items()
    }
    return dg.MaterializeResult(
        metadata={**partition_counts_metadata(counts), "size_px": settings.thumbnail_size}
    )


@dg.asset(
    partitions_def=chunk_partitions,
    deps=[thumbnail_downloads],
    group_name="images",
    kinds={"python", "pytorch"},
    pool=GPU_POOL,
    backfill_policy=CHUNK_BACKFILL,
    description="Blur scores per thumbnail: variance of the Laplacian and Tenengrad on grayscale at the "
    "downloaded thumbnail size's 4:3 box (Kornia on CUDA when available, else the fastest CPU path), and `is_blurry`.",
)
def blur_scores(
    context: dg.AssetExecutionContext, storage: DataStorageResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    layout = storage.layout
    store = layout.store
    box = analysis_box(settings.thumbnail_size)
    frames, paths = {}, []
    # a local data dir's thumbnails are read as files; a bucket's from its chunks' shards, fetched once each
    with FetchedShards(layout) as shards:
        read = read_file if layout.is_local else shards.read
        for key in context.partition_keys:
            _remove_leftovers(context.log, key, store, [layout.blur_key(key)])
            downloads = store.read_parquet(layout.downloads_key(key))
            ok = _stored_images(layout, downloads) if layout.is_local else shards.add(downloads)
            scores = score_images(
                ok,
                read=read,
                backend=settings.blur_backend,
                threshold=settings.blur_threshold,
                analysis_size=box,
                progress=progress_logger(context.log, key, unit="images"),
            )
            with disk_full_as_error(layout, settings.thumbnail_size):
                store.write_parquet(layout.blur_key(key), scores)
            frames[key] = scores
            paths.extend(ok)  # scores come one row per path, in input order
        contact_sheet = contact_sheet_png(
            paths,
            pd.concat(frames.values())["blur_value"],
            settings.blur_threshold,
            read=read,
        )
    scores = pd.concat(frames.values())
    blurry = int(scores["is_blurry"].sum())
    context.log.info(
        f"blur: {len(scores):,} images scored, {blurry:,} blurry (threshold {settings.blur_threshold})"
    )
    return dg.MaterializeResult(
        metadata={
            **partition_counts_metadata(
                {
                    key: {"scored": len(f), "blurry": int(f["is_blurry"].sum())}
                    for key, f in frames.items()
                }
            ),
            "backend": str(scores["backend"].iloc[0]) if len(scores) else settings.blur_backend,
            "analysis_size": f"{box[0]}x{box[1]}",  # the threshold applies at this size
            "histogram": dg.MetadataValue.md(
                png_markdown(
                    blur_histogram_png(scores["blur_value"], settings.blur_threshold),
                    "blur_value histogram",
                )
            ),
            "contact_sheet": dg.MetadataValue.md(
                png_markdown(contact_sheet, "blurriest and sharpest")
            ),
        }
    )
