"""The one way to prepare and open a Dagster instance: a DAGSTER_HOME holding the repository's
dagster.yaml (optionally with overrides), and the pool limits that dagster.yaml cannot express."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_TEMPLATE = REPO_ROOT / "dagster.yaml"
# Pools whose limit is not dagster.yaml's default of 1 (duckdb_writer, gpu and chunk_registry use it).
POOL_LIMITS = {"mapillary_api": 4}


def prepare_dagster_home(home: Path, overrides: Mapping | None = None) -> Path:
    """`home`, created if missing, with the repository's dagster.yaml and `overrides` merged into it
    (nested mappings merge). An existing dagster.yaml is kept when there are no overrides, so a
    user's own instance settings survive."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if overrides or not config.exists():
        merged = _merged(yaml.safe_load(INSTANCE_TEMPLATE.read_text()), overrides or {})
        config.write_text(yaml.safe_dump(merged, sort_keys=False))
    return home


def open_instance(home: Path) -> dg.DagsterInstance:
    """The persistent instance in `home` (prepared first), shareable by several processes the way
    `dagster dev`'s run workers share it."""
    home = prepare_dagster_home(home)
    return dg.DagsterInstance.from_config(str(home))


def configure_pools(instance: dg.DagsterInstance) -> None:
    from mapillary_assets.dagster_compat import set_pool_limit

    for pool, limit in POOL_LIMITS.items():
        set_pool_limit(instance, pool, limit)


def _merged(base: dict, changes: Mapping) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(merged.get(key) or {}, value) if isinstance(value, Mapping) else value
    return merged
