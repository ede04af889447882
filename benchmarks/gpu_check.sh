#!/usr/bin/env bash
# One call that checks everything GPU-side on a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
# Builds sdkern with CUDA for the local GPU, prints sdkern.info, runs the CUDA/Triton tests
# (pytest -m "cuda or triton"), compute-sanitizer memcheck + racecheck + synccheck over the small-shape
# tests (tests/cuda/test_small_shapes.py: every op, both implementations), then every
# benchmarks/*_cuda.py (each writes OUTDIR/<name>.json: op benchmarks, U-Net step and 50-step pipeline).
# Writes OUTDIR/gpu_check.log (everything) and OUTDIR/summary.json (device, versions, step results).
#
# --dry-run (works without a GPU; tests/test_gpu_check.py runs it): every step starts but does the least
# that proves it would run -- no rebuild, the tests collected (and tests/cuda run: they skip without a
# GPU), compute-sanitizer asked for its version, each benchmark's --help (imports and argument parsing).
# Exit status: 0 when every step returned 0, else 1 (the summary lists each step's rc).
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUTDIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

declare -A RESULT
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*"
  local s=$(date +%s)
  timeout "$t" "$@"; local rc=$?
  RESULT[$name]="$rc $(( $(date +%s) - s ))"
  echo "=== $name: rc=$rc in $(( $(date +%s) - s )) s"
}

nvidia-smi || true
CC=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 90)
export SDKERN_CUDA=ON SDKERN_CUDA_ARCHS="${SDKERN_CUDA_ARCHS:-$CC}"
# The ORT headers: the vendored third_party/onnxruntime-1.21 (the build's default).

if [ "$DRY" = 1 ]; then
  step build 120 python3 -c "import sdkern, sdkern._C; print('dry run: build skipped; sdkern', sdkern.__version__)"
else
  step build 900 python3 -m pip install --no-build-isolation --no-deps -e . -q
fi
step info 120 python3 -m sdkern.info --json
python3 -m sdkern.info --json > "$OUT/info.json" 2>/dev/null
# ONNX Runtime's CUDA execution provider needs onnxruntime-gpu (the CPU wheel has none); pass a wheel
# with SDKERN_ORT_GPU_WHEEL=/path/onnxruntime_gpu-*.whl (the GPU machine has no network).
if [ -n "${SDKERN_ORT_GPU_WHEEL:-}" ]; then
  python3 -m pip uninstall -y -q onnxruntime >/dev/null 2>&1
  step ort_gpu_install 600 python3 -m pip install --no-deps -q "$SDKERN_ORT_GPU_WHEEL"
fi
if [ "$DRY" = 1 ]; then
  step tests 600 python3 -m pytest -q -m "cuda or triton" -p no:cacheprovider --collect-only
  step tests_cuda 600 python3 -m pytest -q tests/cuda -p no:cacheprovider
else
  step tests 1500 python3 -m pytest -q -m "cuda or triton" -p no:cacheprovider
fi
# compute-sanitizer over the small-shape tests (every op through sdkern._C_cuda and through Triton).
# memcheck: out-of-bounds / misaligned accesses (torch caching allocator off so every tensor is its
# own allocation); racecheck: shared-memory hazards; synccheck: invalid barrier use.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SMALL=tests/cuda/test_small_shapes.py
if [ -n "$SAN" ]; then
  for tool in memcheck racecheck synccheck; do
    if [ "$DRY" = 1 ]; then
      step "sanitizer_$tool" 120 "$SAN" --version
    else
      step "sanitizer_$tool" 1800 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 97 \
        --target-processes all python3 -m pytest -q -x "$SMALL" -p no:cacheprovider
    fi
  done
else
  echo "=== compute-sanitizer not found: memcheck/racecheck/synccheck skipped"
  RESULT[sanitizer]="127 0"
fi
for b in benchmarks/*_cuda.py; do
  [ -e "$b" ] || continue
  n=$(basename "$b" .py)
  if [ "$DRY" = 1 ]; then
    step "$n" 300 python3 "$b" --help  # imports and argument parsing (without a GPU they measure nothing)
  else
    step "$n" 900 python3 "$b" --out "$OUT/$n.json"
  fi
done
FAILED=0
for k in "${!RESULT[@]}"; do
  # a dry run on a machine without compute-sanitizer (a CPU machine) has no sanitizer step to start
  [ "$DRY" = 1 ] && [ "$k" = sanitizer ] && continue
  [ "${RESULT[$k]%% *}" = 0 ] || FAILED=1
done

python3 - "$OUT" <<PY
import json, sys, torch, platform
out = sys.argv[1]
res = {k: {"rc": int(v.split()[0]), "seconds": int(v.split()[1])} for k, v in {$(for k in "${!RESULT[@]}"; do printf '"%s": "%s", ' "$k" "${RESULT[$k]}"; done)}.items()}
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "steps": res,
    "dry_run": bool($DRY),
}
try:
    import triton; summary["triton"] = triton.__version__
except Exception: pass
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
exit "$FAILED"
