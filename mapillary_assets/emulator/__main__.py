"""Run the emulator: ``python -m mapillary_assets.emulator [--port 8765] [--scale 0.005] ...``.

Prints the Graph and tiles base URLs (never the token) and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .app import DEFAULT_TOKEN, EmulatorServer
from .faults import Faults
from .regions import REGIONS
from .world import World

FAMILIES = ("tiles", "entity", "search")


def _rate_limit(text: str) -> tuple[str, int]:
    family, sep, budget = text.partition("=")
    if not sep or family not in FAMILIES:
        raise argparse.ArgumentTypeError(
            f"expected FAMILY=PER_MINUTE with FAMILY one of {', '.join(FAMILIES)}"
        )
    try:
        value = int(budget)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an integer, got {budget!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("budget must be >= 1")
    return family, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mapillary-assets emulator",
        description="Offline emulator of the Mapillary API v4 (Graph API, tiles, CDN).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--region",
        choices=sorted(REGIONS),
        default="zurich",
        help="the world's extent: zurich (default) or switzerland (>= 10 M images at scale 1.0)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=0.005,
        help="world density; 1.0 is ~1.2 million images in Zurich (default 0.005)",
    )
    parser.add_argument(
        "--epoch", type=int, default=0, help="start with the sequences of this many advances"
    )
    parser.add_argument("--blurred-fraction", type=float, default=0.1)
    parser.add_argument(
        "--token",
        default=None,
        help=f"access token to accept (default: $MAPILLARY_ACCESS_TOKEN or {DEFAULT_TOKEN!r})",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every response"
    )
    parser.add_argument(
        "--latency-jitter", type=float, default=0.0, help="extra random latency, up to seconds"
    )
    parser.add_argument(
        "--error-5xx-rate", type=float, default=0.0, help="fraction of requests failing 500/502/503"
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        action="append",
        default=[],
        metavar="FAMILY=N",
        help="per-minute budget of tiles/entity/search (repeatable)",
    )
    parser.add_argument("--rate-limit-status", type=int, choices=(403, 429), default=429)
    parser.add_argument(
        "--tiles-per-day",
        type=int,
        default=None,
        help="daily tile quota (refused with 429 code 4 until the next day; default: none)",
    )
    parser.add_argument(
        "--day-seconds",
        type=float,
        default=86400.0,
        help="length of the quota's day (default 86400)",
    )
    parser.add_argument(
        "--thumbnail-ttl", type=float, default=3600.0, help="seconds a thumbnail URL stays valid"
    )
    parser.add_argument("--corrupt-jpeg-rate", type=float, default=0.0)
    parser.add_argument("--truncated-jpeg-rate", type=float, default=0.0)
    parser.add_argument("--omit-optional-fields", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("MAPILLARY_ACCESS_TOKEN") or DEFAULT_TOKEN
    world = World(
        seed=args.seed,
        scale=args.scale,
        epoch=args.epoch,
        blurred_fraction=args.blurred_fraction,
        region=args.region,
    )
    faults = Faults(
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        error_5xx_rate=args.error_5xx_rate,
        rate_limit_per_minute=dict(args.rate_limit),
        corrupt_jpeg_rate=args.corrupt_jpeg_rate,
        truncated_jpeg_rate=args.truncated_jpeg_rate,
        omit_optional_fields=args.omit_optional_fields,
        thumbnail_ttl_s=args.thumbnail_ttl,
        tiles_per_day=args.tiles_per_day,
        day_seconds=args.day_seconds,
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with EmulatorServer(
            world,
            faults,
            token=token,
            host=args.host,
            port=args.port,
            rate_limit_status=args.rate_limit_status,
        ) as server:
            print(f"Mapillary emulator ({world!r}) listening", flush=True)
            print(f"MAPILLARY_GRAPH_URL={server.graph_url}", flush=True)
            print(f"MAPILLARY_TILES_URL={server.tiles_url}", flush=True)
            print(
                "access token: "
                + (
                    "the default emulator token"
                    if token == DEFAULT_TOKEN
                    else "as configured (not shown)"
                ),
                flush=True,
            )
            if faults.rate_limit_per_minute:
                print(
                    "rate limits per minute: "
                    + ", ".join(f"{k}={v}" for k, v in faults.rate_limit_per_minute.items()),
                    flush=True,
                )
            if faults.tiles_per_day is not None:
                print(
                    f"daily tile quota: {faults.tiles_per_day} per {faults.day_seconds:g} s",
                    flush=True,
                )
            while not stop.wait(0.5):
                pass
            print("stopping", flush=True)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
