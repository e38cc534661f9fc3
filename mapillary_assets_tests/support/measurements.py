"""Reliability figures: each test prints its measurements, and appends them to the JSON-lines file
MAPILLARY_RELIABILITY_FIGURES names, from which RELIABILITY.md is filled."""

from __future__ import annotations

import json
import os

FIGURES_ENV = "MAPILLARY_RELIABILITY_FIGURES"


def record_figure(scenario: str, **values) -> None:
    """Print a measurement and, when MAPILLARY_RELIABILITY_FIGURES names a file, append it there."""
    line = json.dumps({"scenario": scenario, **values}, default=str, sort_keys=True)
    print(f"reliability figure: {line}")
    target = os.environ.get(FIGURES_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
