"""The GPU blur check (issue 21): one short run on a lent H100/H200 that settles whether a GPU pays.

`benchmarks/gpu_check.sh` is the one command (it prepares the wheels and prints the device call, or
runs this module here with `--local`); `python -m benchmarks.gpu_check --help` lists the options.

What it measures, on JPEGs made by the emulator's thumbnail generator in a temporary folder (the same
ids and bytes every run; a tenth of them blurred):
1. Agreement: Kornia scores (on CUDA, else on the CPU) against the cv2 reference on the same decoded
   pixels at 1024x768; the goal is <= 1e-3 relative difference, image by image.
2. Throughput, JPEG files on disk -> scores in Parquet, at 1024x768 and 256x192 (each thumbnail size
   scored at its own box, as the pipeline does), each beside the baseline of the same run:
   - baseline: the pipeline's cv2 decode + cv2 scores in N processes (N = the usable cores);
   - the pipeline's opencv backend as it runs today (one process, N decode threads);
   - the pipeline's kornia-cuda backend (cv2 decode in N threads, Kornia on the GPU);
   - cv2 decode in N processes, Kornia on the GPU;
   - nvJPEG decode on the GPU (`torchvision.io.decode_jpeg(device="cuda")`, batched), Kornia on the GPU.
   GPU runs agree with the baseline's scores (the first two: <= 1e-3, same pixels; nvJPEG's pixels may
   differ from libjpeg-turbo's by rounding, so its difference is reported, not judged).
3. A JSON file (GPU name or "none", CUDA available or not, date, machine, versions, figures) that
   `python -m benchmarks.run --merge FILE` puts into benchmarks/RESULTS.md.

Without CUDA it says so, skips the GPU runs (their rows say why) and still gives the CPU figures.
`--gpu-device cpu` rehearses the GPU code paths with Kornia on the CPU (slow; for tests).

It imports only what the lent machines have (torch, torchvision, cv2, numpy, pandas, pyarrow) plus
the carried wheels (gpu_check.sh); keep it free of modules that import dagster, aiohttp or duckdb.
A wall-clock guard (`--budget-s`) skips what no longer fits, and the JSON is rewritten after every
step, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from itertools import islice, repeat
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from benchmarks.harness import Figure, Stopwatch
from mapillary_assets.emulator import thumbnails
from mapillary_assets.pipeline import blur
from mapillary_assets.storage import write_parquet_atomic

BENCHMARK = "gpu_blur"
# thumbnail size -> the box it is scored at; 256 first: its figure is the goal, so it is measured first
BOXES = {"256": (256, 192), "1024": (1024, 768)}
AGREEMENT_RTOL = 1e-3
GOAL_256 = 10_000  # images/s at 256x192, end to end from files (issue 21)
FIRST_IMAGE_ID = 2**53  # emulator-style ids; the pool variant and the blur follow from the id
CHUNK = 64  # at most, images per task sent to a decode process (and per GPU batch there)
NVJPEG_BATCH = 256
RESERVE_S = 8.0  # kept back from the budget for writing the result


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def make_jpegs(folder: Path, size: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image_id = FIRST_IMAGE_ID + i
        path = folder / f"{image_id}.jpg"
        path.write_bytes(thumbnails.thumbnail_bytes(image_id, size, blurred=i % 10 == 0))
        paths.append(path)
    return paths


def relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """Largest |values - reference| / |reference| over the images (NaN if any score is missing)."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if values.shape != reference.shape or np.isnan(values).any() or np.isnan(reference).any():
        return math.nan
    return float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-12)))


def scores_frame(paths: list[Path], blur_values, sobel_values, backend: str) -> pd.DataFrame:
    blur_values = np.asarray(blur_values, np.float64)
    return pd.DataFrame(
        {
            "image_id": [p.stem for p in paths],
            "blur_value": blur_values,
            "sobel_value": np.asarray(sobel_values, np.float64),
            "is_blurry": blur_values < blur.DEFAULT_THRESHOLD,
            "backend": backend,
            "reason": pd.Series([None] * len(paths), dtype=object),
        },
        columns=blur.COLUMNS,
    )


def agreement(paths: list[Path], device: str) -> dict:
    """Kornia on `device` against the cv2 reference, on the same decoded pixels."""
    box = BOXES["1024"]

    def decode_and_score(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
        gray = blur.decode_gray(path, box).gray
        return gray, (blur.laplacian_variance(gray), blur.tenengrad(gray))

    with ThreadPoolExecutor(blur.default_workers()) as pool:
        grays, pairs = zip(*pool.map(decode_and_score, paths), strict=True)
    reference = np.array(pairs)
    scorer = blur.KorniaScorer(device)
    kornia_scores = np.full_like(reference, np.nan)
    batch = CHUNK if device == "cuda" else 8
    for start in range(0, len(grays), batch):
        indices = list(range(start, min(start + batch, len(grays))))
        for idx, pair in scorer.submit(indices, [grays[i] for i in indices]):
            kornia_scores[idx] = pair
    for idx, pair in scorer.drain():
        kornia_scores[idx] = pair
    laplacian = relative_difference(kornia_scores[:, 0], reference[:, 0])
    gradient = relative_difference(kornia_scores[:, 1], reference[:, 1])
    worst = max(laplacian, gradient)
    return {
        "images": len(paths),
        "size": "1024x768",
        "kornia_device": device,
        "max_relative_difference_laplacian": laplacian,
        "max_relative_difference_tenengrad": gradient,
        "max_relative_difference": worst,
        "within_tolerance": bool(worst <= AGREEMENT_RTOL),
    }


# --- the ways from files to Parquet (each returns the scores it wrote) ---


def _init_decode_process() -> None:
    cv2.setNumThreads(1)


def _opencv_chunk(paths: list[Path], box: tuple[int, int]) -> pd.DataFrame:
    return blur.score_images(paths, backend="opencv", analysis_size=box, workers=1)


def _decode_chunk(paths: list[Path], box: tuple[int, int]) -> list[np.ndarray]:
    decoded = [blur.decode_gray(p, box) for p in paths]
    bad = [d.reason for d in decoded if d.gray is None]
    if bad:
        raise ValueError(f"undecodable check image: {bad[0]}")
    return [d.gray for d in decoded]


def _chunks(paths: list[Path]) -> list[list[Path]]:
    """Up to CHUNK paths each, at least 4 chunks per process so that every process has work."""
    size = max(1, min(CHUNK, math.ceil(len(paths) / (4 * blur.default_workers()))))
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def opencv_processes(
    processes: ProcessPoolExecutor, paths: list[Path], box: tuple[int, int], out: Path
) -> pd.DataFrame:
    frame = pd.concat(processes.map(_opencv_chunk, _chunks(paths), repeat(box)), ignore_index=True)
    write_parquet_atomic(frame, out)
    return frame


def pipeline_backend(paths, box, out: Path, backend: str) -> pd.DataFrame:
    frame = blur.score_images(paths, backend=backend, analysis_size=box)
    write_parquet_atomic(frame, out)
    return frame


def decode_processes_kornia(
    processes: ProcessPoolExecutor, paths, box, out: Path, device: str
) -> pd.DataFrame:
    scorer = blur.KorniaScorer(device)
    scores = np.full((len(paths), 2), np.nan)
    chunks = _chunks(paths)
    start = 0
    for images in processes.map(_decode_chunk, chunks, repeat(box)):
        for idx, pair in scorer.submit(list(range(start, start + len(images))), images):
            scores[idx] = pair
        start += len(images)
    for idx, pair in scorer.drain():
        scores[idx] = pair
    frame = scores_frame(paths, scores[:, 0], scores[:, 1], f"cv2 decode + kornia-{device}")
    write_parquet_atomic(frame, out)
    return frame


def nvjpeg_kornia(paths, box, out: Path, device: str) -> pd.DataFrame:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    scorer = blur.KorniaScorer(device)
    scores = np.full((len(paths), 2), np.nan)
    width, height = box
    with ThreadPoolExecutor(blur.default_workers()) as readers:
        encoded = readers.map(lambda p: read_file(str(p)), paths)
        for start in range(0, len(paths), NVJPEG_BATCH):
            batch = list(islice(encoded, NVJPEG_BATCH))
            gray = decode_jpeg(batch, mode=ImageReadMode.GRAY, device=device)
            if any(g.shape != (1, height, width) for g in gray):
                raise ValueError(f"the nvJPEG path expects images at {width}x{height}")
            for idx, pair in scorer.drain():  # the batch before, scored while this one decoded
                scores[idx] = pair
            indices = list(range(start, start + len(batch)))
            scorer.launch_pixels(indices, torch.cat(gray))
    for idx, pair in scorer.drain():
        scores[idx] = pair
    frame = scores_frame(paths, scores[:, 0], scores[:, 1], f"nvjpeg + kornia-{device}")
    write_parquet_atomic(frame, out)
    return frame


def images_per_second(
    run: Callable[[], pd.DataFrame], count: int, repeats: int, deadline: Deadline
) -> tuple[float, list[float], pd.DataFrame]:
    """Median images/s over up to `repeats` timed runs, after one untimed warm-up run; fewer repeats
    when the next one would not fit before the deadline."""
    with Stopwatch() as warm_up:
        frame = run()
    rates, last = [], warm_up.seconds
    while len(rates) < repeats and (not rates or deadline.left() > 2 * last + RESERVE_S):
        with Stopwatch() as watch:
            frame = run()
        last = watch.seconds
        rates.append(count / watch.seconds)
    return statistics.median(rates), rates, frame


def environment(gpu_device: str) -> dict:
    versions = {
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }
    cuda = False
    gpu = "none"
    try:
        import torch

        versions["torch"] = torch.__version__
        cuda = bool(torch.cuda.is_available())
        if cuda:
            gpu = torch.cuda.get_device_name(0)
        import kornia

        versions["kornia"] = kornia.__version__
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError as exc:
        versions["missing"] = str(exc)
    score_device = gpu_device if (gpu_device == "cpu" or cuda) else None
    return {
        "check": BENCHMARK,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {blur.default_workers()} usable cores",
        "load_average_at_start": round(os.getloadavg()[0], 1),
        "cuda_available": cuda,
        "gpu": gpu,
        "gpu_runs_on": score_device or "skipped (CUDA absent)",
        "versions": versions,
    }


def throughput_ways(processes: ProcessPoolExecutor, workers: int, device: str | None) -> list:
    """(name, run(paths, box, out) -> scores), the baseline first; run is None where CUDA is absent."""
    gpu = device or "cuda"
    ways = [
        (f"cv2 decode + cv2 scores, {workers} processes", partial(opencv_processes, processes)),
        (
            f"pipeline opencv backend, {workers} decode threads",
            partial(pipeline_backend, backend="opencv"),
        ),
        (
            f"pipeline kornia-{gpu} backend, {workers} decode threads",
            partial(pipeline_backend, backend=f"kornia-{gpu}"),
        ),
        (
            f"cv2 decode in {workers} processes + Kornia-{gpu} scores",
            partial(decode_processes_kornia, processes, device=gpu),
        ),
        (
            f"nvJPEG decode (torchvision, batch {NVJPEG_BATCH}) + Kornia-{gpu} scores",
            partial(nvjpeg_kornia, device=gpu),
        ),
    ]
    return ways if device else ways[:2] + [(name, None) for name, _ in ways[2:]]


def run_check(args: argparse.Namespace) -> dict:
    deadline = Deadline(args.budget_s)
    started = time.monotonic()
    result = environment(args.gpu_device)
    device = args.gpu_device if (args.gpu_device == "cpu" or result["cuda_available"]) else None
    label = result["gpu"] if result["cuda_available"] else "no CUDA: CPU figures only"
    if device == "cpu":
        label += "; GPU paths rehearsed with Kornia on the CPU"
    provenance = (
        f"[{label}] {result['machine']}, load average {result['load_average_at_start']} at the start, "
        f"{result['date'][:10]}"
    )
    result.update(images=args.images, figures=[], errors={}, complete=False)
    print(
        f"gpu_check: CUDA available: {result['cuda_available']}; GPU: {result['gpu']}", flush=True
    )

    def save() -> None:
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))

    def add(metric: str, value: float, unit: str, notes: str, **fields) -> None:
        figure = Figure(BENCHMARK, metric, value, unit, notes=f"{provenance}; {notes}", **fields)
        result["figures"].append(figure.__dict__)
        print(json.dumps({k: v for k, v in figure.__dict__.items() if k != "extra"}), flush=True)
        save()

    def fail(step: str, exc: Exception) -> str:
        traceback.print_exc()
        result["errors"][step] = f"{type(exc).__name__}: {exc}"
        return result["errors"][step]

    workers = blur.default_workers()
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp,
        ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_decode_process
        ) as processes,
    ):
        folder = Path(tmp)
        files = {size: make_jpegs(folder / size, size, args.images) for size in BOXES}
        agreement_device = device or "cpu"
        try:
            result["agreement"] = found = agreement(files["1024"], agreement_device)
            add(
                f"max relative difference, Kornia-{agreement_device} vs cv2 blur scores, same pixels",
                found["max_relative_difference"],
                "x",
                f"{found['images']} emulator JPEGs at 1024x768; Laplacian variance and Tenengrad",
                goal=f"<= {AGREEMENT_RTOL:g}",
                met=found["within_tolerance"],
            )
        except Exception as exc:
            fail("agreement", exc)
        for size, box in BOXES.items():
            paths, box_name = files[size], f"{box[0]}x{box[1]}"
            ways = throughput_ways(processes, workers, device)
            baseline_name, baseline, reference = ways[0][0], None, None
            for number, (way, run) in enumerate(ways):
                metric = f"images/s {box_name} JPEG files -> Parquet: {way}"
                if run is None:
                    add(metric, math.nan, "images/s", "not measured: CUDA absent")
                    continue
                if deadline.left() < RESERVE_S:
                    add(metric, math.nan, "images/s", "not measured: wall-clock budget spent")
                    continue
                out = folder / f"scores-{size}-{number}.parquet"
                try:
                    rate, rates, frame = images_per_second(
                        partial(run, paths, box, out), len(paths), args.repeats, deadline
                    )
                except Exception as exc:
                    add(metric, math.nan, "images/s", f"failed: {fail(f'{box_name} {way}', exc)}")
                    continue
                notes = f"{len(paths)} emulator JPEGs; runs {[round(r) for r in rates]}"
                extra: dict = {"images": len(paths), "rates": rates}
                fields: dict = {"extra": extra}
                if reference is None:
                    baseline, reference = rate, frame
                else:
                    difference = max(
                        relative_difference(frame[c], reference[c])
                        for c in ("blur_value", "sobel_value")
                    )
                    extra["max_relative_difference_vs_baseline"] = difference
                    notes += f"; scores vs the baseline's: max relative difference {difference:.2g}"
                    # nvJPEG's pixels may differ from libjpeg-turbo's by rounding: reported, not judged
                    if not way.startswith("nvJPEG") and not difference <= AGREEMENT_RTOL:
                        result["errors"][f"{box_name} {way}"] = f"scores differ by {difference:.3g}"
                    fields.update(baseline=baseline, baseline_name=baseline_name)
                if size == "256" and way.startswith("nvJPEG"):
                    fields.update(goal=f">= {GOAL_256:,} images/s", met=rate >= GOAL_256)
                add(metric, rate, "images/s", notes, **fields)
    result["complete"] = True
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs per size (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure, at most")
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-clock guard, seconds")
    parser.add_argument("--gpu-device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/gpu_check.json"))
    args = parser.parse_args(argv)
    result = run_check(args)
    print(f"gpu_check: wrote {args.output} in {result['elapsed_s']} s", flush=True)
    if not result["cuda_available"]:
        print("gpu_check: CUDA is absent here: the GPU figures are not measured.", flush=True)
    for name, error in result["errors"].items():
        print(f"gpu_check: ERROR {name}: {error}", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
