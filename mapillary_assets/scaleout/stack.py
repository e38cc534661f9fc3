"""The scaled-out stack on one machine's loopback: PostgreSQL, Redis, SeaweedFS (the S3-compatible object
store), N Celery workers, the daemon, the UI.

`scripts/stack.sh start|stop|status` drives this module (it installs the Debian packages first). Every
process is bound to 127.0.0.1, keeps its files under one folder (`.stack/` by default: the services' own
folders, logs, pid files, the DAGSTER_HOME with deploy/dagster.yaml) and is started in its own session, so
`stop` ends exactly the processes `start` began. `start` is idempotent: what already runs is left alone.

The data dir is `s3://mapillary/data` on the stack's SeaweedFS and the compute logs go to the same bucket,
so the workers share no disk: each runs in a private folder (`workers/wN/`: its cwd, DAGSTER_HOME, scratch,
TMPDIR and compute-log staging) that no other process uses, as on separate machines. `--data-dir local`
keeps the former shared local data dir (`data/`). PostgreSQL and Redis themselves, and stopping a
service's processes: `services.py`; SeaweedFS: `object_store.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mapillary_assets.cli import DEMO_TOKEN
from mapillary_assets.defs.pools import GPU_POOL
from mapillary_assets.process_tree import process_alive
from mapillary_assets.scaleout import object_store
from mapillary_assets.scaleout.services import (
    PG_DB,
    PG_USER,
    REPO_ROOT,
    StackError,
    postgres_running,
    read_pid,
    restart_postgres,
    restart_redis,
    run_checked,
    start_postgres,
    start_redis,
    stop_postgres,
    stop_process,
    stop_redis,
    tool,
    wait_for_port,
)
from mapillary_assets.scaleout.workers import worker_command, worker_env


@dataclasses.dataclass(frozen=True)
class StackConfig:
    root: Path = REPO_ROOT / ".stack"
    workers: int = 2
    pg_port: int = 15432
    redis_port: int = 16379
    webserver_port: int = 3100
    emulator_port: int = 18765
    emulator_scale: float = 0.005
    api_slots: int = 4
    # Workers 1..gpu_workers also serve the `gpu` queue (blur runs); the `gpu` pool gets as many slots.
    gpu_workers: int = 1
    s3_port: int = 18333
    bucket: str = "mapillary"
    # None: s3://<bucket>/data on the stack's object store; a local folder: the data dir all workers share.
    data_dir: Path | None = None
    webserver: bool = True
    # False: the schedule and the new-images sensor are stopped, so only explicitly submitted runs run.
    automation: bool = True

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"

    @property
    def object_store(self) -> Path:
        return self.root / "seaweedfs"

    def worker_dir(self, index: int) -> Path:
        return self.root / "workers" / f"w{index}"


def stack_env(config: StackConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """What every process of the stack (and a driver submitting runs to it) needs in its environment."""
    env = dict(os.environ if base is None else base)
    access_key_id, secret_access_key = object_store.stack_identity(config.object_store)
    env.update(
        {
            "DAGSTER_HOME": str(config.dagster_home),
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(config.pg_port),
            "DAGSTER_PG_USER": PG_USER,
            "DAGSTER_PG_PASSWORD": env.get("DAGSTER_PG_PASSWORD", ""),
            "DAGSTER_PG_DB": PG_DB,
            "MAPILLARY_CELERY_BROKER": f"redis://127.0.0.1:{config.redis_port}/0",
            "MAPILLARY_RATE_LIMIT_BACKEND": "redis",
            # A chunk run is a chain (metadata -> thumbnails -> blur): its steps run one after another in the
            # worker's pool process (see definitions._executor_from_env).
            "MAPILLARY_RUN_EXECUTOR": "in_process",
            "MAPILLARY_REDIS_URL": f"redis://127.0.0.1:{config.redis_port}/1",
            "MAPILLARY_DATA_DIR": str(Path(config.data_dir).resolve())
            if config.data_dir
            else f"s3://{config.bucket}/data",
            # The object store: the data dir (unless local) and the compute logs (deploy/dagster.yaml).
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{config.s3_port}",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key,
            # boto3 (the compute logs' uploads) waits out a restarting store too: up to 10 tries, backoff
            # to 20 s (obstore's and DuckDB's own retries: storage/object_store.py).
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "10",
            "MAPILLARY_COMPUTE_LOG_BUCKET": config.bucket,
            # where a process stages compute logs before uploading them; each worker has its own
            "MAPILLARY_COMPUTE_LOG_DIR": str(config.root / "compute-logs"),
            # Where drivers submit runs (runners.cluster.ClusterRunner, through GraphQL).
            "MAPILLARY_DAGSTER_URL": f"http://127.0.0.1:{config.webserver_port}",
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


# ----------------------------------------------------------------------------- the stack


def start(config: StackConfig, log=print) -> dict[str, str]:
    """Start whatever is not running yet; returns the stack's environment (also written to env.sh)."""
    for folder in (config.root, config.logs, config.pids, config.dagster_home):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "deploy" / "dagster.yaml", config.dagster_home / "dagster.yaml")
    start_postgres(config.root / "postgres", config.pg_port, config.logs / "postgres.log")
    start_redis(config.root / "redis", config.redis_port, config.logs / "redis.log")
    if not object_store.running(config.object_store):
        object_store.start(
            config.object_store,
            config.s3_port,
            config.logs / "seaweedfs.log",
            *object_store.stack_identity(config.object_store),
        )
    object_store.create_bucket(config.object_store, config.bucket)
    log(
        f"postgres 127.0.0.1:{config.pg_port}, redis 127.0.0.1:{config.redis_port}, "
        f"object store http://127.0.0.1:{config.s3_port} (bucket {config.bucket})"
    )
    env = stack_env(config)
    if not env.get("MAPILLARY_ACCESS_TOKEN"):
        env.update(
            {
                "MAPILLARY_ACCESS_TOKEN": DEMO_TOKEN,
                "MAPILLARY_GRAPH_URL": f"http://127.0.0.1:{config.emulator_port}/graph",
                "MAPILLARY_TILES_URL": f"http://127.0.0.1:{config.emulator_port}/tiles",
            }
        )
        _spawn(
            config,
            "emulator",
            [
                sys.executable,
                "-m",
                "mapillary_assets.emulator",
                "--port",
                str(config.emulator_port),
                "--scale",
                str(config.emulator_scale),
            ],
            env,
        )
        wait_for_port(config.emulator_port, f"the emulator (log: {config.logs / 'emulator.log'})")
    _write_env_file(config, env)
    configure_pools(env, config)
    code = ["-m", "mapillary_assets.definitions", "-d", str(REPO_ROOT)]
    if not config.automation:
        for kind, name in (("sensor", "new_images_sensor"), ("schedule", "refresh_schedule")):
            run_checked([tool("dagster"), kind, "stop", name, *code], f"stopping {name}", env=env)
    _spawn(config, "daemon", [tool("dagster-daemon"), "run", *code], env)
    for index in range(1, config.workers + 1):
        _spawn(
            config,
            f"w{index}",
            worker_command(index, config.gpu_workers),
            worker_env(config.worker_dir(index), config.dagster_home / "dagster.yaml", env),
            cwd=config.worker_dir(index),
        )
    if config.webserver:
        _spawn(
            config,
            "webserver",
            [
                tool("dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(config.webserver_port),
                *code,
            ],
            env,
        )
        _wait_for_code_location(config.webserver_port, config.logs / "webserver.log")
        log(f"UI: http://127.0.0.1:{config.webserver_port}")
    log(f"{config.workers} worker(s); environment for drivers: source {config.env_file}")
    return env


def configure_pools(env: dict[str, str], config: StackConfig) -> None:
    """Pool limits live in the instance (Postgres): one value for the whole cluster."""
    limits = {"mapillary_api": config.api_slots, GPU_POOL: config.gpu_workers}
    for pool, limit in limits.items():
        run_checked(
            [tool("dagster"), "instance", "concurrency", "set", pool, str(limit)],
            f"pool {pool}",
            env=env,
        )


def stop(config: StackConfig, log=print) -> None:
    names = sorted(p.stem for p in config.pids.glob("*.pid")) if config.pids.exists() else []
    for name in names:  # workers and daemon first: they talk to the services below
        stop_process(read_pid(config.pids / f"{name}.pid"))
        (config.pids / f"{name}.pid").unlink(missing_ok=True)
    stop_redis(config.root / "redis")
    stop_postgres(config.root / "postgres")
    object_store.stop(config.object_store)
    log(f"stopped: {', '.join(names + ['redis', 'postgres', 'object_store'])}")


def restart_service(
    config: StackConfig, service: str, down_s: float, keep_data: bool = True
) -> None:
    """Stop `service` ("redis", "postgres" or "object_store") for `down_s` seconds, then start it on its
    port and folder again; `keep_data` (Redis only) False brings Redis back empty."""
    if service == "redis":
        restart_redis(
            config.root / "redis", config.redis_port, config.logs / "redis.log", down_s, keep_data
        )
    elif service == "postgres":
        restart_postgres(
            config.root / "postgres", config.pg_port, config.logs / "postgres.log", down_s
        )
    elif service == "object_store":
        object_store.restart(
            config.object_store,
            config.logs / "seaweedfs.log",
            *object_store.stack_identity(config.object_store),
            down_s,
        )
    else:
        raise ValueError(f"no service {service!r} in the stack: redis, postgres or object_store")


def status(config: StackConfig) -> dict[str, bool]:
    states = (
        {name.stem: process_alive(read_pid(name)) for name in sorted(config.pids.glob("*.pid"))}
        if config.pids.exists()
        else {}
    )
    states["redis"] = process_alive(read_pid(config.root / "redis" / "redis.pid"))
    states["postgres"] = postgres_running(config.root / "postgres")
    states["object_store"] = object_store.running(config.object_store)
    return states


# ----------------------------------------------------------------------------- processes


def _spawn(
    config: StackConfig, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO_ROOT
) -> int:
    pidfile = config.pids / f"{name}.pid"
    pid = read_pid(pidfile)
    if process_alive(pid):
        return pid
    with open(config.logs / f"{name}.log", "ab") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pidfile.write_text(str(process.pid))
    return process.pid


def _wait_for_code_location(port: int, log: Path, timeout_s: float = 180.0) -> None:
    """Until the webserver answers GraphQL with the code location loaded (runs are submitted there)."""
    import requests

    query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = requests.post(
                f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=5
            ).json()
            if answer["data"]["repositoriesOrError"].get("nodes"):
                return
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass
        time.sleep(1.0)
    raise StackError(
        f"the webserver did not load the code location within {timeout_s:.0f} s (log: {log})"
    )


def _write_env_file(config: StackConfig, env: dict[str, str]) -> None:
    names = [
        n
        for n in sorted(env)
        if n.startswith(("DAGSTER_", "MAPILLARY_", "AWS_")) or n == "PYTHONPATH"
    ]
    # A real token is never written to disk; the emulator's demo token is no secret. The object store's
    # keys are the stack's own: the file is readable by its owner only.
    names = [n for n in names if n != "MAPILLARY_ACCESS_TOKEN" or env[n] == DEMO_TOKEN]
    descriptor = os.open(config.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("".join(f"export {n}={shlex.quote(env[n])}\n" for n in names))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="scripts/stack.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument(
        "--workers", type=int, default=int(os.environ.get("MAPILLARY_STACK_WORKERS", "2"))
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("MAPILLARY_STACK_DIR", REPO_ROOT / ".stack")),
    )
    parser.add_argument(
        "--gpu-workers",
        type=int,
        default=int(os.environ.get("MAPILLARY_STACK_GPU_WORKERS", "1")),
        help="workers 1..N also take blur runs (the `gpu` queue); default 1",
    )
    parser.add_argument(
        "--scale", type=float, default=0.005, help="emulator world (when no token is set)"
    )
    parser.add_argument(
        "--data-dir",
        choices=("object-store", "local"),
        default=os.environ.get("MAPILLARY_STACK_DATA_DIR", "object-store"),
        help="s3://mapillary/data on the stack's SeaweedFS (default), or a local folder all workers share",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not 1 <= args.gpu_workers <= args.workers:
        parser.error(
            f"--gpu-workers must be between 1 and --workers ({args.workers}): blur runs need a worker"
        )
    config = StackConfig(
        root=args.root.resolve(),
        workers=args.workers,
        gpu_workers=args.gpu_workers,
        emulator_scale=args.scale,
        data_dir=args.root.resolve() / "data" if args.data_dir == "local" else None,
    )
    try:
        if args.action == "start":
            start(config)
        elif args.action == "stop":
            stop(config)
        else:
            states = status(config)
            print(json.dumps(states, indent=1))
            return 0 if states and all(states.values()) else 3
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
