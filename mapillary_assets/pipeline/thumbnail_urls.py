"""Signed thumbnail URLs handed from a chunk's metadata step to its download step, in memory only.

Dagster-free. The metadata request can carry a `thumb_<size>_url` field, so the downloads need not ask
the Graph API again for the same 50 ids. A signed URL expires (`oe=` hex Unix time) and is never a
durable reference: it is kept here, in this process, keyed by (data root, chunk), and `take` removes it.
A chunk's run executes its steps in one process (LocalRunner and the Celery workers run
`execute_in_process`), so the download step finds what the metadata step left; anywhere else it finds
nothing and resolves every URL itself. Nothing here is written to any file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# A URL is used only if it stays valid this long after the moment it is queued: a download waits behind at
# most one round of the others and is retried for well under a minute.
SAFETY_MARGIN_S = 300.0

_handoff: dict[tuple[str, str], dict[str, SignedUrl]] = {}


@dataclass(frozen=True, slots=True)
class SignedUrl:
    url: str
    expires_at: (
        float | None
    )  # Unix time from `oe=`; None if the URL carries none (used once, then re-resolved)

    def usable(self, now: float | None = None, margin_s: float = SAFETY_MARGIN_S) -> bool:
        if self.expires_at is None:
            return False
        return self.expires_at - (time.time() if now is None else now) > margin_s


def signed_url(url: str) -> SignedUrl:
    """`url` with its expiry read from the `oe=` query parameter (8 hex digits of Unix time)."""
    values = parse_qs(urlsplit(url).query).get("oe")
    try:
        expires_at = float(int(values[0], 16)) if values else None
    except ValueError:
        expires_at = None
    return SignedUrl(url, expires_at)


def remember(root: Path, chunk_key: str, urls: Mapping[str, SignedUrl]) -> None:
    """Keep a chunk's URLs for its download step (replacing any earlier ones of the chunk)."""
    _handoff[(str(root), chunk_key)] = dict(urls)


def take(root: Path, chunk_key: str) -> dict[str, SignedUrl]:
    """The URLs `remember` kept for the chunk, removed from memory; {} if there are none."""
    return _handoff.pop((str(root), chunk_key), {})
