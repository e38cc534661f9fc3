"""Concurrency pools the assets claim; their limits live in the instance (dagster.yaml, POOL_LIMITS)."""

API_POOL = "mapillary_api"  # runs that call the API (the shared token bucket paces them)
DUCKDB_POOL = "duckdb_writer"  # DuckDB allows one writer process per file
GPU_POOL = "gpu"  # one blur run owns the GPU at a time
