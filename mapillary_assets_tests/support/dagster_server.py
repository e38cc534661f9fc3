"""A real Dagster deployment for tests: `dagster dev` (webserver + daemon + code server) or the webserver
alone, on 127.0.0.1 with a free port, in a throwaway DAGSTER_HOME holding the repository's
dagster.yaml (`runners.instance.prepare_dagster_home`), serving the `mapillary_assets.definitions` code location.

    with dagster_server(tmp_path / "home", env={...emulator URLs, data dir...}) as server:
        server.graphql("{ version }")
        with server.open_instance() as instance: ...

Every process it starts (the server, its code server, the daemon and every run worker they spawn) lives in
one process group, which is stopped (`process_tree.stop_group`: SIGTERM to the leader, then SIGTERM and SIGKILL
to the group) when the context exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import requests

from mapillary_assets.net import LOOPBACK, free_port
from mapillary_assets.process_tree import stop_group
from mapillary_assets.runners.instance import open_instance, prepare_dagster_home
from mapillary_assets_tests.support.world import REPO_ROOT

CODE_MODULE = "mapillary_assets.definitions"
HOST = LOOPBACK
STARTUP_TIMEOUT_S = 300.0  # generous: the machine is shared, and the code location imports a lot
SHUTDOWN_GRACE_S = 30.0
TERMINAL_BACKFILL_STATUSES = {
    "COMPLETED",
    "COMPLETED_SUCCESS",
    "COMPLETED_FAILED",
    "FAILED",
    "CANCELED",
}
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


class DagsterServerError(RuntimeError):
    """The server did not start, a GraphQL call failed, or something it ran did not finish in time."""


@dataclass
class DagsterServer:
    url: str
    home: Path
    log_path: Path
    process: subprocess.Popen
    location_name: str = ""
    repository_name: str = ""
    _http: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self._http.trust_env = False  # 127.0.0.1 only: never through a proxy from the environment

    # -- GraphQL --------------------------------------------------------------------------------------

    def graphql(self, query: str, variables: Mapping | None = None, timeout: float = 120.0) -> dict:
        """The `data` of a GraphQL answer; DagsterServerError on transport or GraphQL errors."""
        try:
            response = self._http.post(
                f"{self.url}/graphql",
                json={"query": query, "variables": variables or {}},
                timeout=timeout,
            )
        except requests.RequestException as error:
            raise DagsterServerError(
                f"GraphQL request failed: {error}\n{self.log_tail()}"
            ) from None
        if response.status_code != 200:
            raise DagsterServerError(
                f"GraphQL answered HTTP {response.status_code}: {response.text[:2000]}"
            )
        answer = response.json()
        if answer.get("errors"):
            raise DagsterServerError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    @property
    def repository_selector(self) -> dict:
        return {
            "repositoryLocationName": self.location_name,
            "repositoryName": self.repository_name,
        }

    def job_selector(self, job_name: str) -> dict:
        return {**self.repository_selector, "jobName": job_name}

    # -- the instance the server uses ---------------------------------------------------------------------

    def open_instance(self) -> dg.DagsterInstance:
        """The server's Dagster instance, opened in this process (SQLite storage shared with the server)."""
        return open_instance(self.home)

    # -- waiting ------------------------------------------------------------------------------------------

    def wait_until(self, condition, timeout: float, what: str, interval: float = 0.5):
        """Poll `condition()` until it returns something truthy (returned); fail with the server's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                raise DagsterServerError(
                    f"the Dagster server exited ({self.process.returncode}) while waiting "
                    f"for {what}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DagsterServerError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(interval)

    def log_tail(self, characters: int = 6000) -> str:
        try:
            return (
                "--- dagster log (tail) ---\n"
                + self.log_path.read_text(errors="replace")[-characters:]
            )
        except OSError:
            return "(no dagster log)"

    # -- lifecycle ----------------------------------------------------------------------------------------

    def _wait_until_serving(self, timeout: float) -> None:
        def answers() -> bool:
            try:
                return self._http.get(f"{self.url}/server_info", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        self.wait_until(answers, timeout, "the webserver to answer /server_info")

    def _wait_for_code_location(self, timeout: float) -> None:
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename
              ... on RepositoryLocation { repositories { name } }
              ... on PythonError { message } } } } } }"""

        def loaded():
            workspace = self.graphql(query)["workspaceOrError"]
            entries = workspace.get("locationEntries") or []
            for entry in entries:
                location = entry["locationOrLoadError"] or {}
                if location.get("__typename") == "PythonError":
                    raise DagsterServerError(
                        f"code location {entry['name']} failed to load: "
                        f"{location['message']}\n{self.log_tail()}"
                    )
                if (
                    entry["loadStatus"] == "LOADED"
                    and location.get("__typename") == "RepositoryLocation"
                ):
                    return entry["name"], location["repositories"][0]["name"]
            return None

        self.location_name, self.repository_name = self.wait_until(
            loaded, timeout, "the code location to load"
        )

    def stop(self) -> bool:
        """Stop everything it started; True when SIGTERM to the leader alone was enough (it shut down its
        children itself). Signalling the whole group first would race with `dagster dev`, which restarts a
        code server that exits under it. Whatever is left gets SIGTERM, then SIGKILL. Idempotent."""
        graceful = stop_group(
            self.process.pid,  # start_new_session: the leader's pid is the group id
            leader_signal=signal.SIGTERM,
            leader_grace_s=SHUTDOWN_GRACE_S,
            group_grace_s=SHUTDOWN_GRACE_S / 3,
            reap=self.process.poll,  # our own child stays a zombie member of the group until reaped
        )
        self._http.close()
        return graceful


def _command(port: int, daemon: bool) -> list[str]:
    if daemon:
        return [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-m",
            CODE_MODULE,
            "-h",
            HOST,
            "-p",
            str(port),
            "--log-level",
            "warning",
        ]
    return [
        sys.executable,
        "-m",
        "dagster_webserver",
        "-m",
        CODE_MODULE,
        "-h",
        HOST,
        "-p",
        str(port),
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def dagster_server(
    home: Path,
    env: Mapping[str, str] | None = None,
    *,
    daemon: bool = True,
    config_overrides: Mapping | None = None,
    command: Callable[[int], list[str]] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[DagsterServer]:
    """`dagster dev` (daemon=True) or `dagster-webserver` alone, serving the code location with `env` added
    to this process's environment; ready (webserver answering, code location loaded) when yielded.
    `command(port)` replaces the command line (e.g. `mapillary-assets ui`, which starts `dagster dev`)."""
    home = prepare_dagster_home(home, config_overrides)
    child_env = {
        **os.environ,
        **(env or {}),
        "DAGSTER_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    log_path = home / ("dagster-dev.log" if daemon else "dagster-webserver.log")
    command = command or (lambda port: _command(port, daemon))
    for attempt in range(3):  # another process on this shared machine may take the free port first
        port = free_port()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command(port),
                cwd=REPO_ROOT,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = DagsterServer(f"http://{HOST}:{port}", home, log_path, process)
        try:
            server._wait_until_serving(startup_timeout)
            server._wait_for_code_location(startup_timeout)
        except DagsterServerError:
            server.stop()
            if attempt < 2 and "address already in use" in server.log_tail().lower():
                continue
            raise
        except BaseException:
            server.stop()
            raise
        break
    try:
        yield server
    finally:
        server.stop()
