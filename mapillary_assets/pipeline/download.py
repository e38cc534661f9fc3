"""Thumbnail download: fresh URLs, bounded concurrency, verified JPEGs, atomic sharded files (a local
data dir) or one tar shard per chunk (a bucket data dir, pipeline/thumbnail_shards.py).

Dagster-free. Thumbnail URLs are signed and expire (`oe=` hex timestamp; expired -> 403 "URL signature
expired"), so they are never stored. URLs the chunk's metadata request already carried (`known_urls`,
in memory, see pipeline/thumbnail_urls.py) are downloaded first while they stay valid with a safety
margin; every other id is resolved through the Graph API in batches of 50 just before its downloads
are queued (the queue holds at most `concurrency` URLs), and an id whose URL expires anyway is
re-resolved on its own, a bounded number of times.

Every downloaded body is verified before it is written (`jpeg_verification`: marker checks always, a
strict decode of the whole stream with `decode_check=True`, off by default for its CPU cost).
A body failing the checks is fetched again (a truncated transfer is usually transient); after
`MAX_JPEG_ATTEMPTS` bad bodies the id is recorded as failed with transient=True.

Bodies are written on the event loop, not in a thread: a 240 KB write into the page cache takes well
under a millisecond, while a thread hop per file cost more CPU than it saved (bench_download on 2 cores:
1.4-1.55 vs 1.9-2.0 ms of CPU per image, the event loop being the bottleneck).

Existing files that pass `is_complete_jpeg` count as downloaded without any request, so re-runs only
fetch what is missing or damaged. In a bucket the ids its chunk's committed shard holds count as
downloaded (by the chunk's downloads rows: no request per image), and the rows gain `offset`/`length`
in the shard (SHARD_COLUMNS); a local data dir's rows keep COLUMNS alone, its outputs unchanged.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd

from mapillary_assets.api.errors import (
    AuthError,
    MapillaryError,
    PermanentError,
    RequestTooLargeError,
    UrlExpiredError,
)
from mapillary_assets.pipeline.concurrency import run_all
from mapillary_assets.pipeline.jpeg_verification import is_complete_jpeg, verify_jpeg
from mapillary_assets.pipeline.thumbnail_shards import SHARD_COLUMNS, ChunkShard, chunk_shard
from mapillary_assets.pipeline.thumbnail_urls import SignedUrl
from mapillary_assets.storage import DataLayout, validate_image_id

THUMBNAIL_SIZES: tuple[int | str, ...] = (256, 1024, 2048, "original")
RESOLVE_BATCH_SIZE = 50  # Graph API `?ids=` limit
MAX_URL_REFRESHES = 3  # fresh URLs asked for one id after UrlExpiredError
MAX_JPEG_ATTEMPTS = 3  # downloads of one id whose body fails verification (1 + 2 retries)
IO_THREADS = 8  # checks of files already on disk and optional decode checks
_EXISTING_CHUNK = 256  # ids per thread task when checking files already on disk
COLUMNS = ["image_id", "path", "bytes", "status", "reason", "transient"]

Progress = Callable[[int, int, int], None]


def thumbnail_field(size: int | str) -> str:
    """Graph API field holding the thumbnail URL of `size` (256, 1024, 2048 or "original")."""
    if size not in THUMBNAIL_SIZES or isinstance(size, bool):
        raise ValueError(f"unsupported thumbnail size {size!r}: expected one of {THUMBNAIL_SIZES}")
    return f"thumb_{size}_url"


@dataclass
class _Outcome:
    image_id: str
    path: str | None = None
    bytes: int = 0
    status: str = "failed"
    reason: str | None = None
    transient: bool = False
    offset: int | None = None  # in the chunk's shard (a bucket data dir)
    length: int | None = None


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    detail = str(exc) or type(exc).__name__
    return (
        f"{type(exc).__name__} (code {code}): {detail}"
        if code is not None
        else f"{type(exc).__name__}: {detail}"
    )


class _ThumbnailDownloader:
    def __init__(
        self,
        client,
        layout: DataLayout,
        size: int | str,
        concurrency: int,
        progress: Progress | None,
        total: int,
        executor: ThreadPoolExecutor,
        decode_check: bool,
        known_urls: Mapping[str, SignedUrl],
        shard: ChunkShard | None,
    ) -> None:
        self.client = client
        self.layout = layout
        # One store for the whole chunk: its put is the per-image write (a temp+rename file on a local
        # disk); in a bucket the chunk's shard takes the images instead.
        self.store = layout.store
        self.shard = shard
        self.size = size
        self.field = thumbnail_field(size)
        self.concurrency = concurrency
        self.progress = progress
        self.total = total
        self.executor = executor
        self.decode_check = decode_check
        self.known_urls = known_urls
        self.root = os.fspath(layout.root)
        self.relatives: dict[
            str, str
        ] = {}  # id -> its file relative to the root, built once per id
        self.outcomes: dict[str, _Outcome] = {}
        self.failed = 0

    # bookkeeping
    def record(self, outcome: _Outcome) -> None:
        self.outcomes[outcome.image_id] = outcome
        if outcome.status != "ok":
            self.failed += 1
        if self.progress is not None:
            self.progress(len(self.outcomes), self.total, self.failed)

    def relative(self, image_id: str) -> str:
        relative = self.relatives.get(image_id)
        if relative is None:
            relative = self.relatives[image_id] = self.layout.thumbnail_relative_path(
                image_id, self.size
            )
        return relative

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # step 1: what is already on disk
    def _existing_size(self, image_id: str) -> int | None:
        try:
            data = self.store.get(self.relative(image_id))
        except OSError:
            return None
        return len(data) if is_complete_jpeg(data) else None

    async def skip_existing(self, image_ids: list[str]) -> list[str]:
        if self.shard is not None:
            return self.skip_stored_in_shard(image_ids)
        for image_id in image_ids:  # on the loop, before the threads read self.relatives
            self.relative(image_id)

        def sizes_of(chunk: list[str]) -> list[int | None]:
            return [self._existing_size(i) for i in chunk]

        chunks = [
            image_ids[i : i + _EXISTING_CHUNK] for i in range(0, len(image_ids), _EXISTING_CHUNK)
        ]
        sizes = [
            size
            for part in await asyncio.gather(*(self.in_thread(sizes_of, c) for c in chunks))
            for size in part
        ]
        missing = []
        for image_id, size in zip(image_ids, sizes):
            if size is None:
                missing.append(image_id)
            else:
                self.record(_Outcome(image_id, self.relative(image_id), size, "ok"))
        return missing

    def skip_stored_in_shard(self, image_ids: list[str]) -> list[str]:
        stored = self.shard.stored()
        for image_id in image_ids:
            if image_id in stored:
                offset, length = stored[image_id]
                self.record(
                    _Outcome(image_id, self.shard.key, length, "ok", offset=offset, length=length)
                )
        return [i for i in image_ids if i not in stored]

    # step 2: fresh URLs
    async def resolve(self, image_ids: Sequence[str]) -> tuple[dict[str, str], list[_Outcome]]:
        """Fresh URLs for `image_ids`; ids without one come back as failure outcomes. A batch that the
        API rejects as a whole (one unknown id fails all 50) is bisected to isolate the bad ids."""
        try:
            found = await self.client.get_images(list(image_ids), [self.field])
        except AuthError:
            raise
        except (PermanentError, RequestTooLargeError) as exc:
            if len(image_ids) > 1:
                middle = len(image_ids) // 2
                left_urls, left_failures = await self.resolve(image_ids[:middle])
                right_urls, right_failures = await self.resolve(image_ids[middle:])
                return {**left_urls, **right_urls}, left_failures + right_failures
            transient = isinstance(exc, RequestTooLargeError)
            return {}, [
                _Outcome(
                    image_ids[0], reason=f"URL lookup failed: {_describe(exc)}", transient=transient
                )
            ]
        except MapillaryError as exc:
            reason = f"URL lookup failed: {_describe(exc)}"
            return {}, [
                _Outcome(i, reason=reason, transient=bool(exc.transient)) for i in image_ids
            ]
        urls: dict[str, str] = {}
        failures: list[_Outcome] = []
        for image_id in image_ids:
            url = (found.get(image_id) or {}).get(self.field)
            if url:
                urls[image_id] = url
            else:
                failures.append(
                    _Outcome(image_id, reason=f"no {self.field} for this image", transient=False)
                )
        return urls, failures

    async def resolver(self, batches: Iterable[list[str]], queue: asyncio.Queue) -> None:
        for batch in batches:  # shared iterator: several resolvers take turns
            urls, failures = await self.resolve(batch)
            for outcome in failures:
                self.record(outcome)
            for image_id, url in urls.items():
                await queue.put((image_id, url))

    # step 3: download, verify, write
    async def fetch(self, image_id: str, url: str) -> _Outcome:
        relative = self.relative(image_id)
        refreshes = 0
        bad_bodies = 0
        while True:
            try:
                data = await self.client.get_thumbnail(url)
            except UrlExpiredError as exc:
                if refreshes >= MAX_URL_REFRESHES:
                    return _Outcome(
                        image_id,
                        reason=f"thumbnail URL expired {refreshes + 1} times: {_describe(exc)}",
                        transient=True,
                    )
                refreshes += 1
                urls, failures = await self.resolve([image_id])
                if failures:
                    return failures[0]
                url = urls[image_id]
                continue
            except AuthError:
                raise
            except MapillaryError as exc:
                return _Outcome(
                    image_id,
                    reason=f"download failed: {_describe(exc)}",
                    transient=bool(exc.transient),
                )
            # The marker checks (~0.09 ms) run on the event loop: a thread hop would cost more.
            problem = verify_jpeg(data)
            if problem is None and self.decode_check:
                problem = await self.in_thread(verify_jpeg, data, True)
            if problem is None:
                if self.shard is not None:  # a local append to the spool, on the loop
                    self.shard.add(image_id, data)
                    return _Outcome(image_id, self.shard.key, len(data), "ok")
                # on the loop (see above); not fsynced: re-verified every run
                self.store.put(relative, data, durable=False)
                return _Outcome(image_id, relative, len(data), "ok")
            bad_bodies += 1
            if bad_bodies >= MAX_JPEG_ATTEMPTS:
                return _Outcome(
                    image_id, reason=f"{problem}, {bad_bodies} downloads", transient=True
                )

    def create_shard_folders(self, image_ids: list[str]) -> None:
        """Each shard folder once per run, so no write pays for a failed open and a mkdir."""
        if not self.layout.is_local:
            return  # a bucket has no folders
        folders = {self.relative(i).rpartition("/")[0] for i in image_ids}
        for parent in {folder.rpartition("/")[0] for folder in folders}:
            os.makedirs(f"{self.root}/{parent}", exist_ok=True)
        for folder in folders:
            try:
                os.mkdir(f"{self.root}/{folder}")
            except FileExistsError:
                pass

    async def downloader(self, reusable: Iterator[tuple[str, str]], queue: asyncio.Queue) -> None:
        # URLs from the metadata request first: no lookup, no queue hop (a shared iterator)
        for image_id, url in reusable:
            self.record(await self.fetch(image_id, url))
        while True:
            item = await queue.get()
            if item is None:
                return
            self.record(await self.fetch(*item))

    async def run(self, image_ids: list[str]) -> None:
        missing = await self.skip_existing(image_ids)
        if not missing:
            return
        self.create_shard_folders(missing)
        reusable = [(i, self.known_urls[i].url) for i in missing if self._reusable(i)]
        to_resolve = [i for i in missing if not self._reusable(i)]
        batches = iter(
            [
                to_resolve[i : i + RESOLVE_BATCH_SIZE]
                for i in range(0, len(to_resolve), RESOLVE_BATCH_SIZE)
            ]
        )
        # one download in flight per worker: the workers bound the requests to `concurrency`
        workers = max(1, min(self.concurrency, len(missing)))
        # A bounded queue keeps URLs fresh: a URL waits for at most one round of downloads.
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.concurrency)
        resolver_count = min(4, -(-len(to_resolve) // RESOLVE_BATCH_SIZE))

        async def resolve_all() -> None:
            await asyncio.gather(*(self.resolver(batches, queue) for _ in range(resolver_count)))
            for _ in range(workers):
                await queue.put(None)

        shared = iter(reusable)
        await run_all([resolve_all(), *(self.downloader(shared, queue) for _ in range(workers))])

    def commit_shard(self) -> None:
        """Upload the chunk's shard (before the caller writes the downloads rows) and give the images
        stored now their place in it (a bucket data dir only)."""
        if self.shard is None:
            return
        ranges = self.shard.commit()
        for outcome in self.outcomes.values():
            if outcome.status == "ok" and outcome.offset is None:
                outcome.offset, outcome.length = ranges[outcome.image_id]

    def _reusable(self, image_id: str) -> bool:
        known = self.known_urls.get(image_id)
        return known is not None and known.usable()


async def download_thumbnails(
    client,
    layout: DataLayout,
    image_ids: Iterable[str],
    size: int | str = 1024,
    concurrency: int = 64,
    progress: Progress | None = None,
    decode_check: bool = False,
    known_urls: Mapping[str, SignedUrl] | None = None,
    chunk_key: str | None = None,
) -> pd.DataFrame:
    """Download the `size` thumbnail of every id to layout's sharded thumbnail path (a local data dir)
    or into the tar shard of `chunk_key` (a bucket data dir: required there), uploaded before this returns.

    Returns one row per distinct id, in input order: image_id, path (relative to layout.root; None on
    failure), bytes, status ("ok"|"failed"), reason, transient. Raises ValueError for a non-digit id or an
    unsupported size before any path is built or request made; AuthError propagates (fatal).
    `decode_check` adds a strict decode of every body to the marker checks (see module docstring).
    `known_urls` (from the metadata request, pipeline/thumbnail_urls.py) are used while they stay valid
    for `SAFETY_MARGIN_S`; the other ids are resolved in batches, and a URL answering 403 expired is
    re-resolved for its id alone. In a bucket the rows also carry `offset` and `length` in the shard
    (path: the shard's key; null for failed rows).
    """
    thumbnail_field(size)  # validates size before anything else happens
    ids = list(dict.fromkeys(validate_image_id(i) for i in image_ids))
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    shard = chunk_shard(layout, chunk_key, size)
    with ThreadPoolExecutor(
        max_workers=min(IO_THREADS, concurrency), thread_name_prefix="thumbnail-io"
    ) as executor:
        downloader = _ThumbnailDownloader(
            client,
            layout,
            size,
            concurrency,
            progress,
            len(ids),
            executor,
            decode_check,
            known_urls or {},
            shard,
        )
        try:
            await downloader.run(ids)
            downloader.commit_shard()
        finally:
            if shard is not None:
                shard.discard()
    return _result_frame([downloader.outcomes[i] for i in ids], with_ranges=shard is not None)


def _result_frame(outcomes: list[_Outcome], with_ranges: bool) -> pd.DataFrame:
    ranges = {c: pd.Series([getattr(o, c) for o in outcomes], dtype="Int64") for c in SHARD_COLUMNS}
    return pd.DataFrame(
        {
            "image_id": pd.Series([o.image_id for o in outcomes], dtype=object),
            "path": pd.Series([o.path for o in outcomes], dtype=object),
            "bytes": pd.Series([o.bytes for o in outcomes], dtype="int64"),
            "status": pd.Series([o.status for o in outcomes], dtype=object),
            "reason": pd.Series([o.reason for o in outcomes], dtype=object),
            "transient": pd.Series([o.transient for o in outcomes], dtype=bool),
            **(ranges if with_ranges else {}),
        },
        columns=COLUMNS + SHARD_COLUMNS if with_ranges else COLUMNS,
    )
