#!/usr/bin/env bash
# The GPU blur check of issue 21 (benchmarks/gpu_check.py), in one command.
#
#   benchmarks/gpu_check.sh                 prepare .whl/ here (the wheels the lent GPU machine lacks)
#                                           and print the device tool's `run` call to make
#   benchmarks/gpu_check.sh --local [OPTS]  run the check on this machine (OPTS: gpu_check.py's, e.g.
#                                           --images 200); without CUDA it says so and gives CPU figures
#
# Then: python -m benchmarks.run --merge <the JSON that came back> puts the figures into RESULTS.md.
# The lent machines have torch, torchvision, cv2, numpy, pandas and pyarrow, and nothing can be
# downloaded there, so kornia (and kornia_rs) travel as cp312 manylinux x86_64 wheels. One version
# of each; `/.whl/` is in .gitignore.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}

if [[ ${1:-} == --local ]]; then
    shift
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m benchmarks.gpu_check "$@"
fi

WHEELS=(kornia==0.9.0 kornia_rs==0.2.0)
rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl

cat <<'CALL'

Device call (the device tool's `run`; the JSON and the log come back under files_at):
  kind: leave out (nvidia-h100-x1; an H200 does as well)
  carry: [".whl"]
  timeout_s: 240
  command:
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L; PYTHONUNBUFFERED=1 timeout 200 python3 -m benchmarks.gpu_check --images 2000 --budget-s 150 --output $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Then here: python -m benchmarks.run --merge <files_at>/gpu_check.json
CALL
