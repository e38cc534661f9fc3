"""Graph API metadata of image ids: batches of 50 (`?ids=`), failures recorded instead of raised.

A batch that fails because one of its ids is unknown (code 100) is bisected until the bad ids are
isolated; every other id of the batch is still fetched. Ids the API leaves out of an answer fail
permanently ("not returned"). Transient errors that outlast the client's retries are recorded with
`transient=True`: the caller decides (the Dagster asset stores everything, then fails the
partition so a backfill retries just those). An AuthError is fatal and propagates at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from mapillary_assets.api.entity_decoders import (
    DEFAULT_IMAGE_FIELDS,
    IMAGE_SCHEMA,
    decode_image_entity,
    entities_to_table,
)
from mapillary_assets.api.errors import (
    AuthError,
    MapillaryError,
    PermanentError,
    RequestTooLargeError,
)
from mapillary_assets.pipeline.concurrency import run_all
from mapillary_assets.pipeline.thumbnail_urls import SignedUrl, signed_url
from mapillary_assets.storage import validate_image_id

log = logging.getLogger(__name__)

BATCH_SIZE = 50  # the API's maximum for `?ids=`
UNKNOWN_ID_SUBCODE = 33
FAILURE_COLUMNS = {"image_id": "str", "reason": "str", "transient": "bool", "code": "Int64"}
NOT_RETURNED = "not returned by the API"

Progress = Callable[[int, int, int], None]


@dataclass
class MetadataResult:
    rows: pd.DataFrame  # IMAGE_SCHEMA columns, one row per fetched id
    failures: pd.DataFrame  # FAILURE_COLUMNS, one row per failed id
    requests: int  # `?ids=` calls made (the client's own retries not counted)
    seconds: float = 0.0
    # id -> signed thumbnail URL when `thumbnail_field` was asked for; in memory only, never in `rows`
    thumbnail_urls: dict[str, SignedUrl] = dataclasses.field(default_factory=dict)

    @property
    def transient_failures(self) -> int:
        return int(self.failures["transient"].sum()) if len(self.failures) else 0


# ---------------------------------------------------------------------------------------------
# frames


def _pandas_dtype(arrow_type: pa.DataType):
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None  # floats keep NaN for null, strings become `str`, timestamps datetime64[ms, UTC]


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_pandas_dtype)


def metadata_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Decoded entity rows -> DataFrame with IMAGE_SCHEMA columns and stable dtypes (nullable ints
    and bools), so every chunk's file has the same Parquet schema even when a column is all null."""
    return _table_to_frame(entities_to_table(rows))


def conform_metadata(frame: pd.DataFrame | None) -> pd.DataFrame:
    """A stored metadata frame (as `read_parquet` returns it) in the dtypes `metadata_frame` gives."""
    if frame is None or len(frame) == 0:
        return metadata_frame([])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    arrays = []
    for field in IMAGE_SCHEMA:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(len(table), field.type))
    return _table_to_frame(pa.Table.from_arrays(arrays, schema=IMAGE_SCHEMA))


def failures_frame(records: Sequence[tuple[str, str, bool, int | None]] = ()) -> pd.DataFrame:
    ids, reasons, transient, codes = zip(*records) if records else ((), (), (), ())
    return pd.DataFrame(
        {
            "image_id": pd.Series(ids, dtype="str"),
            "reason": pd.Series(reasons, dtype="str"),
            "transient": pd.Series(transient, dtype="bool"),
            "code": pd.Series(codes, dtype="Int64"),
        }
    )


def conform_failures(frame: pd.DataFrame | None) -> pd.DataFrame:
    if frame is None or len(frame) == 0:
        return failures_frame()
    return frame.loc[:, list(FAILURE_COLUMNS)].astype(FAILURE_COLUMNS).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# fetching


async def fetch_metadata(
    client,
    image_ids: Iterable[str],
    fields: Sequence[str] = DEFAULT_IMAGE_FIELDS,
    concurrency: int = 32,
    progress: Progress | None = None,
    thumbnail_field: str | None = None,
) -> MetadataResult:
    """Metadata of `image_ids` (duplicates fetched once) with `concurrency` batches in flight; the
    client's shared rate limiter paces them. `thumbnail_field` (e.g. "thumb_256_url") is asked for in the
    same requests and returned in `thumbnail_urls`, apart from the rows (see pipeline/thumbnail_urls.py)."""
    started = time.perf_counter()
    fetcher = _BatchFetcher(client, tuple(fields), thumbnail_field)
    ids: list[str] = []
    for image_id in dict.fromkeys(str(i) for i in image_ids):
        try:
            ids.append(validate_image_id(image_id))
        except ValueError as exc:
            fetcher.failures.append((image_id, str(exc), False, None))
    batches = [ids[i : i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
    total = len(ids) + len(fetcher.failures)
    done = len(fetcher.failures)
    queue = iter(batches)

    async def worker() -> None:
        nonlocal done
        for batch in queue:  # a shared iterator: each batch goes to exactly one worker
            await fetcher.fetch(batch)
            done += len(batch)
            if progress is not None:
                progress(done, total, len(fetcher.failures))

    await run_all(worker() for _ in range(min(max(1, concurrency), len(batches))))
    order = {image_id: i for i, image_id in enumerate(ids)}
    fetcher.rows.sort(key=lambda row: order.get(row["image_id"], len(order)))
    return MetadataResult(
        rows=metadata_frame(fetcher.rows),
        failures=failures_frame(fetcher.failures),
        requests=fetcher.requests,
        seconds=time.perf_counter() - started,
        thumbnail_urls=fetcher.thumbnail_urls,
    )


class _BatchFetcher:
    def __init__(self, client, fields: tuple[str, ...], thumbnail_field: str | None = None):
        self.client, self.thumbnail_field = client, thumbnail_field
        self.fields = fields if thumbnail_field is None else (*fields, thumbnail_field)
        self.thumbnail_urls: dict[str, SignedUrl] = {}
        self.rows: list[dict] = []
        self.failures: list[tuple[str, str, bool, int | None]] = []
        self.requests = 0

    async def fetch(self, batch: list[str]) -> None:
        self.requests += 1
        try:
            found = await self.client.get_images(batch, self.fields)
        except AuthError:
            raise
        except (PermanentError, RequestTooLargeError) as exc:
            if _is_field_error(exc):
                raise  # every batch would fail the same way: the field list is wrong, not an id
            if len(batch) == 1:
                self._fail(batch, str(exc), False, exc.code)
                return
            middle = len(batch) // 2
            await self.fetch(batch[:middle])
            await self.fetch(batch[middle:])
            return
        except (
            MapillaryError
        ) as exc:  # transient errors that outlasted the client's retries, and the like
            self._fail(batch, str(exc), exc.transient, exc.code)
            return
        for image_id in batch:
            entity = found.get(image_id)
            if entity is None:
                self._fail([image_id], NOT_RETURNED, False, None)
            else:
                url = entity.pop(self.thumbnail_field, None) if self.thumbnail_field else None
                if isinstance(url, str) and url:
                    self.thumbnail_urls[image_id] = signed_url(url)
                row = decode_image_entity(entity)
                row["image_id"] = image_id
                self.rows.append(row)

    def _fail(self, ids: Sequence[str], reason: str, transient: bool, code: int | None) -> None:
        self.failures.extend((image_id, reason, bool(transient), code) for image_id in ids)


def _is_field_error(exc: MapillaryError) -> bool:
    """Code 100 without the unknown-id subcode, naming a field ("Tried accessing nonexisting field")."""
    return (
        isinstance(exc, PermanentError)
        and exc.code == 100
        and exc.subcode != UNKNOWN_ID_SUBCODE
        and "field" in str(exc).lower()
    )


async def fetch_sequence_image_ids(
    client, sequence_ids: Iterable[str], concurrency: int = 16
) -> dict[str, list[str]]:
    """Image ids of each sequence in capture order. An unknown sequence maps to [] (with a
    warning); transient errors that outlast the client's retries and AuthError propagate."""
    unique = list(dict.fromkeys(str(s) for s in sequence_ids))
    result: dict[str, list[str]] = {}
    queue = iter(unique)

    async def worker() -> None:
        for sequence_id in queue:
            try:
                result[sequence_id] = [
                    str(i) for i in await client.get_sequence_image_ids(sequence_id)
                ]
            except PermanentError as exc:
                log.warning("sequence %s: %s; treating it as empty", sequence_id, exc)
                result[sequence_id] = []

    await run_all(worker() for _ in range(min(max(1, concurrency), len(unique))))
    return {sequence_id: result[sequence_id] for sequence_id in unique}


# ---------------------------------------------------------------------------------------------
# resuming a chunk


def ids_to_fetch(
    chunk_ids: Iterable[str],
    existing_rows: pd.DataFrame | None,
    existing_failures: pd.DataFrame | None,
) -> list[str]:
    """The chunk's ids still missing: neither fetched already nor failed permanently (ids that
    failed transiently are fetched again). Order kept, duplicates dropped."""
    skip: set[str] = set()
    if existing_rows is not None and len(existing_rows):
        skip.update(existing_rows["image_id"].astype(str))
    if existing_failures is not None and len(existing_failures):
        permanent = ~existing_failures["transient"].astype(bool)
        skip.update(existing_failures.loc[permanent, "image_id"].astype(str))
    return [image_id for image_id in dict.fromkeys(map(str, chunk_ids)) if image_id not in skip]


def merge_with_existing(
    existing_rows: pd.DataFrame | None, existing_failures: pd.DataFrame | None, new: MetadataResult
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, failures) of a chunk after a re-run: each id at most once in either frame; a newer
    outcome replaces an older one, and an id that now has a row has no failure."""
    rows = pd.concat(
        [conform_metadata(existing_rows), conform_metadata(new.rows)], ignore_index=True
    )
    rows = rows.drop_duplicates("image_id", keep="last").reset_index(drop=True)
    failures = pd.concat(
        [conform_failures(existing_failures), conform_failures(new.failures)], ignore_index=True
    )
    failures = failures.drop_duplicates("image_id", keep="last")
    failures = failures[~failures["image_id"].isin(set(rows["image_id"]))].reset_index(drop=True)
    return rows, failures
