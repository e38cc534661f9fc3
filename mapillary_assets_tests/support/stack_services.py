"""Whether the scaled-out stack's services can run here: PostgreSQL, redis-server and SeaweedFS."""

from __future__ import annotations

import os
import shutil

import pytest

from mapillary_assets_tests.support.object_store import weed_unavailable


def stack_services_missing() -> str | None:
    """Why the stack cannot start on this machine (what to install), None when it can."""
    from mapillary_assets.scaleout.services import StackError, postgres_bin

    if weed_unavailable():
        return weed_unavailable()
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (scripts/install_services.sh installs it)"
    try:
        postgres_bin("initdb")
    except StackError as exc:
        return str(exc)
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started"
    return None


needs_stack_services = pytest.mark.skipif(
    stack_services_missing() is not None, reason=str(stack_services_missing())
)
