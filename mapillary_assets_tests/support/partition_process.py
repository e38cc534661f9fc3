"""A pipeline job in a process of its own (the `run_partition` script), which a test may SIGKILL at
any point or run beside others that compete for the shared rate-limit store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mapillary_assets.emulator import EmulatorServer
from mapillary_assets_tests.support.world import REPO_ROOT

SCRIPT_MODULE = "mapillary_assets_tests.support.run_partition"


@dataclass
class PartitionProcess:
    """One `run_partition` subprocess; its output goes to `log_path`."""

    args: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0

    @classmethod
    def start(
        cls,
        *,
        home: Path,
        data_dir: Path,
        server: EmulatorServer,
        token: str,
        partitions: Sequence[str],
        log_path: Path,
        job: str = "process_chunks_job",
        entity_per_minute: int | None = None,
        settings: dict | None = None,
    ) -> PartitionProcess:
        args = [
            sys.executable,
            "-m",
            SCRIPT_MODULE,
            "--home",
            str(home),
            "--data-dir",
            str(data_dir),
            "--graph-url",
            server.graph_url,
            "--tiles-url",
            server.tiles_url,
            "--job",
            job,
        ]
        for key in partitions:
            args += ["--partition", key]
        if entity_per_minute is not None:
            args += ["--entity-per-minute", str(entity_per_minute)]
        for name, value in (settings or {}).items():
            args += ["--setting", f"{name}={json.dumps(value)}"]
        env = {**os.environ, "MAPILLARY_ACCESS_TOKEN": token, "PYTHONPATH": str(REPO_ROOT)}
        runner = cls(args, Path(log_path), env)
        runner.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(runner.log_path, "wb") as log:
            runner.process = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        runner.started = time.monotonic()
        return runner

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no finally block runs (a power cut, the OOM killer)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def wait(self, timeout: float = 300.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"partition run did not finish in {timeout:.0f} s; log:\n{self.log_tail()}"
            ) from None

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"


def wait_until(
    condition, timeout: float, interval: float = 0.01, message: str = "condition"
) -> float:
    """Poll `condition()` until true; returns the seconds waited, AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)
    return time.monotonic() - started
