#!/usr/bin/env bash
# Whole-collection check on a CUDA machine: the environment, every bundle's training for one epoch with AMP,
# inference on a full-size volume, and the speed benchmark, written to one report (gpu_check.md, with
# gpu_check.json, nvidia-smi.txt and the runs' logs beside it).
#
#   tools/gpu_check.sh [OUT_DIR] [--device cuda|cpu] [--tiny] [--python PYTHON] [--no-benchmark]
#
# OUT_DIR defaults to $OUT, else runs/gpu_check. Nothing is downloaded or installed (the GPU machine has no
# internet): the Python environment (default .venv/bin/python of this checkout, else python3) is checked
# against setup.cfg first, and what is missing is reported before anything runs. `--device cpu --tiny` is the
# CPU fallback with tiny sizes (how the script is tested). Exit status 0 when everything passed, 1 otherwise,
# 2 on bad usage. See common/bundle/device_check.py.
set -uo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/runs/gpu_check}"
DEVICE=cuda
TINY=False
BENCHMARK=True
PY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --tiny) TINY=True; shift ;;
        --no-benchmark) BENCHMARK=False; shift ;;
        --python) PY="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) OUT_DIR="$1"; shift ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "error: no Python >= 3.10 found (tried ${PY:-python3}); build the environment with 'python3 tools/dev.py test'" >&2
    exit 1
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

echo "== environment ($PY)"
if ! "$PY" -m common.bundle.device_check env > "$OUT_DIR/environment.json"; then
    "$PY" - "$OUT_DIR/environment.json" <<'EOF'
import json, sys
env = json.load(open(sys.argv[1]))
print("missing or mismatched requirements (setup.cfg):", ", ".join(env["missing"]) or "none")
if "error" in env.get("torch", {}):
    print("torch cannot be imported:", env["torch"]["error"])
EOF
    { echo "# Device check: environment incomplete"; echo; echo '```'; cat "$OUT_DIR/environment.json"; echo '```'; } \
        > "$OUT_DIR/gpu_check.md"
    echo "report: $OUT_DIR/gpu_check.md (environment incomplete; nothing else was run)"
    exit 1
fi
if [ "$DEVICE" = cuda ]; then
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT_DIR/nvidia-smi.txt"
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "error: --device cuda, but torch sees no CUDA device (torch build: $("$PY" -c 'import torch; print(torch.__version__)'));" \
            "see $OUT_DIR/nvidia-smi.txt, or run with --device cpu --tiny" >&2
        exit 1
    fi
fi

echo "== bundles and benchmark on $DEVICE (tiny: $TINY), report in $OUT_DIR"
"$PY" -m common.bundle.device_check run --out_dir "$OUT_DIR" --device "$DEVICE" --tiny "$TINY" \
    --benchmark "$BENCHMARK" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
