"""Pictures for the Dagster UI: small PNGs drawn with matplotlib (Agg), shown as Markdown data URIs.

Every picture takes aggregated or capped inputs (histogram counts, grid counts, a sample of sequences, a
dozen thumbnails), so drawing costs the same at 1.2 M images as at a thousand. Figures are built with
`matplotlib.figure.Figure` (no pyplot global state: safe in any thread or process) and stored as a
palette PNG (a chart has few colours; it keeps each picture at a few tens of KB in the event log).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import mercantile
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from mapillary_assets.pipeline.aoi import parse_tile_key
from mapillary_assets.pipeline.geopackage import PublishedOverview

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DPI = 80
_PALETTE_COLOURS = 128
_EMPTY_COLOUR, _MISSING_COLOUR, _FAILED_COLOUR = "#ffffff", "#d9d9d9", "#d62728"


def png_markdown(png: bytes | None, alt: str) -> str:
    """Markdown showing `png` inline (Dagster renders data-URI images in Markdown metadata)."""
    if png is None:
        return f"({alt}: nothing to draw)"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _png(figure: Figure) -> bytes:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3]).quantize(
        colors=_PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def blur_histogram_png(values, threshold: float | None = None, bins: int = 40) -> bytes | None:
    """Histogram of blur scores on a log axis with the `is_blurry` threshold as a line; None if no scores."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data) & (data > 0)]
    if data.size == 0:
        return None
    low, high = float(data.min()), float(data.max())
    if threshold and threshold > 0:
        low, high = min(low, threshold), max(high, threshold)
    edges = np.geomspace(low, max(high, low * 1.001), bins + 1)
    counts, _ = np.histogram(data, bins=edges)
    blurry = int((data < threshold).sum()) if threshold else 0
    figure = Figure(figsize=(6, 2.8), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    colours = ["#d62728" if threshold and right <= threshold else "#1f77b4" for right in edges[1:]]
    axes.bar(
        edges[:-1],
        counts,
        width=np.diff(edges),
        align="edge",
        color=colours,
        edgecolor="white",
        linewidth=0.3,
    )
    axes.set_xscale("log")
    if threshold and threshold > 0:
        axes.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"threshold {threshold:g}",
        )
        axes.legend(loc="upper right", fontsize=8, frameon=False)
    axes.set_xlabel("blur_value (variance of the Laplacian, log scale)", fontsize=8)
    axes.set_ylabel("images", fontsize=8)
    axes.set_title(f"{data.size:,} scored, {blurry:,} blurry (red)", fontsize=9)
    axes.tick_params(labelsize=7)
    return _png(figure)


def contact_sheet_png(
    paths: Sequence[Path | str],
    values,
    threshold: float,
    per_row: int = 6,
    read: Callable[[Path | str], bytes] | None = None,
) -> bytes | None:
    """Two rows of thumbnails with their scores, the blurriest on top and the sharpest below, to judge
    the threshold by eye; unreadable files show as a grey tile. None when nothing was scored."""
    data = np.asarray(values, dtype=float)
    scored = np.flatnonzero(np.isfinite(data))
    if scored.size == 0:
        return None
    ordered = scored[np.argsort(data[scored], kind="stable")]
    blurriest = ordered[:per_row]
    sharpest = ordered[::-1][: min(per_row, max(ordered.size - blurriest.size, 0))]
    rows = [
        ("blurriest", [(paths[i], data[i]) for i in blurriest]),
        ("sharpest", [(paths[i], data[i]) for i in sharpest]),
    ]
    columns = len(blurriest)
    figure = Figure(figsize=(max(1.25 * columns, 4.5), 2.6), dpi=_DPI, layout="constrained")
    grid = figure.subplots(2, columns, squeeze=False)
    for row, (label, items) in enumerate(rows):
        for column in range(columns):
            axes = grid[row][column]
            axes.set_xticks([])
            axes.set_yticks([])
            if column >= len(items):
                axes.set_axis_off()
                continue
            path, score = items[column]
            axes.imshow(_thumbnail(path, read))
            blurry = score < threshold
            axes.set_title(
                f"{score:,.0f}" if score >= 10 else f"{score:.2f}",
                fontsize=8,
                color=_FAILED_COLOUR if blurry else "black",
            )
            for spine in axes.spines.values():
                spine.set_edgecolor(_FAILED_COLOUR if blurry else "#2ca02c")
                spine.set_linewidth(2)
        grid[row][0].set_ylabel(label, fontsize=8)
    figure.suptitle(
        f"blur_value of the extremes (red: below the threshold {threshold:g})", fontsize=9
    )
    return _png(figure)


def _thumbnail(path: Path | str, read=None, width: int = 96) -> np.ndarray:
    # IMREAD_REDUCED_* decodes at 1/4 size directly: a 1024 px JPEG costs a fraction of a full decode.
    if read is None:
        image = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4)
    else:
        try:
            data = np.frombuffer(read(path), np.uint8)
        except OSError:
            data = np.zeros(0, np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_4) if data.size else None
    if image is None:
        return np.full((width * 3 // 4, width, 3), 200, np.uint8)
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return cv2.cvtColor(
        cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )


def _outline(axes, geometry) -> None:
    for polygon in getattr(geometry, "geoms", [geometry]):
        x, y = polygon.exterior.xy
        axes.plot(x, y, color="black", linewidth=1.2)


def _geographic_aspect(axes, geometry) -> None:
    axes.set_aspect(1 / max(math.cos(math.radians(geometry.centroid.y)), 0.05))
    axes.tick_params(labelsize=7)


def tile_map_png(
    aoi_geometry,
    image_counts: Mapping[str, int | None],
    failed: Sequence[str] = (),
    run_keys: Sequence[str] = (),
    counted: str = "images",
) -> bytes:
    """The AOI outline and its partition tiles coloured by image count: empty tiles white, tiles not
    discovered yet grey (count None), failed tiles crossed in red, the tiles of this run outlined.
    `counted` names what the counts are ("estimated images" for the area's plan)."""
    figure = Figure(figsize=(6, 4.2), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    nonempty = {key: count for key, count in image_counts.items() if count}
    norm = LogNorm(vmin=1, vmax=max(max(nonempty.values(), default=1), 2))
    rectangles, faces = [], []
    for key, count in image_counts.items():
        west, south, east, north = mercantile.bounds(parse_tile_key(key))
        rectangles.append(Rectangle((west, south), east - west, north - south))
        faces.append(_MISSING_COLOUR if count is None else _EMPTY_COLOUR if count == 0 else None)
    cmap = colormaps["viridis"]
    faces = [face or cmap(norm(image_counts[key])) for face, key in zip(faces, image_counts)]
    axes.add_collection(
        PatchCollection(rectangles, facecolors=faces, edgecolors="#555555", linewidths=0.4)
    )
    run_keys = set(run_keys)
    run = [rectangles[i] for i, key in enumerate(image_counts) if key in run_keys]
    if run and len(run) < len(rectangles):
        axes.add_collection(
            PatchCollection(
                [Rectangle(r.get_xy(), r.get_width(), r.get_height()) for r in run],
                facecolors="none",
                edgecolors="black",
                linewidths=1.4,
            )
        )
    for key in failed:
        west, south, east, north = mercantile.bounds(parse_tile_key(key))
        axes.plot(
            [west, east, west, east],
            [south, north, north, south],
            color=_FAILED_COLOUR,
            linewidth=1.5,
        )
    _outline(axes, aoi_geometry)
    axes.autoscale_view()
    _geographic_aspect(axes, aoi_geometry)
    if nonempty:
        figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8).set_label(
            f"{counted} per tile", fontsize=8
        )
    legend = [Patch(facecolor=_EMPTY_COLOUR, edgecolor="#555555", label=f"no {counted}")]
    if any(count is None for count in image_counts.values()):
        legend.append(Patch(facecolor=_MISSING_COLOUR, edgecolor="#555555", label="not discovered"))
    if failed:
        legend.append(
            Patch(facecolor="none", edgecolor=_FAILED_COLOUR, label=f"failed ({len(failed)})")
        )
    axes.legend(handles=legend, loc="lower left", fontsize=7, framealpha=0.8)
    total = sum(nonempty.values())
    axes.set_title(
        f"{total:,} {counted} in {len(image_counts):,} partition tiles ({len(nonempty):,} non-empty)",
        fontsize=9,
    )
    return _png(figure)


def published_map_png(aoi_geometry, overview: PublishedOverview) -> bytes:
    """Two panels over the same extent: every published image (density) with the sequences drawn (a
    sample when there are many), and the images the spacing filter keeps."""
    grid_counts, grid_kept, extent = overview.counts, overview.kept, overview.extent
    sequence_lines, sequences_total = overview.sequence_lines, overview.sequences_total
    figure = Figure(figsize=(8, 3.6), dpi=_DPI, layout="constrained")
    panels = figure.subplots(1, 2, sharex=True, sharey=True)
    west, south, east, north = extent
    for axes, counts, title in (
        (
            panels[0],
            grid_counts,
            f"all {int(grid_counts.sum()):,} images, {sequences_total:,} sequences",
        ),
        (panels[1], grid_kept, f"{int(grid_kept.sum()):,} kept by the spacing filter"),
    ):
        shown = np.ma.masked_equal(counts.T, 0)
        if shown.count():
            axes.imshow(
                shown,
                origin="lower",
                extent=(west, east, south, north),
                cmap="viridis",
                norm=LogNorm(vmin=0.7, vmax=max(int(counts.max()), 2)),
                interpolation="nearest",
            )
        _outline(axes, aoi_geometry)
        axes.set_title(title, fontsize=9)
        _geographic_aspect(axes, aoi_geometry)
    if sequence_lines:
        panels[0].add_collection(
            LineCollection(sequence_lines, colors="#ff7f0e", linewidths=0.6, alpha=0.5)
        )
        if len(sequence_lines) < sequences_total:
            panels[0].text(
                0.01,
                0.01,
                f"{len(sequence_lines):,} sequences drawn",
                transform=panels[0].transAxes,
                fontsize=7,
            )
    margin_x, margin_y = (east - west) * 0.02 or 0.001, (north - south) * 0.02 or 0.001
    panels[0].set_xlim(west - margin_x, east + margin_x)
    panels[0].set_ylim(south - margin_y, north + margin_y)
    return _png(figure)
