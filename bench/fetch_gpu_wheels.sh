#!/usr/bin/env bash
# Wheels the GPU machine lacks (the GPU machine has Python 3.12, torch/timm/numpy/... preinstalled, no
# network there) into .whl/ (git-ignored), for `run(carry=[".whl"])` and bench/gpu_suite_run.sh.
#
#   bash bench/fetch_gpu_wheels.sh            # on a machine with the package registry; prints the total size
#
# Versions are this project's pins (constraints.txt) and the versions of their dependencies that the CPU
# venv resolved; only the dependencies missing from the GPU image are fetched (its package list:
# /work/.library/device/KINDS.md, "Python packages already there"). The carried tree must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${1:-.whl}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# compiled wheels: CPython 3.12, manylinux x86-64 (the GPU machine); pip matches manylinux_2_N exactly
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLAT+=(--platform "$p"); done
binary() {
    "$PY" -m pip download --isolated --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d "$DEST" "$@"
}
# pure-Python wheels
pure() {
    "$PY" -m pip download --isolated --no-deps --only-binary=:all: -d "$DEST" "$@"
}

# deepspeed is published as a source archive only: build its (pure-Python, ops JIT-built) wheel here;
# no build isolation, so its setup.py imports this venv's torch instead of downloading another
DS_BUILD_OPS=0 "$PY" -m pip wheel --isolated --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
pure hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
     webdataset==1.0.2 braceexpand==0.1.7 submitit==1.5.4
# there already, but perhaps older than this project and pydantic need: carry the versions tested here
pure timm==1.0.31 typing_extensions==4.16.0
binary pydantic_core==2.50.5
# faiss-cpu: the CPU reference of the GPU k-NN comparison (stage f); skipped if it would break the budget
binary faiss-cpu==1.15.1

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "total: $total bytes ($((total / 1048576)) MiB) in $DEST"
if [ "$total" -gt $((56 * 1048576)) ]; then
    echo "over 56 MiB (the carry limit is 64 MiB with the working tree): dropping faiss-cpu" >&2
    rm -f "$DEST"/faiss_cpu-*.whl
fi
