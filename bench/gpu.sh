#!/usr/bin/env bash
# GPU figures in one go (issue #20; docs/performance.md, "GPU figures: how to run them"):
#
#   bench/gpu.sh [--budget-s 480] [--out build/gpu-bench] [--only filter,train] [--wheels DIR] [--no-install]
#   bench/gpu.sh --cpu-smoke [--out DIR]      # the same script on the CPU, tiny inputs (tests/test_gpu_bench.py)
#
# From the repo root of a fresh GPU machine: installs what is missing (apt: ffmpeg, espeak-ng, sox via
# `make apt`; Python: the project with its pinned deps, `pip install -e .`, whose torch from PyPI is the
# CUDA build; offline, from wheels in --wheels DIR), then runs bench/gpu.py under the budget, which
# writes <out>/gpu.md, <out>/nvidia-smi.txt, <out>/versions.txt and <out>/logs/. Where the pinned
# torch cannot be installed (no index reachable) but a CUDA torch is there, that torch is kept and
# the rest installed around it; gpu.md names the torch that ran. Without apt, ffmpeg can come from the
# imageio-ffmpeg wheel and bench/separate.py stands in for espeak-ng. The install is not in the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SMOKE=0 INSTALL=1 WHEELS="" ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1; ARGS+=("$1") ;;
    --no-install) INSTALL=0 ;;
    --wheels) WHEELS=$(cd "$2" && pwd); shift ;;
    --wheels=*) WHEELS=$(cd "${1#--wheels=}" && pwd) ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

pip_install() {  # pip install ARGS..., from PyPI or only from the --wheels folder
  if [ -n "$WHEELS" ]; then "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$@"
  else "$PYTHON" -m pip install -q "$@"; fi
}

have_everything() {  # every pinned requirement installed at its pin, and torch sees a GPU
  "$PYTHON" - <<'EOF'
import re, sys, tomllib
from importlib import metadata
reqs = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wrong = []
for req in reqs:
    name, pin = re.match(r"([\w.-]+)(?:\[[^\]]*\])?(?:==([^,;\s]+))?", req).groups()
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        wrong.append(f"{name} missing")
        continue
    if pin and version.split("+")[0] != pin:
        wrong.append(f"{name} {version} (pinned {pin})")
import torch
if not torch.cuda.is_available():
    wrong.append(f"torch {torch.__version__} sees no GPU")
print("; ".join(wrong) or "all pinned requirements present, torch sees the GPU")
sys.exit(1 if wrong else 0)
EOF
}

install() {
  if command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && command -v sox >/dev/null; then :
  else make -s apt || echo "gpu.sh: could not install ffmpeg/espeak-ng/sox; sections that make media will fail"; fi
  have_everything && return 0
  echo "gpu.sh: pip install -e . (pinned; torch $(grep -o 'torch==[0-9.]*' pyproject.toml) from PyPI is the CUDA build)"
  pip_install -e . && have_everything && return 0
  # No index (or a CPU-only one): keep the torch that is here if it sees a GPU, install the rest around it.
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: keeping $("$PYTHON" -c 'import torch; print("torch", torch.__version__)') (the pinned one could not be installed)"
    constraints=$(mktemp)
    "$PYTHON" -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|numpy)==' >"$constraints"
    "$PYTHON" -m pip install -q --no-deps -e . || true
    "$PYTHON" - <<'EOF' >"$constraints.reqs"
import tomllib
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not req.startswith(("torch==", "torchvision==", "numpy")):
        print(req)
EOF
    pip_install -c "$constraints" -r "$constraints.reqs" || while read -r req; do
      pip_install -c "$constraints" "$req" || echo "gpu.sh: could not install $req"
    done <"$constraints.reqs"
    rm -f "$constraints" "$constraints.reqs"
  fi
  have_everything || echo "gpu.sh: going on without them; sections that need them will say so"
}

ffmpeg_fallback() {  # no apt: the static ffmpeg of the imageio-ffmpeg wheel (no ffprobe: `discomv run` needs it)
  command -v ffmpeg >/dev/null && return 0
  exe=$("$PYTHON" -c "import imageio_ffmpeg as f; print(f.get_ffmpeg_exe())" 2>/dev/null) \
    || { [ "$INSTALL" = 1 ] && pip_install imageio-ffmpeg \
         && exe=$("$PYTHON" -c "import imageio_ffmpeg as f; print(f.get_ffmpeg_exe())"); } || return 0
  mkdir -p build/gpu-bench/bin && ln -sf "$exe" build/gpu-bench/bin/ffmpeg
  export PATH="$PWD/build/gpu-bench/bin:$PATH"
  echo "gpu.sh: ffmpeg from imageio-ffmpeg ($exe)"
}

if [ "$SMOKE" = 0 ] && [ "$INSTALL" = 1 ]; then install; fi
if [ "$SMOKE" = 0 ]; then ffmpeg_fallback; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu.py "${ARGS[@]}"
