"""Resources, configured from the environment in `definitions.py` and swapped in tests."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from mapillary_assets.api import ClientConfig, MapillaryClient, Secret
from mapillary_assets.api.ratelimit import redis_url_from_env
from mapillary_assets.pipeline.geopackage import DEFAULT_GPKG_VERSION, GPKG_VERSIONS
from mapillary_assets.storage import DataLayout

TILESETS = ("mly1_public", "mly1_computed_public")
DISCOVERY_ROUTES = ("tiles", "bbox_search")
BLUR_BACKENDS = ("auto", "opencv", "kornia-cpu", "kornia-cuda")
THUMBNAIL_SIZES = (256, 1024, 2048)
_SEQUENCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConfigError(ValueError):
    """A setting has a value the pipeline cannot use; the message names the variable and the fix."""


class MapillaryApiResource(dg.ConfigurableResource):
    """The Mapillary API (or the emulator: only the URLs and token differ)."""

    access_token: str
    graph_url: str = "https://graph.mapillary.com"
    tiles_url: str = "https://tiles.mapillary.com"
    entity_per_minute: int = 50_000
    search_per_minute: int = 10_000
    tiles_per_minute: int = 6_000
    # The tile server's daily quota (MAPILLARY_TILES_PER_DAY) and its day (MAPILLARY_QUOTA_DAY_SECONDS).
    tiles_per_day: int = 50_000
    quota_day_seconds: float = 86_400.0
    max_connections: int = 64
    max_retries: int = 6
    timeout_s: float = 60.0  # per HTTP request; a request that runs past it is retried like a 5xx
    # SQLite file holding the token buckets, shared by every run process on this machine.
    rate_limit_store: str = ""
    # "redis": the buckets live at redis_url instead, shared by every worker on every machine.
    rate_limit_backend: str = "sqlite"
    redis_url: str = ""

    def client_settings(self) -> ClientConfig:
        return ClientConfig(
            token=Secret(self.access_token),
            graph_url=self.graph_url,
            tiles_url=self.tiles_url,
            entity_per_minute=self.entity_per_minute,
            search_per_minute=self.search_per_minute,
            tiles_per_minute=self.tiles_per_minute,
            tiles_per_day=self.tiles_per_day,
            quota_day_seconds=self.quota_day_seconds,
            max_connections=self.max_connections,
            max_retries=self.max_retries,
            timeout_s=self.timeout_s,
            rate_limit_store=Path(self.rate_limit_store) if self.rate_limit_store else None,
            rate_limit_redis_url=self.redis_url if self.rate_limit_backend == "redis" else None,
        )

    def client(self) -> MapillaryClient:
        return MapillaryClient(self.client_settings())

    @classmethod
    def from_env(cls, default_rate_limit_store: Path) -> MapillaryApiResource:
        """URLs and budgets from MAPILLARY_* variables; the token stays an EnvVar, resolved only inside a run."""
        values = _values_from_env(cls, os.environ, skip={"access_token"})
        values.setdefault("rate_limit_store", str(default_rate_limit_store))
        for name in (
            "entity_per_minute",
            "search_per_minute",
            "tiles_per_minute",
            "tiles_per_day",
            "max_connections",
        ):
            _at_least(_env_name(name), values.get(name, 1), 1)
        _at_least(_env_name("timeout_s"), values.get("timeout_s", 60.0), 0.1)
        if not values.get("quota_day_seconds", 1.0) > 0:
            raise ConfigError(
                f"MAPILLARY_QUOTA_DAY_SECONDS={values['quota_day_seconds']} must be > 0 (86400: a day)"
            )
        try:
            values["rate_limit_backend"] = "redis" if redis_url_from_env() else "sqlite"
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(access_token=dg.EnvVar("MAPILLARY_ACCESS_TOKEN"), **values)


class DataStorageResource(dg.ConfigurableResource):
    """The data dir of every stage's files: a folder or s3://bucket/prefix (see storage.DataLayout)."""

    data_dir: str

    @property
    def layout(self) -> DataLayout:
        return DataLayout.at(self.data_dir)


class PipelineSettings(dg.ConfigurableResource):
    """What the pipeline does; every field has a MAPILLARY_* environment variable (see README)."""

    tileset: str = "mly1_public"
    discovery_route: str = "tiles"
    tile_cache_max_age_hours: float = 24.0
    chunk_size: int = 0  # 0: chosen from the image count (chunks.adaptive_chunk_size)
    sample_limit: int = 0
    thumbnail_size: int = 1024
    download_concurrency: int = 64
    blur_backend: str = "auto"
    blur_threshold: float = 100.0
    filter_areas_path: str = ""
    inside_spacing_m: float = 100.0
    outside_spacing_m: float = 1000.0
    max_failed_ratio: float = 0.01
    sequence_ids: str = ""
    gpkg_version: str = DEFAULT_GPKG_VERSION

    def sequence_id_list(self) -> list[str]:
        """MAPILLARY_SEQUENCE_IDS: ids separated by commas or whitespace, or a text file holding them."""
        text = self.sequence_ids.strip()
        if text and Path(text).is_file():
            try:
                text = Path(text).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"MAPILLARY_SEQUENCE_IDS={self.sequence_ids!r} cannot be read ({exc}): point it at "
                    "a UTF-8 text file of sequence ids, or list the ids themselves"
                ) from None
        ids = list(dict.fromkeys(text.replace(",", " ").split()))
        invalid = [i for i in ids if not _SEQUENCE_ID.match(i)]
        if invalid:
            raise ConfigError(
                f"MAPILLARY_SEQUENCE_IDS holds {len(invalid)} invalid sequence id(s) "
                f"({', '.join(map(repr, invalid[:3]))}): "
                "Mapillary sequence ids are letters, digits, '_' and '-', separated by commas or spaces "
                "(or a file of them)"
            )
        return ids

    def validated(self) -> PipelineSettings:
        _choice("MAPILLARY_TILESET", self.tileset, TILESETS)
        _choice("MAPILLARY_DISCOVERY_ROUTE", self.discovery_route, DISCOVERY_ROUTES)
        _choice("MAPILLARY_BLUR_BACKEND", self.blur_backend, BLUR_BACKENDS)
        _choice("MAPILLARY_THUMBNAIL_SIZE", self.thumbnail_size, THUMBNAIL_SIZES)
        _choice("MAPILLARY_GPKG_VERSION", self.gpkg_version, GPKG_VERSIONS)
        if self.chunk_size != 0:
            _at_least("MAPILLARY_CHUNK_SIZE", self.chunk_size, 50, upper=100_000)
        _at_least("MAPILLARY_SAMPLE_LIMIT", self.sample_limit, 0)
        _at_least("MAPILLARY_DOWNLOAD_CONCURRENCY", self.download_concurrency, 1, upper=1000)
        _at_least("MAPILLARY_TILE_CACHE_MAX_AGE_HOURS", self.tile_cache_max_age_hours, 0)
        _at_least("MAPILLARY_BLUR_THRESHOLD", self.blur_threshold, 0)
        _at_least("MAPILLARY_INSIDE_SPACING_M", self.inside_spacing_m, 0)
        _at_least("MAPILLARY_OUTSIDE_SPACING_M", self.outside_spacing_m, 0)
        _at_least("MAPILLARY_MAX_FAILED_RATIO", self.max_failed_ratio, 0, upper=1)
        self.sequence_id_list()
        if self.filter_areas_path and not Path(self.filter_areas_path).is_file():
            raise ConfigError(
                f"MAPILLARY_FILTER_AREAS={self.filter_areas_path!r} is not a file: "
                "point it at a GeoJSON or GeoPackage of polygons, or unset it"
            )
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PipelineSettings:
        return cls(**_values_from_env(cls, os.environ if environ is None else environ)).validated()


_ENV_NAMES = {"filter_areas_path": "MAPILLARY_FILTER_AREAS"}


def api_resources(
    *,
    graph_url: str,
    tiles_url: str,
    data_dir: Path,
    access_token: str | dg.EnvVar,
    api: Mapping[str, object] | None = None,
    settings: Mapping[str, object] | None = None,
) -> dict[str, dg.ConfigurableResource]:
    """The three resources of the pipeline against the API at explicit URLs (the emulator's, in the
    tests and benchmarks), its files under `data_dir`: `access_token` a str or `dg.EnvVar`, `api`
    MapillaryApiResource fields (rate budgets, retries), `settings` PipelineSettings fields."""
    layout = DataLayout.at(data_dir)
    return {
        "mapillary_api": MapillaryApiResource(
            access_token=access_token,
            graph_url=graph_url,
            tiles_url=tiles_url,
            rate_limit_store=str(layout.rate_limit_store_path),
            **(api or {}),
        ),
        "storage": DataStorageResource(data_dir=str(layout.root)),
        "settings": PipelineSettings(**(settings or {})).validated(),
    }


def _env_name(field: str) -> str:
    return _ENV_NAMES.get(field, f"MAPILLARY_{field.upper()}")


def _values_from_env(cls, env, skip: set[str] = frozenset()) -> dict[str, object]:
    """Field values of a resource from MAPILLARY_<FIELD> variables that are set (and not empty)."""
    values: dict[str, object] = {}
    for name, field in cls.model_fields.items():
        variable = _env_name(name)
        if name in skip or not env.get(variable):
            continue
        raw, kind = env[variable], field.annotation
        try:
            values[name] = kind(raw) if kind in (int, float) else raw
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
    return values


def _choice(variable: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{variable}={value!r} is not supported: use one of {', '.join(map(str, allowed))}"
        )


def _at_least(variable: str, value: float, lower: float, upper: float | None = None) -> None:
    if value < lower or (upper is not None and value > upper):
        bound = f"from {lower} to {upper}" if upper is not None else f">= {lower}"
        raise ConfigError(f"{variable}={value!r} is out of range: use a value {bound}")
