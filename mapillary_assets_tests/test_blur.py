from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mapillary_assets.pipeline import blur
from mapillary_assets.pipeline.blur import laplacian_variance, score_images, tenengrad

RELATIVE_TOLERANCE = 1e-3


def street_like(height: int, width: int, seed: int, blur_sigma: float = 0.0) -> np.ndarray:
    """A colour image with hard edges (facades, poles, lane marks) over a sky-to-road gradient."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = np.linspace(200, 70, height, dtype=np.float64)[:, None, None].astype(np.uint8)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(height // 4, height))
        w, h = int(rng.integers(5, width // 4 + 6)), int(rng.integers(5, height // 3 + 6))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(image, (x, y), (x + w, y + h), color, -1)
    for _ in range(10):
        x = int(rng.integers(0, width))
        cv2.line(image, (x, height // 5), (x, height), (30, 30, 30), 2)
    image = cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))
    if blur_sigma:
        image = cv2.GaussianBlur(image, (0, 0), blur_sigma)
    return image


def write_jpeg(path: Path, image: np.ndarray, quality: int = 90) -> Path:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


# The independent reference: the metrics from their definitions in plain NumPy, not through OpenCV's
# filters. Kernels are applied as correlation (as cv2.filter2D does; the sign of a Sobel response does not
# matter once squared) over a border mirrored without repeating the edge pixel: OpenCV's BORDER_DEFAULT
# (BORDER_REFLECT_101, "gfedcb|abcdefgh|gfedcba"), which is NumPy's pad mode "reflect".
LAPLACIAN_4_NEIGHBOUR = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = SOBEL_X.T


def correlate3x3(gray: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    padded = np.pad(np.asarray(gray, dtype=np.float64), 1, mode="reflect")
    height, width = gray.shape
    out = np.zeros((height, width))
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[dy : dy + height, dx : dx + width]
    return out


def reference_laplacian_variance(gray: np.ndarray) -> float:
    lap = correlate3x3(gray, LAPLACIAN_4_NEIGHBOUR)
    mean = lap.sum() / lap.size
    return float(((lap - mean) ** 2).sum() / lap.size)


def reference_tenengrad(gray: np.ndarray) -> float:
    gx, gy = correlate3x3(gray, SOBEL_X), correlate3x3(gray, SOBEL_Y)
    return float((gx * gx + gy * gy).sum() / gx.size)


def reference_resize(gray: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """The analysis box (width, height), transposed for a portrait image, reached with INTER_AREA."""
    width, height = box
    if gray.shape[0] > gray.shape[1]:
        width, height = height, width
    if gray.shape == (height, width):
        return gray
    return cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)


def block_mean(gray: np.ndarray, factor: int) -> np.ndarray:
    """Area averaging for an integer factor: each output pixel the exact mean of its factor x factor block."""
    height, width = gray.shape[0] // factor, gray.shape[1] // factor
    blocks = gray[: height * factor, : width * factor].reshape(height, factor, width, factor)
    return blocks.astype(np.float64).mean(axis=(1, 3))


def reference_scores(path: Path, analysis_size=blur.DEFAULT_ANALYSIS_SIZE) -> tuple[float, float]:
    """The reference on the same decoded pixels the pipeline scores."""
    gray = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_GRAYSCALE)
    gray = reference_resize(gray, analysis_size)
    return reference_laplacian_variance(gray), reference_tenengrad(gray)


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("blur-samples")
    cases = [
        ((768, 1024), 0.0),  # analysis size, sharp
        ((768, 1024), 3.0),  # analysis size, blurred
        ((600, 800), 0.0),  # smaller: upscaled
        ((1024, 768), 2.0),  # portrait
        ((333, 517), 0.0),  # odd size
        ((1536, 2048), 1.0),  # larger: INTER_AREA downscale
    ]
    return [
        write_jpeg(folder / f"{1000 + i}.jpg", street_like(h, w, seed=i, blur_sigma=sigma))
        for i, ((h, w), sigma) in enumerate(cases)
    ]


def test_pure_functions_equal_the_numpy_reference():
    rng = np.random.default_rng(7)
    for shape in [(768, 1024), (333, 517), (3, 3), (2, 2), (1, 9)]:
        gray = rng.integers(0, 256, shape, dtype=np.uint8)
        expected_variance = reference_laplacian_variance(gray)
        expected_gradient = reference_tenengrad(gray)
        assert laplacian_variance(gray) == pytest.approx(expected_variance, rel=1e-12), shape
        assert laplacian_variance(gray.astype(np.float64)) == pytest.approx(
            expected_variance, rel=1e-12
        )
        assert tenengrad(gray) == pytest.approx(expected_gradient, rel=1e-12), shape
        assert tenengrad(gray.astype(np.float64)) == pytest.approx(expected_gradient, rel=1e-12)


def test_tenengrad_equals_the_reference_exactly():
    """Integer derivatives summed exactly: the very same float as the reference, not just a close one, so a
    change of filter calls cannot move a published score."""
    rng = np.random.default_rng(11)
    for shape in [(192, 256), (768, 1024), (333, 517), (2, 2)]:
        gray = rng.integers(0, 256, shape, dtype=np.uint8)
        assert tenengrad(gray) == reference_tenengrad(gray), shape


def test_numpy_reference_on_a_hand_computed_image():
    """The reference itself, on an image small enough to work out by hand, where the border mode shows."""
    gray = np.tile(np.array([8, 0, 0, 0], np.uint8), (3, 1))  # every row the same: no vertical term
    # Each row mirrored without its edge pixel: 0 | 8 0 0 0 | 0. Laplacian per row: -16, 8, 0, 0
    # (mean -2): variance (256 + 64) / 4 - 4 = 76. A replicated or edge-repeating border would give -8
    # at the first pixel instead.
    assert reference_laplacian_variance(gray) == pytest.approx(76.0)
    # Sobel x per row: 4 * (right - left) = 0, -32, 0, 0: mean square 256 (512 with a replicated border).
    assert reference_tenengrad(gray) == pytest.approx(256.0)
    assert laplacian_variance(gray) == pytest.approx(76.0)
    assert tenengrad(gray) == pytest.approx(256.0)


def test_constant_image_scores_zero():
    gray = np.full((50, 60), 128, np.uint8)
    assert laplacian_variance(gray) == 0.0
    assert tenengrad(gray) == 0.0


@pytest.mark.parametrize("backend", ["opencv", "kornia-cpu"])
def test_backends_agree_with_reference(sample_images, backend):
    frame = score_images(sample_images, backend=backend, workers=2, batch_size=4)
    assert list(frame.columns) == blur.COLUMNS
    assert (frame["backend"] == backend).all()
    assert frame["reason"].isna().all()
    for path, row in zip(sample_images, frame.itertuples()):
        expected_blur, expected_sobel = reference_scores(path)
        assert row.image_id == path.stem
        assert math.isclose(row.blur_value, expected_blur, rel_tol=RELATIVE_TOLERANCE), (
            path,
            backend,
        )
        assert math.isclose(row.sobel_value, expected_sobel, rel_tol=RELATIVE_TOLERANCE), (
            path,
            backend,
        )


def test_kornia_cpu_agrees_with_opencv_on_native_sizes(sample_images):
    opencv = score_images(sample_images, backend="opencv", analysis_size=None, workers=2)
    kornia = score_images(
        sample_images, backend="kornia-cpu", analysis_size=None, workers=2, batch_size=3
    )
    np.testing.assert_allclose(kornia["blur_value"], opencv["blur_value"], rtol=1e-9)
    np.testing.assert_allclose(kornia["sobel_value"], opencv["sobel_value"], rtol=1e-9)


@pytest.mark.gpu
def test_kornia_cuda_agrees_with_reference(sample_images):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA on this machine")
    frame = score_images(sample_images, backend="kornia-cuda", batch_size=4)
    auto = score_images(sample_images, backend="auto")
    assert (auto["backend"] == "kornia-cuda").all()
    for path, row in zip(sample_images, frame.itertuples()):
        expected_blur, expected_sobel = reference_scores(path)
        assert math.isclose(row.blur_value, expected_blur, rel_tol=RELATIVE_TOLERANCE)
        assert math.isclose(row.sobel_value, expected_sobel, rel_tol=RELATIVE_TOLERANCE)


def test_auto_picks_opencv_without_cuda(sample_images, monkeypatch):
    monkeypatch.setattr(blur, "_cuda_available", lambda: False)
    assert blur.resolve_backend("auto") == "opencv"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        blur.resolve_backend("kornia-cuda")
    with pytest.raises(ValueError, match="unknown blur backend"):
        blur.resolve_backend("magic")


def test_blurred_image_scores_below_sharp(sample_images):
    frame = score_images(sample_images[:2], backend="opencv")
    sharp, blurred = frame["blur_value"]
    assert sharp > 100.0 > blurred
    assert frame["is_blurry"].tolist() == [False, True]
    assert frame["sobel_value"].iloc[0] > frame["sobel_value"].iloc[1]


def test_portrait_uses_transposed_analysis_box():
    gray = np.zeros((1024, 768), np.uint8)
    assert blur.resize_to_analysis(gray, (1024, 768)).shape == (1024, 768)
    assert blur.resize_to_analysis(np.zeros((300, 400), np.uint8), (1024, 768)).shape == (768, 1024)
    assert blur.resize_to_analysis(gray, None) is gray


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((600, 800), (1024, 768)),  # upscaled
        ((333, 517), (1024, 768)),  # odd size, upscaled by a different factor per axis
        ((1537, 2049), (1024, 768)),  # odd size, downscaled by a non-integer factor
        ((1500, 1100), (1024, 768)),  # portrait, downscaled into the transposed box
        ((200, 150), (256, 192)),  # portrait, upscaled into the transposed box
    ],
)
def test_resize_matches_area_interpolation(shape, box):
    gray = cv2.cvtColor(street_like(*shape, seed=sum(shape)), cv2.COLOR_BGR2GRAY)
    resized = blur.resize_to_analysis(gray, box)
    expected = reference_resize(gray, box)
    assert resized.dtype == np.uint8 and resized.shape == expected.shape
    np.testing.assert_array_equal(resized, expected)


@pytest.mark.parametrize(("factor", "box"), [(2, (1024, 768)), (4, (256, 192)), (3, (1024, 768))])
def test_integer_downscale_is_the_block_mean(factor, box):
    """Independent of OpenCV: for an integer factor, area interpolation is the mean of each block."""
    width, height = box
    gray = cv2.cvtColor(
        street_like(height * factor, width * factor, seed=factor), cv2.COLOR_BGR2GRAY
    )
    resized = blur.resize_to_analysis(gray, box)
    assert resized.shape == (height, width)
    # Each pixel is the block mean rounded to a nearest integer (OpenCV breaks a tie of x.5 up for factor
    # 2 and to even for 4, so at a tie either neighbour is right; elsewhere the rounding is unique).
    assert np.abs(resized - block_mean(gray, factor)).max() <= 0.5


def test_decoded_pixels_are_the_resized_decode(sample_images):
    for path in sample_images:
        decoded = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_GRAYSCALE)
        expected = reference_resize(decoded, blur.DEFAULT_ANALYSIS_SIZE)
        np.testing.assert_array_equal(blur.decode_gray(path).gray, expected)


@pytest.mark.parametrize("backend", ["opencv", "kornia-cpu"])
def test_bad_files_give_nan_rows_with_reason(tmp_path, sample_images, backend):
    good = sample_images[0]
    garbage = tmp_path / "111.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    truncated = tmp_path / "222.jpg"
    truncated.write_bytes(good.read_bytes()[:5000])
    corrupt = tmp_path / "333.jpg"
    corrupt.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")
    missing = tmp_path / "444.jpg"
    seen = []
    frame = score_images(
        [garbage, good, truncated, corrupt, missing],
        backend=backend,
        progress=lambda *a: seen.append(a),
    )
    assert frame["image_id"].tolist() == ["111", good.stem, "222", "333", "444"]
    bad = frame.drop(index=1)
    assert bad["blur_value"].isna().all() and bad["sobel_value"].isna().all()
    assert not bad["is_blurry"].any()
    assert bad["reason"].notna().all()
    assert "not a JPEG" in frame.loc[0, "reason"]
    assert "truncated" in frame.loc[2, "reason"]
    assert "corrupt" in frame.loc[3, "reason"]
    assert "unreadable" in frame.loc[4, "reason"]
    assert frame.loc[1, "reason"] is None and not math.isnan(frame.loc[1, "blur_value"])
    assert seen[-1] == (5, 5, 4)
    assert frame["blur_value"].dtype == np.float64 and frame["is_blurry"].dtype == bool


def test_empty_input():
    frame = score_images([], backend="opencv")
    assert list(frame.columns) == blur.COLUMNS and len(frame) == 0
    assert isinstance(frame, pd.DataFrame)


# is_blurry against the emulator's ground truth

EMULATOR_TOKEN = "MLY|blur-tests"


@pytest.fixture(scope="module")
def emulator_thumbnails(tmp_path_factory):
    """~300 emulator thumbnails (1024 px) downloaded through the pipeline, with the world's truth."""
    import asyncio

    from shapely.geometry import box

    from mapillary_assets.api.client import MapillaryClient
    from mapillary_assets.api.client_config import ClientConfig
    from mapillary_assets.emulator import EmulatorServer, World
    from mapillary_assets.pipeline.download import download_thumbnails
    from mapillary_assets.storage import DataLayout

    world = World(seed=5, scale=0.005, blurred_fraction=0.25)
    ids: list[str] = []
    for x, y in world.nonempty_z14_tiles(box(8.45, 47.32, 8.62, 47.43)):
        ids.extend(record.id for record in world.images_in_z14_tile(x, y))
        if len(ids) >= 300:
            break
    ids = ids[:300]
    layout = DataLayout(tmp_path_factory.mktemp("blur-emulator"))

    async def fetch(server):
        settings = ClientConfig(
            token=EMULATOR_TOKEN, graph_url=server.graph_url, tiles_url=server.tiles_url
        )
        async with MapillaryClient(settings) as client:
            return await download_thumbnails(client, layout, ids)

    with EmulatorServer(world=world, token=EMULATOR_TOKEN) as server:
        frame = asyncio.run(fetch(server))
    assert (frame["status"] == "ok").all()
    paths = [layout.root / p for p in frame["path"]]
    truth = {image_id: world.is_blurred(image_id) for image_id in ids}
    return paths, truth


def test_is_blurry_matches_emulator_ground_truth(emulator_thumbnails):
    paths, truth = emulator_thumbnails
    frame = score_images(paths, backend="auto")
    assert frame["reason"].isna().all()
    predicted = frame.set_index("image_id")["is_blurry"]
    actual = pd.Series(truth).reindex(predicted.index)
    true_positives = int((predicted & actual).sum())
    precision = true_positives / max(1, int(predicted.sum()))
    recall = true_positives / max(1, int(actual.sum()))
    print(
        f"\nblur detection on {len(frame)} emulator thumbnails ({int(actual.sum())} blurred): "
        f"precision {precision:.3f}, recall {recall:.3f}"
    )
    assert actual.sum() >= 30
    assert precision >= 0.9 and recall >= 0.9


def test_backends_agree_on_emulator_thumbnails(emulator_thumbnails):
    paths = emulator_thumbnails[0][:12]
    opencv = score_images(paths, backend="opencv")
    kornia = score_images(paths, backend="kornia-cpu")
    for path, a, b in zip(paths, opencv.itertuples(), kornia.itertuples()):
        expected_blur, expected_sobel = reference_scores(path)
        for value in (a.blur_value, b.blur_value):
            assert math.isclose(value, expected_blur, rel_tol=RELATIVE_TOLERANCE)
        for value in (a.sobel_value, b.sobel_value):
            assert math.isclose(value, expected_sobel, rel_tol=RELATIVE_TOLERANCE)


def test_kornia_scorer_overlapped_submission_returns_every_result_once(sample_images):
    """The CUDA path fetches each batch's results one submit late; exercised here on the CPU."""
    grays = [blur.decode_gray(p, None).gray for p in sample_images]
    scorer = blur.KorniaScorer("cpu")
    scorer.asynchronous = True
    results = {}
    for start in range(0, len(grays), 2):
        batch = list(range(start, min(start + 2, len(grays))))
        for index, values in scorer.submit(batch, [grays[i] for i in batch]):
            assert index not in results
            results[index] = values
        assert max(results, default=-1) < start  # the batch just submitted is still in flight
    for index, values in scorer.drain():
        results[index] = values
    assert sorted(results) == list(range(len(grays)))
    for index, (variance, gradient) in results.items():
        assert variance == pytest.approx(laplacian_variance(grays[index]), rel=1e-9)
        assert gradient == pytest.approx(tenengrad(grays[index]), rel=1e-9)
