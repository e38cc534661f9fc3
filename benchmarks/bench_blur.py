"""Blur scoring throughput: JPEG files on disk -> stored scores (Parquet), against a plain OpenCV loop.

Images are generated street-like 1024x768 JPEGs (hard edges, a gradient, sensor noise; a tenth
blurred), so no emulator is needed. Both sides read the files, score and write a Parquet file. The
baseline is the textbook loop: `cv2.imread` (colour) + `cvtColor` + `cv2.Laplacian(..., CV_64F).var()`,
scoring only the Laplacian variance while the pipeline also computes Tenengrad.

The per-core figure pins both sides to one core (one worker, `cv2.setNumThreads(1)`); the all-core
figure lets each use the machine as it would by default. Both sides run in interleaved rounds (medians).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from benchmarks.harness import Figure, Stopwatch, median_of, previous_row
from mapillary_assets.pipeline import blur
from mapillary_assets.storage import write_parquet_atomic

REPEATS = 3


def street_like(seed: int, height: int = 768, width: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = np.linspace(210, 60, height)[:, None, None].astype(np.uint8)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(height // 4, height))
        w, h = int(rng.integers(8, 260)), int(rng.integers(8, 260))
        cv2.rectangle(
            image, (x, y), (x + w, y + h), tuple(int(c) for c in rng.integers(0, 256, 3)), -1
        )
    for _ in range(12):
        x = int(rng.integers(0, width))
        cv2.line(image, (x, height // 5), (x + int(rng.integers(-40, 40)), height), (35, 35, 35), 3)
    image = cv2.add(image, rng.integers(0, 14, image.shape, dtype=np.uint8))
    if seed % 10 == 0:
        image = cv2.GaussianBlur(image, (0, 0), 3.0)
    return image


def make_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"{1_000_000 + i}.jpg"
        path.write_bytes(
            cv2.imencode(".jpg", street_like(i), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        )
        paths.append(path)
    return paths


def baseline_loop(paths: list[Path], output: Path) -> None:
    rows = []
    for path in paths:
        image = cv2.imread(str(path))
        rows.append(
            (path.stem, cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())
        )
    pd.DataFrame(rows, columns=["image_id", "blur_value"]).to_parquet(output)


def pipeline_path(paths: list[Path], output: Path, backend: str, workers: int) -> None:
    write_parquet_atomic(blur.score_images(paths, backend=backend, workers=workers), output)


def images_per_second(paths: list[Path], run) -> float:
    def once() -> float:
        with Stopwatch() as watch:
            run()
        return len(paths) / watch.seconds

    return median_of(REPEATS, once)


def interleaved_rates(paths: list[Path], sides: dict) -> dict[str, float]:
    """Median images/s of every side over REPEATS rounds, each round running every side once in an
    order rotating by one, so a change of load touches both sides alike."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(REPEATS):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            with Stopwatch() as watch:
                sides[name]()
            rates[name].append(len(paths) / watch.seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def _replaced(metric_prefix: str) -> str:
    before = previous_row("blur", metric_prefix)
    if not before or not before.get("baseline"):
        return ""
    return (
        f"; the row this run replaced: {before['value']:,.0f} vs {before['baseline']:,.0f} images/s "
        f"({before['value'] / before['baseline']:.2f}x)"
    )


def decode_ms(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image for each decode option, on the in-memory bytes (single thread)."""
    blobs = [p.read_bytes() for p in paths[:40]]
    options = {
        "cv2 colour + cvtColor": lambda b: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY
        ),
        "cv2 IMREAD_GRAYSCALE": lambda b: cv2.imdecode(
            np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE
        ),
    }
    try:
        import simplejpeg

        options["simplejpeg GRAY"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="GRAY")
    except ImportError:
        pass
    timings = {}
    for name, decode in options.items():

        def once(decode=decode) -> float:
            start = time.perf_counter()
            for blob in blobs:
                decode(blob)
            return (time.perf_counter() - start) * 1000 / len(blobs)

        timings[name] = median_of(REPEATS, once)
    return timings


def run(quick: bool) -> list[Figure]:
    count = 120 if quick else 480
    kornia_count = 16 if quick else 32
    cores = blur.default_workers()
    figures: list[Figure] = []
    default_threads = cv2.getNumThreads()
    with tempfile.TemporaryDirectory(prefix="bench-blur-") as tmp:
        folder = Path(tmp)
        paths = make_images(folder, count)
        out = folder / "scores.parquet"
        decode = decode_ms(paths)

        load_before = os.getloadavg()[0]
        cv2.setNumThreads(1)
        try:
            one = interleaved_rates(
                paths,
                {
                    "baseline": lambda: baseline_loop(paths, out),
                    "ours": lambda: pipeline_path(paths, out, "opencv", 1),
                },
            )
        finally:
            cv2.setNumThreads(default_threads)
        every = interleaved_rates(
            paths,
            {
                "baseline": lambda: baseline_loop(paths, out),
                "ours": lambda: pipeline_path(paths, out, "opencv", cores),
            },
        )
        base_one, ours_one, base_all, ours_all = (
            one["baseline"],
            one["ours"],
            every["baseline"],
            every["ours"],
        )
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        kornia_paths = paths[:kornia_count]
        kornia_cpu = images_per_second(
            kornia_paths, lambda: pipeline_path(kornia_paths, out, "kornia-cpu", cores)
        )

        baseline_name = "cv2.imread + cvtColor + Laplacian CV_64F var loop"
        decode_note = ", ".join(f"{name} {ms:.2f} ms" for name, ms in decode.items())
        figures.append(
            Figure(
                "blur",
                "images/s per core, 1024x768 JPEG -> Parquet (opencv backend, 1 worker, 1 cv2 thread)",
                ours_one,
                "images/s",
                base_one,
                baseline_name + " (1 cv2 thread)",
                ">= 2x per core",
                ours_one / base_one >= 2.0,
                f"pipeline also computes Tenengrad; decode per image: {decode_note}; medians of {REPEATS} "
                f"interleaved rounds{_replaced('images/s per core')}; {load}",
                extra={"images": count, "decode_ms": decode},
            )
        )
        figures.append(
            Figure(
                "blur",
                f"images/s all cores ({cores} workers, opencv backend)",
                ours_all,
                "images/s",
                base_all,
                baseline_name + f" ({default_threads} cv2 threads)",
                None,
                None,
                f"{ours_all / cores:,.0f} images/s per core; medians of {REPEATS} interleaved rounds"
                f"{_replaced('images/s all cores')}; {load}",
                extra={"images": count, "workers": cores},
            )
        )
        figures.append(
            Figure(
                "blur",
                f"images/s kornia-cpu backend ({cores} decode workers, batch 8)",
                kornia_cpu,
                "images/s",
                base_all,
                baseline_name,
                None,
                None,
                "not auto's CPU choice: torch conv2d on CPU is far slower than OpenCV's filters",
                extra={"images": kornia_count},
            )
        )

        if blur._cuda_available():
            cuda = images_per_second(paths, lambda: pipeline_path(paths, out, "kornia-cuda", cores))
            figures.append(
                Figure(
                    "blur",
                    f"images/s kornia-cuda backend ({cores} decode workers)",
                    cuda,
                    "images/s",
                    base_all,
                    baseline_name,
                    None,
                    None,
                    "CPU decode feeds the GPU; nvJPEG would lift the decode ceiling",
                )
            )
        else:
            figures.append(
                Figure(
                    "blur",
                    "images/s kornia-cuda backend",
                    math.nan,
                    "images/s",
                    None,
                    None,
                    None,
                    None,
                    "not measured: no CUDA on this machine",
                )
            )
    return figures


if __name__ == "__main__":
    for figure in run(quick=bool(os.environ.get("QUICK"))):
        print(figure)
