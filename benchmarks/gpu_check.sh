#!/usr/bin/env bash
# GPU check (issue 22): the one prepared script for the first session lent a GPU. It writes ONE
# markdown table (5 rows: the CUDA-only transform tests, resnet50 framework path vs bare loop,
# tf_efficientnet_lite0 eager vs torch.compile, cached probe epoch, 4-job joblib sweep on the GPU)
# to --out and prints it. The work is in benchmarks/gpu_check.py; per-row timeouts add up to 465 s.
# A row that cannot run is recorded as skipped or failed; the script never crashes on one.
#
# Here (no GPU):
#   bash benchmarks/gpu_check.sh --dry-run    # every row's code path on CPU, tiny sizes (CI runs it)
#   bash benchmarks/gpu_check.sh wheels       # fill .whl/ (gitignored, ~38 MB) with what the device lacks
#
# On the device machine (one H200): its image has torch, timm, pytorch-lightning, pytest, joblib,
# but not hydra-core, omegaconf, mlflow, hydra-joblib-launcher or animal-mnist, and the package is
# not installed there (the script puts src/ on PYTHONPATH). Without the wheels, row 1 (its test
# module imports omegaconf), row 4 (hydra) and row 5 (hydra, mlflow, the joblib launcher) are
# skipped, and rows 2-3 fall back to a minimal LightningModule; the script prints what each row
# needs and what is missing. So make the wheels here first, then one call of the device tool:
#   run(command="bash benchmarks/gpu_check.sh --out $OUT/gpu_check_results.md",
#       carry=[".whl"], timeout_s=560)
# That is about 1-2 min of machine start, ~30 s of wheel install and <= 8 min of rows, out of the
# 15 min of device time: there is no room for a full second run. To redo some rows only:
#   bash benchmarks/gpu_check.sh --rows probe,sweep --out $OUT/gpu_check_results.md
# $OUT gets the table and gpu_check_results.log (the tail of every row's output). Call give_back
# after the run. Paste the table into benchmarks/RESULTS.md ("GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3  # the device image's python3 holds its torch
fi

if [ "${1:-}" = wheels ]; then
    # As the device README says: pure-Python or manylinux wheels for CPython 3.12, no deps (the
    # list is the closure already resolved in this venv, less what the device image has).
    platforms=()
    for n in 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    rm -rf .whl && mkdir -p .whl
    "$PY" benchmarks/gpu_check.py --wheel-list | while read -r spec; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d .whl "$spec" 2>/dev/null \
            || "$PY" -m pip wheel -q --no-deps -w .whl "$spec"  # sdist only (antlr4-python3-runtime)
    done
    if ls .whl | grep -v -E -- '-(py3|py2\.py3)-none-any\.whl$|-cp312-|-abi3-'; then
        echo "warning: the wheels above will not install on the device's CPython 3.12" >&2
    fi
    echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl (the working tree that travels: 64 MiB at most)"
    exit 0
fi

if [ -d .whl ] && ! "$PY" -c "import hydra, mlflow" 2>/dev/null; then
    site=/tmp/gpu_check_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
