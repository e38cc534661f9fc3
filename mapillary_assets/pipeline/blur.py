"""Blur scores of stored thumbnails: variance of the Laplacian and Tenengrad (mean squared Sobel gradient).

Dagster-free. Every backend scores the same pixels: each file is decoded once on the CPU straight to
grayscale (`cv2.imdecode(..., IMREAD_GRAYSCALE)`: libjpeg-turbo then skips the chroma IDCT and
upsampling; measured 1.5-1.9 ms per 1024x768 thumbnail vs 2.7-4.8 ms for a colour decode + `cvtColor`,
and on par with simplejpeg's GRAY decode, so no extra dependency) and brought to the analysis size, so
backends differ only in the filter arithmetic, which agrees with the OpenCV reference
`cv2.Laplacian(gray, cv2.CV_64F).var()` to floating-point rounding.

Analysis size: scores depend on resolution, so the images of a run are compared at one size, the 4:3
box of the thumbnail size the run downloaded (`analysis_box`: 1024x768 for `thumb_1024_url`, the
default; 256x192 for `thumb_256_url`). Images of another size are resized with `INTER_AREA`; a
portrait image uses the transposed box (768x1024) so it is not squashed. `analysis_size=None` scores
native pixels. The box follows the download instead of being one fixed size because upsampling adds
no detail, only cost: a 256 px thumbnail brought to 1024x768 cost 2.9 ms vs 0.33 ms at its own size
(2 threads, emulator thumbnails). The threshold therefore applies at the run's analysis size: a score
at 256x192 is not comparable with one at 1024x768 (downsampling raises the Laplacian's variance), and
the blur asset records the size it used.

Backends:
- "opencv": the reference and the fastest CPU path. The 4-neighbour Laplacian and the 3x3 Sobel run in
  int16 (exact for 8-bit input) and are reduced with exact float64 sums, ~4x cheaper than CV_64F; both
  Sobel derivatives come from one `cv2.spatialGradient` pass. Each thread-pool task takes a slice of up
  to 32 files (decodes and scores them; for Kornia, decodes them): one task per file cost 0.03-0.1 ms of
  CPU per 256 px image in thread hand-offs (benchmarks/bench_ledger.py has the blur step's ledger).
- "kornia-cpu" / "kornia-cuda": `kornia.filters.filter2d` with the explicit kernels (Kornia's own
  `laplacian` is a normalised 8-neighbour kernel) and border 'reflect' (torch's reflect == OpenCV's
  BORDER_REFLECT_101 == BORDER_DEFAULT). Filters run in float32, which is exact here: pixels are
  integers <= 255, so filter outputs and their squares stay below 2**24; the sums are accumulated in
  float64 because a float32 sum over ~800k pixels would lose digits.
  On CUDA, decoded batches go through a pinned host buffer with a non-blocking copy, and a batch's
  results are only fetched after the next batch is decoded, so the GPU works while the host decodes;
  decoding runs in a thread pool (OpenCV releases the GIL), so the GPU is fed by every core.
  A future option is nvJPEG decoding on the GPU (torchvision.io.decode_jpeg(device="cuda")).
- "auto": "kornia-cuda" when CUDA is available, else "opencv" (Kornia on the CPU measured ~30x slower:
  ~11 vs ~350 images/s on 2 cores, see benchmarks/bench_blur.py).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath

import cv2
import numpy as np
import pandas as pd

DEFAULT_THRESHOLD = 100.0
DEFAULT_ANALYSIS_SIZE = (1024, 768)  # (width, height): analysis_box(1024), the default thumbnails
BACKENDS = ("auto", "opencv", "kornia-cpu", "kornia-cuda")
COLUMNS = ["image_id", "blur_value", "sobel_value", "is_blurry", "backend", "reason"]

# Kornia on the CPU keeps ~5 float32 images per batch element alive; larger batches only cost memory.
_KORNIA_CPU_MAX_BATCH = 8

Progress = Callable[[int, int, int], None]


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (BORDER_DEFAULT), equal to `cv2.Laplacian(gray, CV_64F).var()`."""
    if gray.dtype != np.uint8:
        return float(cv2.Laplacian(np.asarray(gray, dtype=np.float64), cv2.CV_64F).var())
    # int16 holds every 8-bit Laplacian (|value| <= 1020) exactly; the sums are exact in float64.
    lap = cv2.Laplacian(gray, cv2.CV_16S)
    n = lap.size
    total = cv2.sumElems(lap)[0]
    squares = cv2.norm(lap, cv2.NORM_L2SQR)
    return float(max(squares - total * total / n, 0.0) / n)


def tenengrad(gray: np.ndarray) -> float:
    """Mean of gx**2 + gy**2 with 3x3 Sobel derivatives (BORDER_DEFAULT)."""
    if gray.dtype != np.uint8:
        gray = np.asarray(gray, dtype=np.float64)
        gx = cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3)
        gy = cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)
        return float(np.mean(gx * gx + gy * gy))
    # Both 3x3 Sobel derivatives in one pass, the same int16 values as two cv2.Sobel calls.
    gx, gy = cv2.spatialGradient(gray)
    return float((cv2.norm(gx, cv2.NORM_L2SQR) + cv2.norm(gy, cv2.NORM_L2SQR)) / gx.size)


def is_jpeg_bytes(data: bytes) -> bool:
    return len(data) >= 4 and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def analysis_box(thumbnail_width: int) -> tuple[int, int]:
    """The (width, height) images are scored at for thumbnails `thumbnail_width` px wide: its 4:3 box."""
    return thumbnail_width, thumbnail_width * 3 // 4


def resize_to_analysis(gray: np.ndarray, analysis_size: tuple[int, int] | None) -> np.ndarray:
    if analysis_size is None:
        return gray
    width, height = analysis_size
    if gray.shape[0] > gray.shape[1] and width > height:
        width, height = height, width
    if gray.shape == (height, width):
        return gray
    return cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)


@dataclass
class _Decoded:
    gray: np.ndarray | None
    reason: str | None


def read_file(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def decode_gray(
    path: Path | str,
    analysis_size: tuple[int, int] | None = DEFAULT_ANALYSIS_SIZE,
    read: Callable[[Path | str], bytes] = read_file,
) -> _Decoded:
    """Read one image (a file, or what `read` returns for `path`) and decode it to 8-bit grayscale at the
    analysis size; never raises for bad files."""
    try:
        data = read(path)
    except OSError as exc:
        return _Decoded(None, f"unreadable: {type(exc).__name__}: {exc.strerror or exc}")
    if data[:2] != b"\xff\xd8":
        return _Decoded(None, "not a JPEG (no SOI marker)")
    if data[-2:] != b"\xff\xd9":
        return _Decoded(None, "truncated JPEG (no EOI marker)")
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None or gray.size == 0:
        return _Decoded(None, "corrupt JPEG (decoder rejected it)")
    return _Decoded(resize_to_analysis(gray, analysis_size), None)


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown blur backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "kornia-cuda" if _cuda_available() else "opencv"
    if backend == "kornia-cuda" and not _cuda_available():
        raise RuntimeError(
            "blur backend 'kornia-cuda' needs CUDA, and torch.cuda.is_available() is False"
        )
    return backend


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _ordered_map(
    executor: ThreadPoolExecutor, fn: Callable, items: Sequence, ahead: int
) -> Iterator:
    """executor.map with at most `ahead` tasks in flight, so decoded images never pile up in memory."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _slice_size(total: int, workers: int) -> int:
    """Images per thread-pool task: a task per image cost 0.03-0.1 ms of CPU per 256 px image in thread
    hand-offs (its decode costs 0.3 ms); up to 32 per task, yet at least 4 tasks per worker to share the work."""
    return max(1, min(32, total // (4 * workers)))


def _score_slice(
    paths: Sequence[Path | str],
    analysis_size: tuple[int, int] | None,
    read: Callable[[Path | str], bytes] = read_file,
) -> list[tuple[float, float, str | None]]:
    scores: list[tuple[float, float, str | None]] = []
    for path in paths:
        decoded = decode_gray(path, analysis_size, read)
        if decoded.gray is None:
            scores.append((math.nan, math.nan, decoded.reason))
        else:
            scores.append((laplacian_variance(decoded.gray), tenengrad(decoded.gray), None))
    return scores


def score_images(
    paths: Sequence[Path],
    backend: str = "auto",
    threshold: float = DEFAULT_THRESHOLD,
    analysis_size: tuple[int, int] | None = DEFAULT_ANALYSIS_SIZE,
    batch_size: int = 64,
    workers: int | None = None,
    progress: Progress | None = None,
    read: Callable[[Path | str], bytes] = read_file,
) -> pd.DataFrame:
    """Score JPEG files (or the objects `read` returns for the keys in `paths`); one row per path in
    input order (image_id = file stem).

    Unreadable or non-JPEG files give a row with NaN scores, is_blurry False and a `reason`.
    `batch_size` is the number of images per Kornia batch (capped at 8 on the CPU); `workers` the
    decode threads (default: the usable CPU cores).
    """
    resolved = resolve_backend(backend)
    paths = list(paths)
    workers = workers or default_workers()
    total = len(paths)
    blur = np.full(total, np.nan)
    sobel = np.full(total, np.nan)
    reasons: list[str | None] = [None] * total
    counter = _ProgressCounter(total, progress)

    size = _slice_size(total, workers)
    slices = [paths[start : start + size] for start in range(0, total, size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blur-decode") as executor:
        if resolved == "opencv":
            index = 0
            for scored in _ordered_map(
                executor, lambda part: _score_slice(part, analysis_size, read), slices, 2 * workers
            ):
                failed = 0
                for b, s, reason in scored:
                    blur[index], sobel[index], reasons[index] = b, s, reason
                    failed += reason is not None
                    index += 1
                counter.advance(len(scored), failed)
        else:
            device = "cuda" if resolved == "kornia-cuda" else "cpu"
            if device == "cpu":
                batch_size = min(batch_size, _KORNIA_CPU_MAX_BATCH)
            scorer = KorniaScorer(device)
            # About 2 batches + a slice per worker of decoded images in flight, as many as the GPU needs.
            decoded_stream = (
                decoded
                for part in _ordered_map(
                    executor,
                    lambda part: [decode_gray(p, analysis_size, read) for p in part],
                    slices,
                    max(workers, (2 * batch_size) // size + workers),
                )
                for decoded in part
            )
            batch_indices: list[int] = []
            batch_images: list[np.ndarray] = []

            def flush() -> None:
                for idx, (b, s) in scorer.submit(batch_indices, batch_images):
                    blur[idx], sobel[idx] = b, s
                    counter.advance(1, 0)
                batch_indices.clear()
                batch_images.clear()

            for index, decoded in enumerate(decoded_stream):
                if decoded.gray is None:
                    reasons[index] = decoded.reason
                    counter.advance(1, 1)
                    continue
                batch_indices.append(index)
                batch_images.append(decoded.gray)
                if len(batch_images) >= batch_size:
                    flush()
            flush()
            for idx, (b, s) in scorer.drain():
                blur[idx], sobel[idx] = b, s
                counter.advance(1, 0)

    return pd.DataFrame(
        {
            "image_id": pd.Series([PurePath(p).stem for p in paths], dtype=object),
            "blur_value": blur.astype(np.float64),
            "sobel_value": sobel.astype(np.float64),
            "is_blurry": np.where(np.isnan(blur), False, blur < threshold).astype(bool),
            "backend": pd.Series([resolved] * total, dtype=object),
            "reason": pd.Series(reasons, dtype=object),
        },
        columns=COLUMNS,
    )


class _ProgressCounter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.progress, self.done, self.failed = total, progress, 0, 0

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        if self.progress is not None:
            self.progress(self.done, self.total, self.failed)


class KorniaScorer:
    """Laplacian variance and Tenengrad of uint8 grayscale batches with kornia.filters.filter2d.

    `submit` launches a batch and returns the results finished so far: on CUDA those of the batch
    before (its filters ran on the GPU while the host decoded this one), on the CPU this batch's own.
    `drain` returns whatever is still in flight.
    """

    def __init__(self, device: str = "cpu") -> None:
        import kornia  # noqa: F401  (fail early with a clear ImportError)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # On CUDA: pinned host buffers, non-blocking copies, and results fetched one batch late.
        self.pinned = self.asynchronous = self.device.type == "cuda"
        laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.kernels = [k[None].to(self.device) for k in (laplace, sobel_x, sobel_x.T.contiguous())]
        self._pinned: dict[tuple[int, int], object] = {}
        self._pending: list[tuple[list[int], object, object]] = []

    def _host_batch(self, images: list[np.ndarray]):
        torch = self.torch
        if not self.pinned:
            return torch.from_numpy(np.stack(images))
        # One pinned buffer per image shape is enough: every earlier copy out of it has completed,
        # because submit() collects (synchronises) the previous batch before filling it again.
        shape = images[0].shape
        buffer = self._pinned.get(shape)
        if buffer is None or buffer.shape[0] < len(images):
            buffer = torch.empty((len(images), *shape), dtype=torch.uint8).pin_memory()
            self._pinned[shape] = buffer
        view = buffer.numpy()
        for position, image in enumerate(images):
            view[position] = image
        return buffer[: len(images)]

    def _launch(self, indices: list[int], images: list[np.ndarray]) -> None:
        host = self._host_batch(images)
        self.launch_pixels(indices, host.to(self.device, non_blocking=self.pinned))

    def launch_pixels(self, indices: list[int], gray) -> None:
        """Start scoring a uint8 batch [B, H, W] already on the scorer's device (e.g. decoded there by
        nvJPEG); `drain` returns the results."""
        import kornia

        torch = self.torch
        # float32 is exact here: integer pixels <= 255 and integer kernels keep every filter output and its
        # square below 2**24 (also under TF32 convolutions, whose inputs these integers fit).
        pixels = gray.unsqueeze(1).to(torch.float32)
        lap, gx, gy = (
            kornia.filters.filter2d(pixels, k, border_type="reflect") for k in self.kernels
        )
        dims = (1, 2, 3)
        n = float(pixels[0].numel())
        lap_sum = torch.sum(lap, dim=dims, dtype=torch.float64)
        lap_squares = torch.sum(lap * lap, dim=dims, dtype=torch.float64)
        variance = torch.clamp(lap_squares - lap_sum * lap_sum / n, min=0.0) / n
        gradient = torch.sum(gx * gx + gy * gy, dim=dims, dtype=torch.float64) / n
        self._pending.append((list(indices), variance, gradient))

    def drain(self) -> list[tuple[int, tuple[float, float]]]:
        results = []
        for indices, variance, gradient in self._pending:
            for idx, b, s in zip(indices, variance.cpu().tolist(), gradient.cpu().tolist()):
                results.append((idx, (b, s)))
        self._pending.clear()
        return results

    def submit(
        self, indices: list[int], images: list[np.ndarray]
    ) -> list[tuple[int, tuple[float, float]]]:
        if not images:
            return []
        finished = self.drain() if self.asynchronous else []
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(position)
        for positions in by_shape.values():
            self._launch([indices[p] for p in positions], [images[p] for p in positions])
        return finished if self.asynchronous else self.drain()
