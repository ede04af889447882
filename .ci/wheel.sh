#!/usr/bin/env bash
# CI step: build the wheel (python -m build --wheel), install it into a fresh venv next to torch, and run the
# import + CPU-op smoke test (.ci/wheel_smoke.py) from outside the repository.
# SDKERN_CUDA=OFF: the wheel CI checks is the CPU build (CPU kernels + ORT library); CUDA wheels are built the
# same way on a machine with nvcc. The isolated build recompiles the CPU kernels in build/<wheel tag>.
# Budget on an idle 2-core machine: ~3 min (build ~1.5-2 min, fresh venv + the local torch wheel ~40 s, smoke ~10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rm -rf dist
SDKERN_CUDA=OFF python -m build --wheel --outdir dist . > "$tmp/wheel.log" 2>&1 || { tail -n 80 "$tmp/wheel.log"; exit 1; }
wheel=$(ls dist/sdkern-*.whl)
echo "built $wheel ($(du -h "$wheel" | cut -f1)) in $(( $(date +%s) - t0 )) s"
python - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ("sdkern/__init__.py", "sdkern/libsdkern_ort.so")
missing = [n for n in need if n not in names] + ([] if any(n.startswith("sdkern/_C.") for n in names) else ["sdkern/_C.*"])
assert not missing, f"wheel lacks {missing}"
PY

python3 -m venv "$tmp/venv"                         # fresh: no system site-packages
"$tmp/venv/bin/python" -m pip install -q torch==2.13.0  # the local CPU wheel
"$tmp/venv/bin/python" -m pip install -q "$wheel"
repo=$(pwd)
(cd "$tmp" && "$tmp/venv/bin/python" "$repo/.ci/wheel_smoke.py")
echo "wheel step: $(( $(date +%s) - t0 )) s"
