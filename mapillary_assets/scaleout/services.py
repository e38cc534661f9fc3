"""The services under the scaled-out stack, each on 127.0.0.1 with its files in a folder of its own:
a PostgreSQL cluster (the instance's storage) and redis-server (Celery's broker and the shared token
buckets), how their processes are found and stopped, and restarting one mid-run (the fault tests)."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mapillary_assets.process_tree import process_alive, stop_group

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_USER, PG_DB = "dagster", "dagster"


class StackError(RuntimeError):
    """A service could not be started; the message says which, why, and where its log is."""


def postgres_bin(name: str) -> str:
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for folder in versions:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"PostgreSQL's {name} not found: apt-get install postgresql (scripts/stack.sh does)"
        )
    return found


def _as_postgres_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: run its server tools as the `postgres` system user then.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def start_postgres(folder: Path, port: int, log: Path) -> None:
    """An own cluster in `folder`, on 127.0.0.1:`port` only, trusting loopback connections, with a
    `dagster` role and database."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        for path in (folder, log.parent):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
    if not (folder / "PG_VERSION").exists():
        run_checked(
            _as_postgres_user(
                [
                    postgres_bin("initdb"),
                    "-D",
                    str(folder),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ]
            ),
            "initdb",
        )
    if postgres_running(folder):
        return
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c max_connections=200"
    run_checked(
        _as_postgres_user(
            [
                postgres_bin("pg_ctl"),
                "-D",
                str(folder),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        f"PostgreSQL on port {port} (log: {log})",
    )
    created = subprocess.run(
        [postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0 and "already exists" not in created.stderr:
        raise StackError(f"createdb {PG_DB} failed: {created.stderr.strip()}")


def stop_postgres(folder: Path) -> None:
    if postgres_running(folder):
        subprocess.run(
            _as_postgres_user(
                [postgres_bin("pg_ctl"), "-D", str(folder), "-m", "fast", "-w", "stop"]
            ),
            capture_output=True,
        )


def postgres_running(folder: Path) -> bool:
    if not (folder / "PG_VERSION").exists():
        return False
    return (
        subprocess.run(
            _as_postgres_user([postgres_bin("pg_ctl"), "-D", str(folder), "status"]),
            capture_output=True,
        ).returncode
        == 0
    )


def start_redis(folder: Path, port: int, log: Path) -> None:
    """redis-server on 127.0.0.1:`port` with appendonly persistence in `folder` (fsync once a second): a
    restarted Redis keeps Celery's queue, the token buckets and the daily quota counts. A Redis that
    loses its files anyway is survived by the limiter's fail-safe start (api/ratelimit_redis.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    pidfile = folder / "redis.pid"
    if process_alive(read_pid(pidfile)):
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "redis-server not found: apt-get install redis-server (scripts/stack.sh does)"
        )
    run_checked(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(folder),
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(log),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
        f"redis-server on port {port}",
    )
    wait_for_port(port, f"redis-server (log: {log})")


def stop_redis(folder: Path) -> None:
    stop_process(
        read_pid(folder / "redis.pid")
    )  # redis-server --daemonize leads a session of its own


def restart_redis(
    folder: Path, port: int, log: Path, down_s: float, keep_data: bool = True
) -> None:
    """Stop redis-server, leave it down `down_s` seconds, start it again on the same port and folder;
    keep_data=False deletes its files meanwhile, so it comes back empty."""
    stop_redis(folder)
    if not keep_data:
        shutil.rmtree(folder / "appendonlydir", ignore_errors=True)
        (folder / "dump.rdb").unlink(missing_ok=True)
    time.sleep(down_s)
    start_redis(folder, port, log)


def restart_postgres(folder: Path, port: int, log: Path, down_s: float) -> None:
    """Stop the PostgreSQL cluster (fast shutdown: open connections are cut), leave it down `down_s`
    seconds, start it again on the same port and folder."""
    stop_postgres(folder)
    time.sleep(down_s)
    start_postgres(folder, port, log)


def stop_process(pid: int | None, grace_s: float = 20.0) -> None:
    """Stop the process `pid` and the process group it leads (each service runs in a session of its
    own): SIGTERM to it, then SIGTERM and SIGKILL to what is left of the group after `grace_s`."""
    if pid:
        stop_group(pid, leader_signal=signal.SIGTERM, leader_grace_s=grace_s)


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_for_port(port: int, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def run_checked(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise StackError(
            f"{what} failed ({shlex.join(argv[:3])} ...): {(result.stderr or result.stdout).strip()[-800:]}"
        )


def tool(name: str) -> str:
    """A console script of this interpreter's environment (dagster, dagster-celery, ...)."""
    return str(Path(sys.executable).parent / name)
