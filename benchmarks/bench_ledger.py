"""Per-image cost ledger of the image path: where the CPU of a downloaded and a scored thumbnail goes.

Download (1024 px thumbnails from the emulator in a child process, as in bench_download): the pipeline's
`download_thumbnails` runs under cProfile with a CPU clock (`time.process_time`), and the cumulative CPU
of the functions that make up each step is summed per image: HTTP GET (`get_thumbnail`: the request in
the client), body checks (`verify_jpeg`), write, bookkeeping (outcome records, the skip-existing pass,
queues, the result frame) and URL resolution (`?ids=` lookups). What no step's own frames account for
is the event loop and aiohttp's transport callbacks (reading sockets, parsing responses). cProfile
inflates Python-heavy steps, so the un-profiled CPU per image of the same run stands beside the total.
Each step's floor is the same work done bare, measured alone: the plain aiohttp loop's CPU per image
(GET + event loop), the marker checks on a body in memory, a plain `open().write()` into one folder,
a dict insert, and the client's CPU per 50-id lookup divided by 50.

Blur (256 px emulator thumbnails, analysis box 256x192, the `thumb_256_url` size the full run uses, in a
chunk of the default 5,000 images): the blur step itself is the `blur_scores` asset materialised in this
process (reading the downloads file, `score_images`, the scores file, the two pictures), its CPU per image
beside the floor (grayscale decode of bytes in memory + both filters, bare cv2, one OpenCV thread) and
`score_images` alone, in interleaved rounds. Each step of the per-image path (read, grayscale decode,
resize, the two filters) is timed alone as the pipeline calls it, beside its bare cv2 floor; the thread
pool's share is `score_images` less those steps, and the Dagster step's own share is the step less
`score_images` and the pictures.
"""

from __future__ import annotations

import asyncio
import cProfile
import math
import os
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks import bench_download
from benchmarks.harness import Figure, previous_row

DOWNLOAD_STEPS = {  # step -> functions (file suffix, name) whose cumulative CPU it is
    "HTTP GET (client request)": [("api/client.py", "get_thumbnail")],
    "body checks (marker checks)": [("pipeline/jpeg_verification.py", "verify_jpeg")],
    "write (temp file + rename, sharded)": [
        ("storage/files.py", "atomic_write_bytes"),
        ("pipeline/download.py", "create_shard_folders"),
    ],
    "bookkeeping (records, skip pass, queue, frame)": [
        ("pipeline/download.py", "record"),
        ("pipeline/download.py", "skip_existing"),
        ("pipeline/download.py", "_result_frame"),
        ("asyncio/queues.py", "get"),
        ("asyncio/queues.py", "put"),
    ],
    "URL resolution (`?ids=` lookups)": [("pipeline/download.py", "resolve")],
}
EVENT_LOOP = "event loop + aiohttp transport (socket reads, response parsing)"
BLUR_CHUNK_KEY = "chunk-000000"
BLUR_POOL = "thread pool + result frame (score_images beyond the steps above)"
BLUR_PICTURES = "pictures (histogram + contact sheet, once per chunk)"
BLUR_REST = "Dagster step, downloads file in, scores file out"
BLUR_STEP = "**the blur step end to end** (floor: decode + both filters, same rounds)"


def _cumulative(stats: pstats.Stats, wanted: list[tuple[str, str]]) -> float:
    total = 0.0
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if any(filename.endswith(suffix) and name == fn for suffix, fn in wanted):
            total += cumulative
    return total


def download_ledger(base_url: str, scratch: Path, ids: list[str]) -> dict:
    def profiled() -> tuple[pstats.Stats, float]:
        folder = Path(tempfile.mkdtemp(dir=scratch))
        bench_download.make_shard_folders(folder)  # as in the interleaved rounds
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        started = time.process_time()
        asyncio.run(bench_download.pipeline_run(base_url, folder, ids))
        cpu = time.process_time() - started
        profiler.disable()
        shutil.rmtree(folder, ignore_errors=True)
        return pstats.Stats(profiler), cpu

    stats, profiled_cpu = profiled()
    n = len(ids)
    steps = {name: _cumulative(stats, fns) * 1000 / n for name, fns in DOWNLOAD_STEPS.items()}
    steps[EVENT_LOOP] = max(profiled_cpu * 1000 / n - sum(steps.values()), 0.0)
    _, plain_cpu, _ = bench_download.interleaved(
        {"bare": bench_download.baseline_run, "ours": bench_download.pipeline_run},
        base_url,
        scratch,
        ids,
        3,
    )
    checks = _check_floors(ids, scratch)
    lookup_cpu = _lookup_cpu_per_image(base_url, ids)
    floors = {
        "HTTP GET (client request)": None,
        "body checks (marker checks)": checks["marker checks"],
        "write (temp file + rename, sharded)": checks["plain write"],
        "bookkeeping (records, skip pass, queue, frame)": _dict_insert_ms(),
        "URL resolution (`?ids=` lookups)": lookup_cpu,
        EVENT_LOOP: None,
    }
    return {
        "steps": steps,
        "floors": floors,
        "bare_loop_cpu_ms": statistics.median(plain_cpu["bare"]),
        "pipeline_cpu_ms": statistics.median(plain_cpu["ours"]),
        "profiled_cpu_ms": profiled_cpu * 1000 / n,
        "write_sharded_ms": checks["atomic sharded write"],
    }


def _check_floors(ids: list[str], scratch: Path) -> dict[str, float]:
    """CPU ms per 1024 px body of the marker checks, a plain write and the pipeline's atomic sharded write,
    each alone (CPU clock: the wall clock of a loaded machine says more about the neighbours)."""
    from mapillary_assets.emulator.thumbnails import thumbnail_bytes
    from mapillary_assets.pipeline import jpeg_verification
    from mapillary_assets.storage import DataLayout, atomic_write_bytes

    bodies = [(image_id, thumbnail_bytes(image_id, 1024, False)) for image_id in ids[:200]]
    plain, layout = scratch / "floor-plain", DataLayout(scratch / "floor-sharded")
    plain.mkdir()
    for image_id, _ in bodies:
        layout.thumbnail_path(image_id, 1024).parent.mkdir(parents=True, exist_ok=True)

    def write_plain(item) -> None:
        with open(plain / f"{item[0]}.jpg", "wb") as handle:
            handle.write(item[1])

    return {
        "marker checks": _cpu_ms_each(lambda item: jpeg_verification.verify_jpeg(item[1]), bodies),
        "plain write": _cpu_ms_each(write_plain, bodies),
        "atomic sharded write": _cpu_ms_each(
            lambda item: atomic_write_bytes(
                layout.thumbnail_path(item[0], 1024), item[1], durable=False
            ),
            bodies,
        ),
    }


def _lookup_cpu_per_image(base_url: str, ids: list[str]) -> float:
    async def lookups() -> None:
        async with bench_download._client(base_url) as client:
            for i in range(0, len(ids), 50):
                await client.get_images(ids[i : i + 50], ["thumb_1024_url"])

    started = time.process_time()
    asyncio.run(lookups())
    return (time.process_time() - started) * 1000 / len(ids)


def _dict_insert_ms() -> float:
    store: dict[str, tuple] = {}
    keys = [str(i) for i in range(100_000)]
    started = time.process_time()
    for key in keys:
        store[key] = (key, None, 0, "ok", None, False)
    return (time.process_time() - started) * 1000 / len(keys)


def _cpu_ms_each(action, items, repeats: int = 3) -> float:
    def one() -> float:
        started = time.process_time()
        for item in items:
            action(item)
        return (time.process_time() - started) * 1000 / len(items)

    return statistics.median(one() for _ in range(repeats))


def _blur_chunk(ids: list[str], scratch: Path) -> tuple[Path, list[Path]]:
    """A data dir holding one downloaded chunk of 256 px emulator thumbnails (at their layout paths, with
    the chunk's downloads file), as the blur step finds it in a full run."""
    import pandas as pd

    from mapillary_assets.emulator.thumbnails import thumbnail_bytes
    from mapillary_assets.storage import DataLayout, write_parquet_atomic

    layout = DataLayout(scratch / "blur-data")
    rows, paths = [], []
    for image_id in ids:
        path = layout.thumbnail_path(image_id, 256)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = thumbnail_bytes(image_id, 256, int(image_id) % 10 == 0)
        path.write_bytes(body)
        rows.append(
            (image_id, layout.thumbnail_relative_path(image_id, 256), len(body), "ok", None, False)
        )
        paths.append(path)
    downloads = pd.DataFrame(
        rows, columns=["image_id", "path", "bytes", "status", "reason", "transient"]
    )
    layout.downloads_path(BLUR_CHUNK_KEY).parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(downloads, layout.downloads_path(BLUR_CHUNK_KEY))
    return layout.root, paths


def _blur_step(data_dir: Path):
    """One materialisation of the `blur_scores` asset for the chunk (in this process: its CPU is ours)."""
    import dagster as dg

    from mapillary_assets.defs.assets.chunks import blur_scores
    from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME
    from mapillary_assets.defs.resources import DataStorageResource, PipelineSettings

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CHUNK_PARTITIONS_NAME, [BLUR_CHUNK_KEY])
    resources = {
        "storage": DataStorageResource(data_dir=str(data_dir)),
        "settings": PipelineSettings(thumbnail_size=256, blur_backend="opencv"),
    }

    def step() -> None:
        result = dg.materialize(
            [blur_scores], partition_key=BLUR_CHUNK_KEY, instance=instance, resources=resources
        )
        if not result.success:
            raise RuntimeError("the blur step failed")

    return step


def _bare_floor(bodies: list[bytes]) -> None:
    """The floor: grayscale decode of bytes in memory plus both filters, bare cv2, one OpenCV thread."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for body in bodies:
            gray = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
            lap = cv2.Laplacian(gray, cv2.CV_16S)
            cv2.norm(lap, cv2.NORM_L2SQR)
            cv2.sumElems(lap)
            cv2.norm(cv2.Sobel(gray, cv2.CV_16S, 1, 0), cv2.NORM_L2SQR)
            cv2.norm(cv2.Sobel(gray, cv2.CV_16S, 0, 1), cv2.NORM_L2SQR)
    finally:
        cv2.setNumThreads(threads)


def _interleaved_cpu_ms(sides: dict, n: int, repeats: int) -> dict[str, list[float]]:
    """CPU ms per image of every side, `repeats` rounds, each round running every side once in an order
    rotating by one, so load changes touch every side alike."""
    names = list(sides)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.process_time()
            sides[name]()
            cpu[name].append((time.process_time() - started) * 1000 / n)
    return cpu


def blur_ledger(ids: list[str], scratch: Path, repeats: int = 3) -> dict:
    from mapillary_assets.pipeline import blur
    from mapillary_assets.pipeline.charts import blur_histogram_png, contact_sheet_png

    data_dir, paths = _blur_chunk(ids, scratch)
    n = len(paths)
    box = blur.analysis_box(256)
    bodies = [path.read_bytes() for path in paths]
    grays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in bodies]
    step = _blur_step(data_dir)
    step()  # warm-up: Dagster's and matplotlib's first-use costs are not per image
    rounds = _interleaved_cpu_ms(
        {
            "blur step": step,
            "score_images": lambda: blur.score_images(paths, backend="opencv", analysis_size=box),
            "floor": lambda: _bare_floor(bodies),
        },
        n,
        repeats,
    )
    step_ms, score_ms, floor_ms = (
        statistics.median(rounds[name]) for name in ("blur step", "score_images", "floor")
    )
    values = blur.score_images(paths, backend="opencv", analysis_size=box)["blur_value"]
    started = time.process_time()
    blur_histogram_png(values, blur.DEFAULT_THRESHOLD)
    contact_sheet_png(paths, values, blur.DEFAULT_THRESHOLD)
    pictures_ms = (time.process_time() - started) * 1000 / n
    steps = {
        "read + marker checks + grayscale decode (decode_gray)": _cpu_ms_each(
            lambda p: blur.decode_gray(p, None), paths
        ),
        "resize to the analysis box": _cpu_ms_each(
            lambda g: blur.resize_to_analysis(g, box), grays
        ),
        "filters (Laplacian variance + Tenengrad)": _cpu_ms_each(
            lambda g: (blur.laplacian_variance(g), blur.tenengrad(g)), grays
        ),
    }
    steps[BLUR_POOL] = max(score_ms - sum(steps.values()), 0.0)
    steps[BLUR_PICTURES] = pictures_ms
    steps[BLUR_REST] = max(step_ms - score_ms - pictures_ms, 0.0)
    steps[BLUR_STEP] = step_ms
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:

        def bare_filters(gray) -> None:
            lap = cv2.Laplacian(gray, cv2.CV_16S)
            cv2.norm(lap, cv2.NORM_L2SQR)
            cv2.sumElems(lap)
            cv2.norm(cv2.Sobel(gray, cv2.CV_16S, 1, 0), cv2.NORM_L2SQR)
            cv2.norm(cv2.Sobel(gray, cv2.CV_16S, 0, 1), cv2.NORM_L2SQR)

        floors = {
            "read + marker checks + grayscale decode (decode_gray)": _cpu_ms_each(
                lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE), bodies
            ),
            "resize to the analysis box": 0.0,
            "filters (Laplacian variance + Tenengrad)": _cpu_ms_each(bare_filters, grays),
            BLUR_STEP: floor_ms,
        }
    finally:
        cv2.setNumThreads(threads)
    return {
        "steps": steps,
        "floors": floors,
        "step_cpu_ms": step_ms,
        "score_images_cpu_ms": score_ms,
        "floor_cpu_ms": floor_ms,
        "rounds": rounds,
    }


def run(quick: bool) -> list[Figure]:
    count = 300 if quick else 1000
    # The blur step's chunk is the default chunk size: its per-chunk costs (pictures, Dagster) spread as in a run.
    blur_count = 1000 if quick else 5000
    ids = bench_download.world_ids(max(count, blur_count))
    before = previous_row("ledger", BLUR_METRIC)
    with (
        bench_download.emulator_process() as base_url,
        tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp,
    ):
        scratch = Path(tmp)
        asyncio.run(bench_download.baseline_run(base_url, scratch / "warm-up", ids[:count]))
        load_before = os.getloadavg()[0]
        download = download_ledger(base_url, scratch, ids[:count])
        blur_load_before = os.getloadavg()[0]
        blurring = blur_ledger(ids[:blur_count], scratch)
        blur_load = (
            f"load average {blur_load_before:.1f} at its start, {os.getloadavg()[0]:.1f} at its end"
        )
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    replaced = (
        f"; the row this run replaced: {before['value']:.3f} ms vs floor {before['baseline']:.3f} ms "
        f"({before['notes'].split('; ')[-1]})"
        if before and before.get("baseline")
        else ""
    )
    return [
        Figure(
            "ledger",
            f"download: CPU ms per image, {count} thumbnails (1024 px), un-profiled",
            download["pipeline_cpu_ms"],
            "ms",
            download["bare_loop_cpu_ms"],
            "the bare aiohttp loop (plain write to one folder, no checks), same run",
            "<= 1.3x",
            download["pipeline_cpu_ms"] <= 1.3 * download["bare_loop_cpu_ms"],
            f"median of 3 interleaved rounds; {load}",
            extra={"ledger": download},
        ),
        Figure(
            "ledger",
            f"{BLUR_METRIC}, a chunk of {blur_count} images (256 px, 256x192 box)",
            blurring["step_cpu_ms"],
            "ms",
            blurring["floor_cpu_ms"],
            "grayscale decode of bytes in memory + both filters, bare cv2, one thread",
            None,
            None,
            f"opencv backend, default workers; score_images alone {blurring['score_images_cpu_ms']:.3f} ms; "
            f"median of 3 interleaved rounds{replaced}; {blur_load}",
            extra={"ledger": blurring},
        ),
    ]


BLUR_METRIC = "blur step: CPU ms per image (Dagster blur_scores, opencv)"


def _cell(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def markdown_section(figures: list[Figure]) -> list[str]:
    lines: list[str] = []
    for figure in figures:
        ledger = figure.extra.get("ledger")
        if not ledger:
            continue
        title = figure.metric.split(":")[0]
        lines += [
            "",
            f"## Per-image cost ledger: {title}",
            "",
            "| step | CPU ms per image (pipeline) | floor (bare, measured alone) |",
            "|---|---|---|",
        ]
        for step, value in ledger["steps"].items():
            lines.append(f"| {step} | {_cell(value)} | {_cell(ledger['floors'].get(step))} |")
        if "profiled_cpu_ms" in ledger:
            lines += [
                "",
                f"Download steps from cProfile (CPU clock), which inflates Python-heavy steps: profiled total "
                f"{ledger['profiled_cpu_ms']:.3f} ms/image; un-profiled {ledger['pipeline_cpu_ms']:.3f} ms/image vs "
                f"the bare loop's {ledger['bare_loop_cpu_ms']:.3f} ms/image (its GET + event loop + plain write). "
                f"The atomic sharded write alone: {ledger['write_sharded_ms']:.3f} ms.",
            ]
        else:
            lines += [
                "",
                "Blur steps measured alone on the same chunk (CPU clock); the three end-to-end figures (the "
                "step, `score_images`, the floor) are medians of interleaved rounds, CPU ms per image: step "
                f"{_rounds(ledger['rounds']['blur step'])}, score_images {_rounds(ledger['rounds']['score_images'])}, "
                f"floor {_rounds(ledger['rounds']['floor'])}.",
            ]
    return lines


def _rounds(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
