"""Everything the README shows is run somewhere: by .ci/run, or by a test named here. A command added to
the README without a place that runs it fails this test, so the README cannot rot silently."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mapillary_assets import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Each command the README shows -> where it is exercised.
EXERCISED_BY = {
    "./scripts/demo.sh": ".ci/run",
    "./scripts/test.sh": ".ci/run",
    "./scripts/ui.sh": "test_ui.py (mapillary-assets ui: emulator + dagster dev on 127.0.0.1)",
    ".venv/bin/mapillary-assets sample": "test_sample_command_keeps_its_own_data_and_instance",
    ".venv/bin/python -m benchmarks.run": "test_benchmark_harness_runs_a_benchmark",
    "export MAPILLARY_": "test_definitions.py / resources_from_env (environment configuration)",
    "DAGSTER_HOME=$PWD .venv/bin/dagster dev": "test_ui.py (dagster dev -m mapillary_assets.definitions)",
    ".venv/bin/mapillary-assets run": "test_run_against_the_api_until_thumbnails",
    ".venv/bin/ruff": "test_the_test_script_lints_formats_and_loads_the_definitions",
    "VIRTUAL_ENV=$PWD/.venv .venv/bin/dg check defs": (
        "test_the_test_script_lints_formats_and_loads_the_definitions"
    ),
    "scripts/stack.sh": "test_scaleout.py (the stack module the script runs: start, the pipeline, stop; "
    "`status` through the script itself)",
}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_readme_command_is_exercised():
    unexercised = [
        c for c in readme_commands() if not any(c.startswith(prefix) for prefix in EXERCISED_BY)
    ]
    assert not unexercised, f"README commands with no test or CI step: {unexercised}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and "scripts/demo.sh" in ci


def _places(where: str) -> list[str]:
    """The files (`.ci/run`, `test_x.py`) and test functions (`test_y`) an EXERCISED_BY entry names."""
    return re.findall(r"\.ci/run|\btest_\w+(?:\.py)?", where)


def test_every_place_named_in_exercised_by_exists():
    tests = ROOT / "mapillary_assets_tests"
    defined = {
        name
        for path in tests.glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    for command, where in EXERCISED_BY.items():
        places = _places(where)
        assert places, f"{command!r}: {where!r} names no test, test file or CI script"
        for place in places:
            if place == ".ci/run":
                assert command.lstrip("./") in (ROOT / ".ci" / "run").read_text(), (command, place)
            elif place.endswith(".py"):
                assert (tests / place).exists(), (command, place)
            else:
                assert place in defined, f"{command!r}: no test function {place}"


def test_the_test_script_lints_formats_and_loads_the_definitions():
    script = (ROOT / "scripts" / "test.sh").read_text()
    for step in ("ruff check", "ruff format --check", "dg check defs"):
        assert f".venv/bin/{step}" in script, step
    assert script.index("dg check defs") < script.index("-m pytest"), "the checks come first"


def test_scripts_exist_and_are_executable():
    for script in ("demo.sh", "test.sh", "ui.sh", "setup.sh"):
        path = ROOT / "scripts" / script
        assert path.exists() and path.stat().st_mode & 0o111, path


@pytest.mark.slow
def test_sample_command_keeps_its_own_data_and_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "main_home"))
    assert (
        cli.main(
            ["sample", "--limit", "60", "--scale", "0.003", "--data-dir", str(tmp_path / "data")]
        )
        == 0
    )
    sample_root = tmp_path / "data" / "sample-60"
    assert (sample_root / "output" / "mapillary_images.gpkg").exists()
    assert (sample_root / "dagster_home" / "dagster.yaml").exists()
    assert not (tmp_path / "main_home").exists(), (
        "a sample run must not touch the main Dagster instance"
    )
    assert not (tmp_path / "data" / "output").exists(), (
        "a sample run must not touch the full run's data"
    )
    import pyogrio

    assert (
        pyogrio.read_info(sample_root / "output" / "mapillary_images.gpkg", layer="images")[
            "features"
        ]
        <= 60
    )


@pytest.mark.slow
def test_benchmark_harness_runs_a_benchmark(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--only",
            "blur",
            "--output",
            str(tmp_path / "R.md"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "R.md").read_text().startswith("# Benchmark results")
    figures = json.loads((tmp_path / "R.json").read_text())["figures"]
    per_core = [f for f in figures if f["metric"].startswith("images/s per core")]
    assert per_core and all(f["benchmark"] == "blur" for f in figures)
    assert per_core[0]["value"] > 0 and per_core[0]["baseline"] > 0, per_core
