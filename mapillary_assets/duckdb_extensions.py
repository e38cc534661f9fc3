"""DuckDB extensions loaded offline, from the PyPI wheels that ship them (`duckdb-extension-<name>`,
pinned to the project's duckdb): `INSTALL <name>` would need the internet."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def offline_extension_path(name: str, error: type[Exception] = RuntimeError) -> Path:
    """`<name>.duckdb_extension` from the `duckdb-extension-<name>` wheel matching this DuckDB; `error`
    (with the pip command that fixes it) when the wheel or the file is missing."""
    import duckdb  # here: light importers (benchmarks/gpu_check.py) must not load DuckDB

    package = f"duckdb-extension-{name}=={duckdb.__version__}"
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"DuckDB's {name} extension is not installed: pip install {package} "
            f"(never `INSTALL {name}`: it needs internet)"
        )
    folder = (
        Path(list(spec.submodule_search_locations)[0]) / "extensions" / f"v{duckdb.__version__}"
    )
    found = sorted(folder.rglob(f"{name}.duckdb_extension")) if folder.is_dir() else []
    if not found:
        raise error(
            f"no {name}.duckdb_extension under {folder}: install {package} to match duckdb "
            f"{duckdb.__version__}"
        )
    return found[0]
