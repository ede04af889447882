#!/usr/bin/env bash
# ASan + UBSan build of the CPU kernels, the pybind module sdkern._C and the ORT library
# libsdkern_ort (CPU only, no CUDA), in its own build dir, and the native / ops / ORT / property tests
# run against it. Call it with the project's venv active, after the normal build (.ci/run does).
#
# ISA: one level, -march=native (SDKERN_NATIVE=ON), i.e. the widest SIMD code of the machine (AVX-512
# + BF16 on the CI machines): the four-level build takes 4x the compile time under the sanitizers.
# The ISA-specific results (NaN/Inf on every level) are tested by the normal build's tests.
#
# How: CMake builds with -fsanitize=address,undefined -fno-sanitize-recover=undefined into
# build/sanitize/; build/sanitize/overlay (first on PYTHONPATH) holds the sanitized extension modules
# and a sitecustomize (.ci/sanitize_site.py) that loads the sdkern sources with them (instead of the
# editable install's build), in pytest and in every subprocess the tests start; libasan is
# LD_PRELOADed into python (the interpreter is not instrumented). ASAN_OPTIONS=detect_leaks=0:
# CPython and torch keep allocations alive at exit by design and would swamp the report; invalid
# accesses, use-after-free and UB abort the test.
#
# What runs (SANITIZE_TESTS overrides): tests/native, tests/ops (the cpu and ort implementations' cases:
# -m "not triton and not cuda" leaves out the Triton interpreter's and the GPU's), tests/ort/test_ort_python.py,
# tests/ort/test_ort_reliability.py, tests/property (fewer examples: SDKERN_PROPERTY_EXAMPLES).
# Deselected: tests/ops/test_skip_layer_norm_ort.py::test_skip_layer_norm_ort (the ORT op), whose
# `mean` output misses its 1e-5 bound in the instrumented build (rel. error ~2e-5 on a near-zero row
# mean: ASan changes the reduction's vectorisation; the same seed passes in the normal and in an
# uninstrumented -march=native build). Its memory behaviour is covered by the property tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUILD="${SANITIZE_BUILD_DIR:-build/sanitize}"  # build/ is git-ignored
CXX="${CXX:-g++}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

libasan="$("$CXX" -print-file-name=libasan.so)"
# libstdc++ preloaded with it: python does not link libstdc++, and ASan's __cxa_throw interceptor must
# find the real one at startup (else every C++ exception, torch's included, aborts in a CHECK).
libstdcxx="$("$CXX" -print-file-name=libstdc++.so)"
preload="$libasan:$libstdcxx"
if [ ! -e "$libasan" ]; then
  echo "sanitizers: SKIPPED (no libasan for $CXX)"
  exit 0
fi

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g1"
mkdir -p "$BUILD"
# ORT headers: the vendored third_party copy (CMake default) unless SDKERN_ORT_INCLUDE_DIR is set
SDKERN_CUDA=OFF SDKERN_NATIVE=ON cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" > "$BUILD/configure.log" 2>&1 || {
  tail -n 50 "$BUILD/configure.log"
  exit 1
}
grep "sdkern: " "$BUILD/configure.log" || true
cmake --build "$BUILD" -j "$JOBS" -- -k > "$BUILD/build.log" 2>&1 || {
  tail -n 80 "$BUILD/build.log"
  echo "sanitizers: build failed"
  exit 1
}
echo "== sanitizers: build $(( $(date +%s) - start )) s"

overlay="$BUILD/overlay"  # sitecustomize.py + native/ (the sanitized extension modules)
rm -rf "$overlay"
mkdir -p "$overlay/native"
find "$BUILD" -maxdepth 1 \( -name '_C.*.so' -o -name 'libsdkern_ort.so' \) -exec cp {} "$overlay/native/" \;
cp .ci/sanitize_site.py "$overlay/sitecustomize.py"

export SDKERN_SOURCE_DIR="$PWD"
export PYTHONPATH="$PWD/$overlay${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:handle_segv=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export SDKERN_SANITIZE=1
export SDKERN_SANITIZE_FLAGS="$flags"  # tests/native compiles its host test with them
export SDKERN_PROPERTY_EXAMPLES="${SDKERN_PROPERTY_EXAMPLES:-15}"
where="$(LD_PRELOAD="$preload" python -c 'import sdkern._C, sdkern.ort; print(sdkern._C.__file__); print(sdkern.ort.library_path())')"
echo "$where"
case "$where" in *"$overlay"*) ;; *) echo "sanitizers: the overlay was not imported"; exit 1 ;; esac
read -r -a tests <<< "${SANITIZE_TESTS:-tests/native tests/ops tests/ort/test_ort_python.py tests/ort/test_ort_reliability.py tests/property}"
existing=()
for t in "${tests[@]}"; do [ -e "$t" ] && existing+=("$t"); done
rc=0
# test_autograd runs whole patched U-Nets (PyTorch-heavy, minutes under ASan, covered by the normal run)
LD_PRELOAD="$preload" python -m pytest -q -p no:cacheprovider -x "${existing[@]}" -m "not triton and not cuda" \
  --deselect tests/ops/test_skip_layer_norm_ort.py::test_skip_layer_norm_ort --ignore tests/ops/test_autograd.py || rc=$?
echo "== sanitizers: total $(( $(date +%s) - start )) s (rc=$rc); CPU time (user, system) of this shell, then of its children:"
times
exit $rc
