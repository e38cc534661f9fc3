"""The `mapillary-assets` command as a user runs it: a subprocess with its own Dagster home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mapillary_assets.runners.instance import prepare_dagster_home
from mapillary_assets_tests.support.world import REPO_ROOT

CLI_TIMEOUT_S = 600  # a shared machine; each run imports Dagster and starts the emulator


def run_cli(tmp_path: Path, *args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "home")),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **environ,
    }
    return subprocess.run(
        [sys.executable, "-m", "mapillary_assets.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def assert_clear_error(done: subprocess.CompletedProcess, expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], output
