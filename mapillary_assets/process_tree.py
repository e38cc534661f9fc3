"""Stopping a process tree started in its own session (`mapillary-assets ui` -> `dagster dev` -> webserver,
daemon, code server, run workers), whatever signal reached the parent and however it was started.

The tree leader (`dagster dev`) shuts its children down itself on SIGINT, so it gets that first; signalling
the whole group at once would race with `dagster dev` restarting a code server that exits under it.
Whatever is left after the grace period gets SIGTERM, then SIGKILL, by process group.

`python -m mapillary_assets.process_tree PGID` is the watchdog: it waits for EOF on its stdin (a pipe whose
write end only the parent holds) and then stops group PGID, so the tree goes too when the parent is
SIGKILLed and can run no handler. Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LEADER_GRACE_S = 60.0  # dagster dev waits up to 60 s for its webserver and daemon, then kills them
GROUP_GRACE_S = 10.0
POLL_S = 0.1


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`. Zombies are dead already: an orphan's zombie
    stays until its new parent reaps it, which this machine's init does not always do."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[2] == pgid and stat[0] not in "ZX":
                members.append(int(entry.name))
    return members


def process_alive(pid: int | None) -> bool:
    """Whether `pid` runs on this machine (a zombie, killed but not yet reaped, counts as gone; a process
    of another user counts as alive)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _stat(pid)
    return stat is None or stat[0] not in "ZX"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[
        text.rindex(")") + 2 :
    ].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2])


def wait_for_group_exit(pgid: int, timeout: float, reap=None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap()  # our own child stays a zombie member of the group until it is reaped
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(
    pgid: int,
    leader_signal: int = signal.SIGINT,
    leader_grace_s: float = LEADER_GRACE_S,
    group_grace_s: float = GROUP_GRACE_S,
    reap=None,
) -> bool:
    """Stop every process of group `pgid` (whose leader's pid is `pgid`); True when the leader's own
    shutdown was enough, False when the group needed SIGTERM or SIGKILL."""
    if not group_members(pgid):
        return True  # gone already: never signal a pid the system may have reused
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pgid, leader_signal)
    if wait_for_group_exit(pgid, leader_grace_s, reap):
        return True
    signal_group(pgid, signal.SIGTERM)
    if not wait_for_group_exit(pgid, group_grace_s, reap):
        signal_group(pgid, signal.SIGKILL)
        wait_for_group_exit(pgid, group_grace_s, reap)
    return False


def serve_until_stopped(command: list[str], env: dict[str, str], cwd: Path, name: str) -> int:
    """Run `command` (e.g. `dagster dev`) until it exits or this process is told to stop (SIGTERM,
    SIGHUP, Ctrl-C), then stop everything it started. It runs in its own session, so a signal
    reaches it only through here, and SIGINT is never inherited as ignored (a background job's `&`
    ignores it, and `dagster dev` maps SIGTERM to its SIGINT handler: ignored there, it could not be
    stopped at all). A watchdog process stops the tree when this process dies without running its
    handlers (SIGKILL, OOM)."""
    stop_requested: list[int] = []

    def request_stop(signum, _frame) -> None:
        stop_requested.append(signum)

    interrupt_was_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    handled = (
        (signal.SIGTERM, signal.SIGHUP)
        if interrupt_was_ignored
        else (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    )
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    if (
        interrupt_was_ignored
    ):  # a Python handler (not SIG_IGN) so the child starts with SIGINT's default
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    process = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True)
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "mapillary_assets.process_tree", str(process.pid)],
        stdin=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        while process.poll() is None and not stop_requested:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.5)
        if stop_requested:
            print(f"stopping {name} ({signal.Signals(stop_requested[0]).name})", file=sys.stderr)
        stop_group(process.pid, reap=process.poll)
        return 0 if stop_requested else process.returncode
    finally:
        watchdog.stdin.close()  # EOF: the watchdog finds the group gone and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watchdog_main(argv: list[str]) -> int:
    pgid = int(argv[0])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # outlive the parent's stop; EOF is the only trigger
    sys.stdin.buffer.read()
    stop_group(pgid)
    return 0


if __name__ == "__main__":
    sys.exit(watchdog_main(sys.argv[1:]))
