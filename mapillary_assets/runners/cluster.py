"""Run the pipeline's jobs on a scaled-out instance: submit runs, follow them (and their retries) to the end.

`ClusterRunner.run_many(job_name, tag_sets)` is the runner protocol of `runners/pipeline.py`: each
tag set becomes one run, submitted through the webserver's GraphQL API to the instance's run
coordinator (deploy/dagster.yaml: queued, dequeued by dagster-daemon, launched as a Celery task on
whichever worker takes it). A run whose worker was
killed is failed by run monitoring and relaunched by run retries; the runner follows that chain and
reports the last run of it. While the instance's database cannot be reached (PostgreSQL restarting:
dagster-postgres gives up on a connection after a few seconds) the runner keeps waiting, up to
`storage_wait_s`, instead of failing the whole pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import dagster as dg

from mapillary_assets.dagster_compat import AUTO_RETRY_RUN_ID_TAG, WILL_RETRY_TAG

# The scaled-out stack's webserver (scripts/stack.sh; StackConfig.webserver_port).
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3100"
_FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class ClusterRunner:
    """Submits runs to `instance` (whose launcher sends them to workers) and waits for their outcome.

    A chunk is `fetch_job` then `blur_job`: the blur run carries the `gpu` queue tag (defs/jobs.py), so
    it runs on a worker with a GPU while the CPU workers fetch the next chunks."""

    chunk_jobs = ("fetch_job", "blur_job")

    def __init__(
        self,
        instance: dg.DagsterInstance,
        *,
        dagster_url: str = DEFAULT_DAGSTER_URL,
        poll_s: float = 1.0,
        timeout_s: float = 6 * 3600.0,
        retry_decision_s: float = 60.0,
        storage_wait_s: float = 300.0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.instance = instance
        self.dagster_url = dagster_url
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.retry_decision_s = retry_decision_s
        self._undecided: dict[str, float] = {}
        self.storage_wait_s = storage_wait_s
        self._storage_down_since: float | None = None
        self.log = log

    def run_many(
        self, job_name: str, tag_sets: list[dict[str, str]], then: Sequence[str] = ()
    ) -> list[tuple[str, bool]]:
        chain = [job_name, *then]
        with self._submitter() as submit:
            current = {index: (0, submit(job_name, tags)) for index, tags in enumerate(tag_sets)}
            results: dict[int, tuple[str, bool]] = {}
            deadline = time.monotonic() + self.timeout_s
            while current:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(current)} {' -> '.join(chain)} run(s) did not finish within "
                        f"{self.timeout_s:.0f} s"
                    )
                for index, (position, run_id) in list(current.items()):
                    outcome = self.poll(run_id)
                    if isinstance(outcome, str):  # a retry of the run: follow it
                        current[index] = (position, outcome)
                    elif outcome is not None and outcome[1] and position + 1 < len(chain):
                        current[index] = (
                            position + 1,
                            submit(chain[position + 1], tag_sets[index]),
                        )
                    elif outcome is not None:
                        results[index] = outcome
                        del current[index]
                if current:
                    time.sleep(self.poll_s)
        return [results[index] for index in range(len(tag_sets))]

    @contextmanager
    def _submitter(self) -> Iterator[Callable[[str, dict[str, str]], str]]:
        """A function submitting one run of a job with tags through the webserver's GraphQL API
        (the job's own run tags, e.g. its Celery queue, are merged in by the webserver)."""
        from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

        url = urlsplit(self.dagster_url)
        client = DagsterGraphQLClient(
            url.hostname or "127.0.0.1", port_number=url.port, use_https=url.scheme == "https"
        )

        def submit(job_name: str, tags: dict[str, str]) -> str:
            while True:
                try:
                    run_id = client.submit_job_execution(job_name, tags=tags)
                except DagsterGraphQLClientError as exc:
                    # The webserver answers a database error as a PythonError naming it: no run was created.
                    if "OperationalError" not in str(exc):
                        raise
                    self._wait_for_storage(exc)
                    time.sleep(max(self.poll_s, 0.5))
                    continue
                self._storage_answered()
                return run_id

        yield submit

    def poll(self, run_id: str) -> tuple[str, bool] | str | None:
        """None while the run (or a retry due for it) is not finished; the retry's id once it exists;
        else (run id, success)."""
        try:
            run = self.instance.get_run_by_id(run_id)
        except Exception as exc:
            if not _database_unreachable(exc):
                raise
            self._wait_for_storage(exc)
            return None
        self._storage_answered()
        if run is None or run.status not in _FINISHED:
            return None
        if run.status == dg.DagsterRunStatus.SUCCESS:
            return run_id, True
        retry = run.tags.get(AUTO_RETRY_RUN_ID_TAG)
        if retry:
            self.log(f"run {run_id} failed ({run.job_name}); following its retry {retry}")
            return retry
        decided = run.tags.get(WILL_RETRY_TAG)
        if decided is None:
            # A run that run monitoring failed (its worker died) carries no decision until the
            # retry daemon's next tick sets one: wait for it, for at most retry_decision_s.
            first_seen = self._undecided.setdefault(run_id, time.monotonic())
            if time.monotonic() - first_seen < self.retry_decision_s:
                return None
        self._undecided.pop(run_id, None)
        return None if decided == "true" else (run_id, False)

    def _storage_answered(self) -> None:
        if self._storage_down_since is not None:
            self.log(
                f"instance storage answers again after {time.monotonic() - self._storage_down_since:.0f} s"
            )
            self._storage_down_since = None

    def _wait_for_storage(self, error: Exception) -> None:
        now = time.monotonic()
        if self._storage_down_since is None:
            self._storage_down_since = now
            self.log(
                f"instance storage unreachable ({error}); waiting up to {self.storage_wait_s:.0f} s"
            )
        elif now - self._storage_down_since > self.storage_wait_s:
            raise error

    def wait(self, run_id: str) -> tuple[str, bool]:
        """(id of the last run of the retry chain, success) once no retry is due any more."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            outcome = self.poll(run_id)
            if isinstance(outcome, str):
                run_id = outcome
                continue
            if outcome is not None:
                return outcome
            time.sleep(self.poll_s)
        raise TimeoutError(f"run {run_id} did not finish within {self.timeout_s:.0f} s")


def _database_unreachable(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is the database refusing or dropping the connection."""
    import sqlalchemy.exc

    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        error = error.__cause__ or error.__context__
    return False
