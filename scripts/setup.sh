#!/usr/bin/env bash
# Creates .venv in the repository root and installs the project with its pinned dependencies.
# Idempotent: a second run with unchanged pyproject.toml / constraints.txt returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# Fashion-MNIST (Debian package dataset-fashion-mnist) is the real dataset of the tests and the demo.
FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing dataset-fashion-mnist" >&2
    { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } \
        >/dev/null 2>&1 || echo "[setup] warning: could not install dataset-fashion-mnist; tests that need it skip" >&2
fi
# SLURM 22.05 (Debian packages slurmctld slurmd slurm-client munge) runs the one-node cluster of the SLURM tests.
SLURM_PKGS="slurmctld slurmd slurm-client munge"
if ! { [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && [ -x /usr/bin/sbatch ]; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing $SLURM_PKGS" >&2
    { apt-get install -y -q $SLURM_PKGS || { apt-get update -q && apt-get install -y -q $SLURM_PKGS; }; } \
        >/dev/null 2>&1 || echo "[setup] warning: could not install $SLURM_PKGS; SLURM tests skip (fail in CI)" >&2
fi
# timm's own model test-suite (tests/test_timm_suite.py runs it against the SkipAt models) ships in timm's
# source distribution on PyPI: unpack the one of the installed version into .venv/timm-src/.
fetch_timm_suite() {
    local ver
    ver=$(.venv/bin/python -c 'import timm; print(timm.__version__)') || return 0
    [ -f ".venv/timm-src/timm-$ver/tests/test_models.py" ] && return 0
    echo "[setup] fetching timm $ver's test-suite (its sdist)" >&2
    mkdir -p .venv/timm-src
    .venv/bin/python -m pip download --isolated --disable-pip-version-check -q --no-deps --no-binary :all: \
        -d .venv/timm-src "timm==$ver" >/dev/null 2>&1 \
        && tar xzf ".venv/timm-src/timm-$ver.tar.gz" -C .venv/timm-src \
        || echo "[setup] warning: could not fetch timm's sdist; tests/test_timm_suite.py skips (fails in CI)" >&2
}
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('skipssl') is None)" 2>/dev/null; then
    fetch_timm_suite
    exit 0
fi

echo "[setup] installing into .venv (first run: a few minutes, ~5 GB for torch)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --isolated: ignore machine-wide pip settings, whose local torch "+cpu" wheel cannot run torchvision
# (seen on the build machines); constraints.txt pins a torch/torchvision pair that works on CPU and GPU.
pip_install() { .venv/bin/python -m pip install --isolated --disable-pip-version-check -q "$@"; }
pip_install -c constraints.txt -e '.[test]'
rm -f .venv/.installed-*
touch "$stamp"
fetch_timm_suite
echo "[setup] done" >&2
