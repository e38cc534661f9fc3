"""Client settings (`ClientConfig`, read from the environment by `from_env`) and `Secret`, the
wrapper that keeps the access token out of every string, log line and repr."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from mapillary_assets.api.ratelimit import redis_url_from_env

__all__ = ["REDACTED", "TOKEN_MISSING_MESSAGE", "ClientConfig", "Secret"]

TOKEN_MISSING_MESSAGE = (
    "MAPILLARY_ACCESS_TOKEN is not set: create a client token (MLY|...) at "
    "https://www.mapillary.com/dashboard/developers and export it, or use the emulator's token"
)
REDACTED = "***"


class Secret:
    """A credential that prints as '***'; `.reveal()` is for the one place that sends it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
        self._value = value.reveal() if isinstance(value, Secret) else str(value)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    token: Secret
    graph_url: str = "https://graph.mapillary.com"
    tiles_url: str = "https://tiles.mapillary.com"
    entity_per_minute: int = 50_000
    search_per_minute: int = 10_000
    tiles_per_minute: int = 6_000
    # The tile server's daily quota per app (MAPILLARY_TILES_PER_DAY) and the length of its day
    # (MAPILLARY_QUOTA_DAY_SECONDS; 86,400 s = UTC days; tests shorten it as the emulator's).
    tiles_per_day: int = 50_000
    quota_day_seconds: float = 86_400.0
    max_connections: int = 64
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    rate_limit_store: Path | None = None
    # Set (MAPILLARY_RATE_LIMIT_BACKEND=redis): the buckets live in Redis, shared by every machine.
    rate_limit_redis_url: str | None = None

    def __post_init__(self) -> None:
        # Normalise what callers commonly pass loosely (a plain str token, trailing slashes, a str path).
        if not isinstance(self.token, Secret):
            object.__setattr__(self, "token", Secret(self.token))
        object.__setattr__(self, "graph_url", str(self.graph_url).rstrip("/"))
        object.__setattr__(self, "tiles_url", str(self.tiles_url).rstrip("/"))
        if self.rate_limit_store is not None and not isinstance(self.rate_limit_store, Path):
            object.__setattr__(self, "rate_limit_store", Path(self.rate_limit_store))
        for name in (
            "entity_per_minute",
            "search_per_minute",
            "tiles_per_minute",
            "tiles_per_day",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ClientConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.quota_day_seconds > 0:
            raise ValueError(
                f"ClientConfig.quota_day_seconds must be > 0, got {self.quota_day_seconds}"
            )
        if (
            self.max_retries < 0
            or self.timeout_s <= 0
            or self.backoff_base_s < 0
            or self.backoff_max_s < 0
        ):
            raise ValueError(
                "ClientConfig: max_retries, backoff_*_s must be >= 0 and timeout_s > 0"
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Settings from MAPILLARY_ACCESS_TOKEN, MAPILLARY_GRAPH_URL, MAPILLARY_TILES_URL,
        MAPILLARY_RATE_LIMIT_STORE, MAPILLARY_TILES_PER_DAY and MAPILLARY_QUOTA_DAY_SECONDS; keyword
        overrides win over the environment."""
        env = os.environ
        token = overrides.pop("token", None)
        if token is None:
            token = env.get("MAPILLARY_ACCESS_TOKEN", "")
        token = Secret(token)
        if not token.reveal().strip():
            raise ValueError(TOKEN_MISSING_MESSAGE)
        values: dict[str, Any] = {}
        for field, variable in (
            ("graph_url", "MAPILLARY_GRAPH_URL"),
            ("tiles_url", "MAPILLARY_TILES_URL"),
        ):
            if env.get(variable, "").strip():
                values[field] = env[variable].strip()
        for field, variable, kind in (
            ("tiles_per_day", "MAPILLARY_TILES_PER_DAY", int),
            ("quota_day_seconds", "MAPILLARY_QUOTA_DAY_SECONDS", float),
        ):
            raw = env.get(variable, "").strip()
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
        if env.get("MAPILLARY_RATE_LIMIT_STORE", "").strip():
            values["rate_limit_store"] = Path(env["MAPILLARY_RATE_LIMIT_STORE"].strip())
        values["rate_limit_redis_url"] = redis_url_from_env(env)
        values.update(overrides)
        return cls(token=token, **values)
