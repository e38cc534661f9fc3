"""A SeaweedFS S3 server for the tests, started once per session (pytest fixture `s3_server`)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import pytest

from mapillary_assets.net import free_port
from mapillary_assets.scaleout import object_store
from mapillary_assets.storage import S3Settings

BUCKET = "mapillary-test"
# Test credentials of the server's only identity; the tests assert they never reach a log or output.
ACCESS_KEY_ID = "MAPILLARYTESTKEY4821"
SECRET_ACCESS_KEY = "s3cr3t-Test-Value-9d81c7f0e5b4a3"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)

    @property
    def settings(self) -> S3Settings:
        return S3Settings(
            endpoint=self.endpoint,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            allow_http=True,
        )

    def environment(self) -> dict[str, str]:
        """The standard AWS variables every client (obstore, DuckDB, boto3) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_ALLOW_HTTP": "true",
        }


def weed_unavailable() -> str | None:
    """None when `weed` runs here, else why not (the only reason to skip)."""
    try:
        binary = object_store.weed_binary()
        subprocess.run([binary, "version"], capture_output=True, timeout=30, check=True)
    except (object_store.ObjectStoreError, OSError, subprocess.SubprocessError) as exc:
        return f"SeaweedFS's weed binary can not run here: {exc}"
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    reason = weed_unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("seaweedfs")
    endpoint = object_store.start(
        folder, free_port(), folder / "weed.log", ACCESS_KEY_ID, SECRET_ACCESS_KEY
    )
    try:
        object_store.create_bucket(folder, BUCKET)
        yield S3Server(endpoint, BUCKET, ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    finally:
        object_store.stop(folder)
