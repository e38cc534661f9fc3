"""Secrets and exposure: the access token appears nowhere but in the requests themselves, and the UI
listens on 127.0.0.1 only unless told otherwise.

The token is the harness's distinctive TEST_TOKEN. The pipeline is configured the production way (the
environment, `resources_from_env`: the token stays a `dg.EnvVar`), runs completely, then is made to fail
(a rejected token, an outage), and everything is searched: every Dagster event of every run, the runs'
tags and config, captured Python logging and console output, the exceptions, and every file under the
data folder and DAGSTER_HOME, read as bytes and, for formats that compress (SQLite blobs, Parquet,
DuckDB, gzip), as their decoded content. The object store's keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
are searched for the same way after a run on an s3:// data dir, the bucket's objects included."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import itertools
import logging
import sqlite3
import time
import traceback
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import duckdb
import obstore
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import serialize_value

from mapillary_assets import cli
from mapillary_assets.api import ClientConfig, MapillaryClient
from mapillary_assets.api.errors import AuthError, MapillaryError
from mapillary_assets.definitions import build_definitions
from mapillary_assets.defs.partitions import tile_partitions
from mapillary_assets.emulator import EmulatorServer
from mapillary_assets.runners.failures import failure_messages
from mapillary_assets.runners.instance import open_instance
from mapillary_assets.runners.pipeline import run_pipeline
from mapillary_assets.storage import DataLayout, ObjectStore, read_parquet
from mapillary_assets.storage.shards import shard_index
from mapillary_assets_tests.support.bucket_run import run_on_bucket
from mapillary_assets_tests.support.emulated_runs import emulated_run, execute
from mapillary_assets_tests.support.world import TEST_TOKEN, reference_world

REPO_ROOT = Path(__file__).resolve().parent.parent
CANARY = TEST_TOKEN.rsplit("|", 1)[-1]  # survives URL-encoding: "MLY%7C4242%7Cleak-canary-..."
FORMS = (CANARY, base64.b64encode(TEST_TOKEN.encode()).decode())
REJECTED_TOKEN = "MLY|9999|the-emulator-wants-this-one"


def leaks_in_text(text: str, forms: Sequence[str] = FORMS) -> bool:
    return any(form in text for form in forms)


def leaks_in_bytes(data: bytes, forms: Sequence[str] = FORMS) -> bool:
    return any(form.encode() in data for form in forms)


# ---------------------------------------------------------------------------------------------
# searching files, decoded


def files_holding_the_token(root: Path, forms: Sequence[str] = FORMS) -> list[str]:
    """Files under `root` holding any of `forms` (the token's, by default), raw or decoded."""
    found = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        data = path.read_bytes()
        where = []
        if leaks_in_bytes(data, forms):
            where.append("raw bytes")
        if data.startswith(b"SQLite format 3\x00"):
            where += _sqlite_leaks(path, forms)
        elif data[:4] == b"PAR1":
            where += _parquet_leaks(path, forms)
        elif data[8:12] == b"DUCK":
            where += _duckdb_leaks(path, forms)
        elif data[:2] == b"\x1f\x8b" and leaks_in_bytes(gzip.decompress(data), forms):
            where.append("gzip content")
        found += [f"{path.relative_to(root)}: {place}" for place in where]
    return found


def _sqlite_leaks(path: Path, forms: Sequence[str]) -> list[str]:
    """Every value of every table, blobs also zlib-inflated (Dagster stores snapshots compressed)."""
    where = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        tables = [
            row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if _value_leaks(value, forms):
                        where.append(f"table {table}")
    return sorted(set(where))


def _value_leaks(value, forms: Sequence[str]) -> bool:
    if isinstance(value, str):
        return leaks_in_text(value, forms)
    if isinstance(value, bytes):
        if leaks_in_bytes(value, forms):
            return True
        try:
            return leaks_in_bytes(zlib.decompress(value), forms)
        except zlib.error:
            return False
    return False


def _parquet_leaks(path: Path, forms: Sequence[str]) -> list[str]:
    table = pq.read_table(path)
    return [
        f"column {name}"
        for name in table.column_names
        if any(_value_leaks(v, forms) for v in _as_text_or_bytes(table[name]) if v is not None)
    ]


def _as_text_or_bytes(column) -> list:
    """A column's values as str, or as bytes where they are binary (GeoParquet's WKB geometry)."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.to_pylist()
    return column.cast("string", safe=False).to_pylist()


def _duckdb_leaks(path: Path, forms: Sequence[str]) -> list[str]:
    where = []
    with duckdb.connect(str(path), read_only=True) as con:
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE data_type = 'VARCHAR'"
        ).fetchall()
        for table, column in columns:
            hits = con.execute(
                f'SELECT count(*) FROM "{table}" WHERE '
                + " OR ".join(f'position(? IN "{column}") > 0' for _ in forms),
                list(forms),
            ).fetchone()[0]
            if hits:
                where.append(f"{table}.{column}")
    return where


def test_the_scanner_finds_the_token_where_it_hides(tmp_path):
    """The search below is only as good as its decoders: plant the token in each format first."""
    (tmp_path / "plain.log").write_text(f"Authorization: OAuth {TEST_TOKEN}")
    with sqlite3.connect(tmp_path / "compressed.db") as con:
        con.execute("CREATE TABLE snapshots (body BLOB)")
        con.execute(
            "INSERT INTO snapshots VALUES (?)",
            (zlib.compress(f'{{"token": "{TEST_TOKEN}"}}'.encode() * 50),),
        )
    pq.write_table(
        pa.table({"reason": [f"GET /tiles?access_token={TEST_TOKEN}"] * 100}),
        tmp_path / "failures.parquet",
        compression="zstd",
    )
    with duckdb.connect(str(tmp_path / "staging.duckdb")) as con:
        con.execute(
            "CREATE TABLE t AS SELECT ? || range::VARCHAR AS reason FROM range(5000)", [TEST_TOKEN]
        )
    (tmp_path / "tile.mvt.gz").write_bytes(gzip.compress(TEST_TOKEN.encode() * 10))
    (tmp_path / "clean.txt").write_text("nothing to see")
    found = files_holding_the_token(tmp_path)
    for name in ("plain.log", "compressed.db", "failures.parquet", "staging.duckdb", "tile.mvt.gz"):
        assert any(entry.startswith(name) for entry in found), (name, found)
    assert not any(entry.startswith("clean.txt") for entry in found)


def test_the_scanner_finds_a_literal_token_in_dagster_storage(tmp_path):
    """A real positive control, and why the token must stay an EnvVar: configured as a literal string
    (as the tests' harness does), Dagster keeps it in the job snapshot, zlib-compressed in runs.db."""
    with emulated_run(tmp_path) as run:
        assert run.execute("assign_chunks_job").success
    assert any(
        entry.startswith("history/runs.db: table snapshots")
        for entry in files_holding_the_token(run.home)
    )


# ---------------------------------------------------------------------------------------------
# the pipeline, successful and failing


def _configure(monkeypatch, server: EmulatorServer, data_dir: Path, **extra: str) -> None:
    """The production configuration path: MAPILLARY_* variables read by `resources_from_env`."""
    monkeypatch.setenv("MAPILLARY_ACCESS_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("MAPILLARY_GRAPH_URL", server.graph_url)
    monkeypatch.setenv("MAPILLARY_TILES_URL", server.tiles_url)
    monkeypatch.setenv("MAPILLARY_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MAPILLARY_CHUNK_SIZE", "200")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


@pytest.mark.slow
def test_the_token_appears_in_no_log_event_run_exception_or_file(
    tmp_path, monkeypatch, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    home, data_dir = tmp_path / "dagster_home", tmp_path / "data"
    layout = DataLayout(data_dir)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    errors: list[str] = []
    world = reference_world()
    with (
        EmulatorServer(world, token=TEST_TOKEN) as server,
        EmulatorServer(world, token=REJECTED_TOKEN) as rejecting,
        open_instance(home) as instance,
    ):
        _configure(monkeypatch, server, data_dir)
        run_pipeline(instance, build_definitions(), log=lambda *_: None)
        assert layout.geopackage_path.exists()

        # Make every request path fail: refetch tiles (token in the URL), refetch one chunk's metadata
        # (token in the header) and one thumbnail (a URL lookup, then the CDN).
        layout.metadata_path("chunk-000000").unlink()
        assignment = read_parquet(layout.chunk_assignment_path)
        one_id = assignment.loc[assignment["chunk"] == "chunk-000001", "image_id"].iloc[0]
        layout.thumbnail_path(one_id, 1024).unlink()
        failing = {"MAPILLARY_TILE_CACHE_MAX_AGE_HOURS": "0", "MAPILLARY_MAX_RETRIES": "1"}

        _configure(monkeypatch, rejecting, data_dir, **failing)
        errors += _failing_runs(instance, build_definitions())
        assert any("token rejected (code 190)" in error for error in errors), errors

        _configure(monkeypatch, server, data_dir, **failing)
        server.set_faults(outage_start=time.time(), outage_end=time.time() + 3600)
        errors += _failing_runs(instance, build_definitions())
        errors += _client_exceptions(server, rejecting)
        server.set_faults(outage_start=None, outage_end=None)

        runs = instance.get_runs()
        event_leaks = [
            f"run {run.run_id[:8]} ({run.job_name}): {entry.dagster_event_type or 'log'}"
            for run in runs
            for entry in instance.all_logs(run.run_id)
            if leaks_in_text(serialize_value(entry))
        ]
        run_leaks = [run.run_id for run in runs if leaks_in_text(serialize_value(run))]
        assert len(runs) >= 8

    captured = capfd.readouterr()
    record_leaks = [
        f"{record.name}: {record.getMessage()[:200]}"
        for record in caplog.records
        if leaks_in_text(record.getMessage()) or leaks_in_text(str(record.exc_text or ""))
    ]
    assert not event_leaks, event_leaks
    assert not run_leaks, run_leaks
    assert not record_leaks, record_leaks
    assert not leaks_in_text(captured.out + captured.err), "console output holds the token"
    assert not [error for error in errors if leaks_in_text(error)]
    assert files_holding_the_token(home) == []
    assert files_holding_the_token(data_dir) == []
    # The searches saw what they had to: the client's log lines about failed tile requests (whose URL
    # carries the token, redacted) and the run's console output.
    assert any("access_token=***" in record.getMessage() for record in caplog.records), (
        "no tile request logged"
    )
    assert captured.err, "no console output captured"


def _failing_runs(instance, defs) -> list[str]:
    """Discovery, the metadata of chunk-000000 and the thumbnails of chunk-000001, each failing; their
    error messages and stack traces as a person sees them in the UI."""
    texts = []
    for job, keys in (
        ("discovery_job", tile_partitions().get_partition_keys()[:1]),
        ("process_chunks_job", ("chunk-000000",)),
        ("process_chunks_job", ("chunk-000001",)),
    ):
        result = execute(defs, instance, job, keys)
        assert not result.success, f"{job} {keys} was meant to fail"
        texts += failure_messages(instance, result.run_id)
        for event in result.all_events:
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                texts.append(error.to_string())
    return texts


def _client_exceptions(server: EmulatorServer, rejecting: EmulatorServer) -> list[str]:
    """The client's own exceptions, tracebacks and chained causes included: a rejected token on the tile
    route (token in the query string) and on the Graph API, and an outage that outlasts the retries."""

    async def failure(target: EmulatorServer, call) -> str:
        settings = ClientConfig(
            token=TEST_TOKEN,
            graph_url=target.graph_url,
            tiles_url=target.tiles_url,
            max_retries=1,
            backoff_base_s=0.01,
        )
        async with MapillaryClient(settings) as client:
            try:
                await call(client)
            except MapillaryError as error:
                assert isinstance(error, AuthError) == (target is rejecting)
                return "".join(traceback.format_exception(error)) + repr(error)
        raise AssertionError("the request was meant to fail")

    calls = (lambda c: c.get_tile(14, 8579, 5737), lambda c: c.get_images(["1"], ["id"]))
    return [asyncio.run(failure(target, call)) for target in (rejecting, server) for call in calls]


@pytest.mark.slow
def test_the_object_store_keys_appear_in_no_log_event_output_error_or_object(
    tmp_path, monkeypatch, caplog, capfd, s3_server
):
    """A run on an s3:// data dir, then a store with a wrong secret: the access key id and the secret
    (read from AWS_* only) are in no Dagster event or run, log record, console line, error, local file
    (DAGSTER_HOME, scratch) or object in the bucket."""
    caplog.set_level(logging.DEBUG)
    keys = (s3_server.access_key_id, s3_server.secret_access_key)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAPILLARY_SCRATCH_DIR", str(tmp_path / "scratch"))
    url = f"s3://{s3_server.bucket}/security-{uuid.uuid4().hex[:8]}"
    finished = run_on_bucket(tmp_path, url)  # a process of its own: see support/bucket_run.py
    assert finished.returncode == 0, finished.stderr[-3000:]
    with open_instance(tmp_path / "home") as instance:
        runs = instance.get_runs()
        event_leaks = [
            f"run {each.run_id[:8]} ({each.job_name}): {entry.dagster_event_type or 'log'}"
            for each in runs
            for entry in instance.all_logs(each.run_id)
            if leaks_in_text(serialize_value(entry), keys)
        ]
        run_leaks = [each.run_id for each in runs if leaks_in_text(serialize_value(each), keys)]
    assert len(runs) >= 5
    wrong = ObjectStore(
        url, dataclasses.replace(s3_server.settings, secret_access_key="wr0ng-" * 4)
    )
    errors = []
    for attempt in (lambda: wrong.get("chunks/assignment.parquet"), lambda: wrong.put("x", b"x")):
        with pytest.raises(Exception) as refused:
            attempt()
        errors.append("".join(traceback.format_exception(refused.value)) + repr(refused.value))
    captured = capfd.readouterr()
    record_leaks = [
        f"{record.name}: {record.getMessage()[:200]}"
        for record in caplog.records
        if leaks_in_text(record.getMessage(), keys)
        or leaks_in_text(str(record.exc_text or ""), keys)
    ]
    mirror = tmp_path / "bucket"
    store = DataLayout(url).store
    for meta in itertools.chain.from_iterable(obstore.list(store._store)):
        (mirror / meta["path"]).parent.mkdir(parents=True, exist_ok=True)
        (mirror / meta["path"]).write_bytes(store.get(meta["path"]))
    stored = sum(len(shard_index(shard)) for shard in mirror.rglob("*.tar"))
    assert stored > 100, "the run stored its thumbnails (one tar shard per chunk) in the bucket"
    assert not event_leaks, event_leaks
    assert not run_leaks, run_leaks
    assert not record_leaks, record_leaks
    console = finished.stdout + finished.stderr + captured.out + captured.err
    assert "blur_scores" in console, "the run's console output was not captured"
    assert not leaks_in_text(console, keys), "console output holds a key"
    assert not [error for error in errors if leaks_in_text(error, keys + ("wr0ng-",))], errors
    assert files_holding_the_token(tmp_path, keys) == []  # home, scratch and the bucket's objects


# ---------------------------------------------------------------------------------------------
# exposure of the UI


def test_ui_listens_on_localhost_unless_told_otherwise(monkeypatch, tmp_path):
    launched: list[list[str]] = []

    class Emulator:
        base_url = graph_url = tiles_url = "http://127.0.0.1:1"

        def __init__(self, *args, world=None, **kwargs):
            self.world = world

        def start(self):
            return self

        def __enter__(self):
            return self.start()

        def __exit__(self, *exc):
            return False

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setattr("mapillary_assets.emulator.EmulatorServer", Emulator)
    monkeypatch.setattr("mapillary_assets.runners.instance.configure_pools", lambda instance: None)
    monkeypatch.setattr("dagster.DagsterInstance.get", lambda: _Nothing())
    monkeypatch.setattr(
        cli, "serve_until_stopped", lambda command, env, **_: launched.append(command) or 0
    )

    assert cli.main(["ui"]) == 0
    command = launched[-1]
    assert command[command.index("-h") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in command and "::" not in command
    assert cli.main(["ui", "--host", "10.1.2.3"]) == 0  # exposing it is a deliberate choice
    assert launched[-1][launched[-1].index("-h") + 1] == "10.1.2.3"

    from mapillary_assets.emulator.__main__ import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"
    ui_script = (REPO_ROOT / "scripts" / "ui.sh").read_text()
    assert "--host" not in ui_script and "0.0.0.0" not in ui_script
    readme = (REPO_ROOT / "README.md").read_text()
    assert "127.0.0.1" in readme and "ssh -L" in readme and "reverse proxy" in readme


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
