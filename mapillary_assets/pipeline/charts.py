"""Small charts for the Dagster UI, drawn with OpenCV so no plotting stack is needed."""

from __future__ import annotations

import base64

import cv2
import numpy as np


def histogram_markdown(values, threshold: float | None = None, bins: int = 40, title: str = "blur_value") -> str:
    """A Markdown image (PNG data URI) of the log10 histogram of `values`, with the threshold marked."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data) & (data > 0)]
    if data.size == 0:
        return "(no values)"
    logs = np.log10(data)
    low, high = float(logs.min()), float(max(logs.max(), logs.min() + 1e-6))
    counts, edges = np.histogram(logs, bins=bins, range=(low, high))
    width, height, margin = 480, 200, 24
    canvas = np.full((height, width, 3), 255, np.uint8)
    bar_width = (width - 2 * margin) / bins
    peak = max(int(counts.max()), 1)
    for index, count in enumerate(counts):
        x0 = int(margin + index * bar_width)
        top = int(height - margin - (height - 2 * margin) * count / peak)
        cv2.rectangle(canvas, (x0, top), (int(x0 + bar_width) - 1, height - margin), (180, 120, 40), -1)
    if threshold and threshold > 0:
        x = int(margin + (np.log10(threshold) - low) / (high - low) * (width - 2 * margin))
        if margin <= x <= width - margin:
            cv2.line(canvas, (x, margin), (x, height - margin), (0, 0, 220), 2)
    label = f"{title}: log10 from {low:.1f} to {high:.1f}, n={data.size}"
    cv2.putText(canvas, label, (margin, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", canvas)
    return f"![{title} histogram](data:image/png;base64,{base64.b64encode(png.tobytes()).decode()})"
