#!/usr/bin/env bash
# The GPU machine's one command: install the carried wheels (bench/fetch_gpu_wheels.sh made them here) into
# /tmp/site without touching the preinstalled torch, check the imports, then run the suite.
#
#   bash bench/gpu_suite_run.sh --out "$OUT"            # arguments go to python -m bench.gpu_suite
#
# The stages' budget is 480 s less the set-up's seconds, so the whole command stays within 8 minutes.
#
# No network is needed: --no-index, --no-deps; each wheel's dependencies are either carried or preinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_SUITE_WHEELS:-.whl}
SITE=${GPU_SUITE_SITE:-/tmp/site}
PY=${PYTHON:-python3}
t0=$(date +%s)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
else
    echo "gpu_suite_run.sh: no wheels in $WHEELS (carry it: run(carry=[\"$WHEELS\"])); using what is installed" >&2
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, torchvision, timm, deepspeed, webdataset, submitit, safetensors, yaml, skipssl, eval, bench
print('imports ok: torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__,
      'timm', timm.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
setup=$(( $(date +%s) - t0 ))
echo "set-up: $setup s"
# the 8 minutes include this set-up, unless the caller set a budget
case " $* " in
    *" --budget"*) exec "$PY" -m bench.gpu_suite "$@" ;;
    *) exec "$PY" -m bench.gpu_suite --budget $(( ${GPU_SUITE_TOTAL_S:-480} - setup )) "$@" ;;
esac
