"""benchmarks/gpu_check.py (issue 21) on its CPU path: agreement, the JSON it writes, the merge into RESULTS.

The GPU runs need CUDA; without it the check must say so in its rows instead of failing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, run

REPO = Path(__file__).resolve().parents[1]


def test_the_check_imports_nothing_the_gpu_machines_lack():
    heavy = ("dagster", "aiohttp", "duckdb")
    code = (
        "import sys, benchmarks.gpu_check; "
        f"print([m for m in sys.modules if m.split('.')[0] in {heavy!r}])"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


def test_cpu_path_gives_agreement_cpu_figures_and_says_when_cuda_is_absent(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("kornia")
    output = tmp_path / "gpu_check.json"
    images = 4

    status = gpu_check.main(
        ["--images", str(images), "--repeats", "1", "--budget-s", "120", "--output", str(output)]
    )

    result = json.loads(output.read_text())
    assert status == 0, result["errors"]
    assert result["complete"] is True and result["errors"] == {}
    cuda = torch.cuda.is_available()
    assert result["cuda_available"] is cuda
    assert (result["gpu"] == "none") is not cuda
    assert result["date"].endswith("Z") and result["images"] == images
    assert set(result["versions"]) >= {"python", "opencv", "numpy", "torch", "kornia"}

    agreement = result["agreement"]
    assert agreement["images"] == images
    assert agreement["kornia_device"] == ("cuda" if cuda else "cpu")
    assert agreement["max_relative_difference"] <= gpu_check.AGREEMENT_RTOL
    assert agreement["within_tolerance"] is True

    figures = result["figures"]
    assert all(f["benchmark"] == gpu_check.BENCHMARK for f in figures)
    assert figures[0]["met"] is True  # the agreement row
    for box in ("1024x768", "256x192"):
        rows = [f for f in figures if f["metric"].startswith(f"images/s {box} ")]
        assert len(rows) == 5
        baseline, pipeline_opencv, *gpu_rows = rows
        assert baseline["value"] > 0 and pipeline_opencv["value"] > 0
        assert pipeline_opencv["baseline"] == baseline["value"]
        assert pipeline_opencv["extra"]["max_relative_difference_vs_baseline"] == 0
        for row in gpu_rows:
            if cuda:
                assert row["value"] > 0
            else:
                assert math.isnan(row["value"])
                assert "not measured: CUDA absent" in row["notes"]
                assert row["notes"].startswith("[no CUDA: CPU figures only]")


def test_merge_replaces_the_checks_rows_in_results_and_keeps_the_others(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copy(REPO / "benchmarks" / "RESULTS.json", results.with_suffix(".json"))
    before = json.loads(results.with_suffix(".json").read_text())["figures"]
    figure = {
        "benchmark": gpu_check.BENCHMARK,
        "metric": "images/s 256x192 JPEG files -> Parquet: nvJPEG decode (torchvision, batch 256)",
        "value": 12345.0,
        "unit": "images/s",
        "notes": "[NVIDIA H100 80GB HBM3] x86_64, 16 usable cores, 2026-12-06",
    }
    measured = tmp_path / "gpu_check.json"
    for _ in range(2):  # merging twice leaves one copy of the rows
        measured.write_text(json.dumps({"figures": [figure]}))
        assert run.main(["--merge", str(measured), "--output", str(results)]) == 0

    after = json.loads(results.with_suffix(".json").read_text())["figures"]
    assert [f for f in after if f["benchmark"] == gpu_check.BENCHMARK] == [
        {
            **figure,
            "baseline": None,
            "baseline_name": None,
            "goal": None,
            "met": None,
            "extra": {},
            "reference": False,
        }
    ]
    others = [f for f in before if f["benchmark"] != gpu_check.BENCHMARK]
    assert len(after) == len(others) + 1
    assert "| gpu_blur | images/s 256x192 JPEG files" in results.read_text()
