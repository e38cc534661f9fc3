"""Stopping `mapillary-assets ui` stops every process it started (`dagster dev`, its webserver, daemon and
code server), started the way a service manager starts it (own session, SIGTERM), the way a background
shell job starts it (`cmd &` in a script: SIGINT ignored, inherited by everything it starts), and when
the CLI itself is SIGKILLed (the watchdog stops the tree)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from mapillary_assets.net import free_port
from mapillary_assets.process_tree import group_members
from mapillary_assets.runners.instance import prepare_dagster_home
from mapillary_assets_tests.support.world import REPO_ROOT

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 300.0  # the machine is shared; the code location imports a lot
STOP_TIMEOUT_S = 120.0
# The processes `dagster dev` runs once it is serving, by a piece of their command lines.
SERVICES = {
    "dagster dev": "dagster dev",
    "webserver": "dagster_webserver",
    "daemon": "dagster._daemon",
    "code server": "grpc",
}


def _proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, pgrp, state, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], cmdline)
    return table


def descendants(root: int) -> dict[int, str]:
    """Live descendants of `root`: pid -> command line."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgrp, _state, _cmd) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if table[child][2] not in "ZX":
                found[child] = table[child][3]
                todo.append(child)
    return found


def alive(pids) -> list[int]:
    table = _proc_table()
    return [pid for pid in pids if pid in table and table[pid][2] not in "ZX"]


def _start(how: str, tmp_path: Path, port: int, emulator_port: int) -> tuple[subprocess.Popen, int]:
    """Start the UI; the Popen handle to wait on and the pid of the `mapillary-assets ui` process."""
    home = prepare_dagster_home(tmp_path / "home")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    ui = [
        sys.executable,
        "-m",
        "mapillary_assets.cli",
        "ui",
        "--port",
        str(port),
        "--emulator-port",
        str(emulator_port),
        "--data-dir",
        str(tmp_path / "data"),
        "--scale",
        "0.001",
    ]
    log = open(tmp_path / "ui.log", "ab")
    if how == "background shell":
        pid_file = tmp_path / "ui.pid"
        # A non-interactive shell starts `&` jobs with SIGINT (and SIGQUIT) ignored, as scripts/ui.sh & does.
        # (the grep job records what such a job inherits)
        script = f'grep SigIgn /proc/self/status > {tmp_path / "sigign"} & "$@" & echo $! > {pid_file}; wait'
        shell = subprocess.Popen(
            ["bash", "-c", script, "bash", *ui],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the background shell did not start the UI"
            time.sleep(0.1)
        return shell, int(pid_file.read_text())
    process = subprocess.Popen(
        ui,
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # as setsid / systemd do
    return process, process.pid


def _wait_until_serving(
    waited: subprocess.Popen, ui_pid: int, port: int, log: Path
) -> dict[int, str]:
    """Wait for the webserver to answer and every service to run; the tree under the CLI then."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert waited.poll() is None, (
            f"the UI exited ({waited.returncode})\n{log.read_text()[-4000:]}"
        )
        try:
            answering = (
                requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).status_code == 200
            )
        except requests.RequestException:
            answering = False
        tree = descendants(ui_pid)
        running = {
            name for name, marker in SERVICES.items() if any(marker in cmd for cmd in tree.values())
        }
        if answering and running == set(SERVICES):
            return tree
        time.sleep(1)
    pytest.fail(f"the UI did not start within {STARTUP_TIMEOUT_S:.0f} s\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize(
    "how,stop_signal",
    [
        ("service manager", signal.SIGTERM),
        ("background shell", signal.SIGTERM),
        ("service manager", signal.SIGKILL),
    ],
    ids=["setsid-SIGTERM", "background-shell-SIGTERM", "setsid-SIGKILL"],
)
def test_stopping_the_ui_stops_every_process_it_started(tmp_path, how, stop_signal):
    port, emulator_port = free_port(), free_port()
    waited, ui_pid = _start(how, tmp_path, port, emulator_port)
    log = tmp_path / "ui.log"
    tree: dict[int, str] = {}
    try:
        tree = _wait_until_serving(waited, ui_pid, port, log)
        groups = {os.getpgid(pid) for pid in tree} - {os.getpgid(ui_pid)}
        assert groups, "dagster dev should run in its own process group"
        if how == "background shell":
            ignored = int((tmp_path / "sigign").read_text().split()[1], 16)
            assert ignored & (1 << (signal.SIGINT - 1)), (
                "a background job should start with SIGINT ignored"
            )
        os.kill(ui_pid, stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while alive([ui_pid, *tree]) or any(group_members(group) for group in groups):
            assert time.monotonic() < deadline, (
                f"still running {STOP_TIMEOUT_S:.0f} s after {stop_signal.name}: "
                f"{ {pid: tree.get(pid, 'ui') for pid in alive([ui_pid, *tree])} }\n{log.read_text()[-4000:]}"
            )
            time.sleep(0.5)
        waited.wait(30)
        assert not alive(tree) and not any(group_members(group) for group in groups)
        if stop_signal == signal.SIGTERM:
            assert waited.returncode == 0, log.read_text()[-4000:]
            assert "Dagster services shut down" in log.read_text(), (
                "dagster dev should shut down its services itself"
            )
    finally:
        for pid in alive(
            [ui_pid, *tree, *descendants(ui_pid)]
        ):  # a failed assertion must leave nothing running
            os.kill(pid, signal.SIGKILL)
