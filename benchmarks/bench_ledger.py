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

Blur (256 px emulator thumbnails, analysis box 256x192, the `thumb_256_url` size the full run uses):
each step of the pipeline's per-image path (read, grayscale decode, resize, the two filters) is timed
as the pipeline calls it, beside its floor: the bare cv2 call on bytes in memory with one OpenCV thread;
`score_images` end to end gives the per-image CPU with its thread pool and bookkeeping.
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
from benchmarks.harness import Figure

DOWNLOAD_STEPS = {  # step -> functions (file suffix, name) whose cumulative CPU it is
    "HTTP GET (client request)": [("api/client.py", "get_thumbnail")],
    "body checks (marker checks)": [("pipeline/jpeg_verification.py", "verify_jpeg")],
    "write (temp file + rename, sharded)": [
        ("pipeline/download.py", "write_file_atomically"),
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


def _cumulative(stats: pstats.Stats, wanted: list[tuple[str, str]]) -> float:
    total = 0.0
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if any(filename.endswith(suffix) and name == fn for suffix, fn in wanted):
            total += cumulative
    return total


def download_ledger(base_url: str, scratch: Path, ids: list[str]) -> dict:
    def profiled() -> tuple[pstats.Stats, float]:
        folder = Path(tempfile.mkdtemp(dir=scratch))
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
    plain_rates, plain_cpu = bench_download.interleaved(
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
    from mapillary_assets.pipeline.download import write_file_atomically
    from mapillary_assets.storage import DataLayout

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
            lambda item: write_file_atomically(str(layout.thumbnail_path(item[0], 1024)), item[1]),
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


def blur_ledger(ids: list[str], scratch: Path) -> dict:
    from mapillary_assets.emulator.thumbnails import thumbnail_bytes
    from mapillary_assets.pipeline import blur

    folder = scratch / "blur256"
    folder.mkdir()
    paths = []
    for image_id in ids:
        path = folder / f"{image_id}.jpg"
        path.write_bytes(thumbnail_bytes(image_id, 256, int(image_id) % 10 == 0))
        paths.append(path)
    box = blur.analysis_box(256)
    bodies = [path.read_bytes() for path in paths]
    grays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in bodies]
    threads = cv2.getNumThreads()
    pipeline_steps = {
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
    started = time.process_time()
    blur.score_images(paths, backend="opencv", analysis_size=box)
    end_to_end = (time.process_time() - started) * 1000 / len(paths)
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
        }
    finally:
        cv2.setNumThreads(threads)
    return {"steps": pipeline_steps, "floors": floors, "score_images_cpu_ms": end_to_end}


def run(quick: bool) -> list[Figure]:
    count = 300 if quick else 1000
    ids = bench_download.world_ids(count)
    with (
        bench_download.emulator_process() as base_url,
        tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp,
    ):
        scratch = Path(tmp)
        asyncio.run(bench_download.baseline_run(base_url, scratch / "warm-up", ids))
        load_before = os.getloadavg()[0]
        download = download_ledger(base_url, scratch, ids)
        blurring = blur_ledger(ids, scratch)
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    blur_floor = sum(v for v in blurring["floors"].values() if v)
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
            f"blur: CPU ms per image at 256 px (256x192 box), {count} images, score_images end to end",
            blurring["score_images_cpu_ms"],
            "ms",
            blur_floor,
            "grayscale decode + both filters, bare cv2, one thread",
            None,
            None,
            f"opencv backend, default workers; {load}",
            extra={"ledger": blurring},
        ),
    ]


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
                f"`score_images` end to end: {ledger['score_images_cpu_ms']:.3f} ms/image (its thread pool, "
                f"result frame); the floors sum to {sum(v for v in ledger['floors'].values() if v):.3f} ms.",
            ]
    return lines
