"""The whole pipeline on the reference world with an s3:// data dir, in a process of its own:

    python -m mapillary_assets_tests.support.bucket_run FOLDER s3://bucket/prefix

The instance lives in FOLDER/home; the bucket's endpoint and keys come from the AWS_* environment.
A fresh process, because obstore's runtime is not fork-safe (storage.object_store.in_fresh_child):
the pipeline's driver forks its runs, so it must not inherit a test process that used the bucket.
Exit status: 0 the pipeline completed, 1 it failed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_on_bucket(
    folder: Path, data_dir: str, timeout_s: float = 900
) -> subprocess.CompletedProcess:
    """Run the pipeline in a child process; its console output comes back (text)."""
    return subprocess.run(
        [sys.executable, "-m", "mapillary_assets_tests.support.bucket_run", str(folder), data_dir],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def main(argv: list[str]) -> int:
    from mapillary_assets.errors import PipelineFailed
    from mapillary_assets_tests.support.emulated_runs import emulated_run

    folder, data_dir = Path(argv[0]), argv[1]
    with emulated_run(folder, data_dir=data_dir) as run:
        try:
            run.run_pipeline()
        except PipelineFailed as failure:
            print(f"pipeline failed: {failure}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
