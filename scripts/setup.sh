#!/usr/bin/env bash
# Sets up .venv (Python venv with torch==2.13.0 and everything else) and builds ldmfast in it.
# Idempotent: a second run only rebuilds what changed. Never lets pip pull another torch.
#   LDMFAST_TORCH=torch==2.13.0 (default)    the torch requirement to install
#   LDMFAST_VENV=.venv (default)             where the environment goes
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LDMFAST_VENV:-.venv}
torch_req=${LDMFAST_TORCH:-torch==2.13.0}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "ldmfast setup: creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "ldmfast setup: installing $torch_req"
  "${pip[@]}" install -q "$torch_req"
fi
torch_ver=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
# The constraint pins the installed torch, so no dependency can replace it.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_ver" > "$constraints"
echo "ldmfast setup: installing requirements (torch $torch_ver kept)"
"${pip[@]}" install -q -c "$constraints" -r requirements.txt
# Headers only: the package's own dependencies (cuda-python, scipy) are not needed.
"${pip[@]}" install -q --no-deps nvidia-cutlass==4.2.0.0
echo "ldmfast setup: building the extension"
"${pip[@]}" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import ldmfast.ops as o; print('ldmfast setup: ops loaded, CUDA kernels:', o.cuda_available())"
