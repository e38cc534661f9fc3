#!/usr/bin/env bash
# Creates benchmarks/.peers-venv (git-ignored) with the peers that benchmarks/bench_peers.py compares:
# Meta's `mapillary` SDK and ZenSVI's MLYDownloader, installed from PyPI, never copied.
#
# ZenSVI 1.7.0 declares its whole toolkit as hard dependencies (torch<2.10, transformers, lightning,
# open3d, groundingdino, ...: a CUDA torch of ~6 GB). MLYDownloader needs none of them, so zensvi and
# streetlevel (whose pyequilib would pull torch too) go in with --no-deps, followed by exactly the
# modules that `from zensvi.download import MLYDownloader` imports.
# PEERS_VENV=path puts the venv elsewhere (bench_peers.py reads the same variable).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${PEERS_VENV:-benchmarks/.peers-venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" mapillary==1.0.16
"${PIP[@]}" --no-deps zensvi==1.7.0 streetlevel==0.12.13
"${PIP[@]}" Pillow geojson geopandas haversine huggingface_hub mapbox-vector-tile mercantile networkx osmnx \
    pandas pyproj requests shapely tenacity tqdm turfpy vt2geojson aiohttp protobuf bd09convertor \
    coordinatesconverter pyexiv2
"$VENV/bin/python" -c "import mapillary.interface, zensvi.download; print('peers ready in $VENV')"
