#!/usr/bin/env bash
# CI step "newcomer": clone the repository into a temporary directory, follow the README's install block in a
# fresh venv (no system site-packages), check the build has the ORT library, and run the README's main
# command on the smallest preset. Keeps the README from drifting away from what works.
# The one substitution: the README's torch line (PyTorch's own index) becomes `pip install torch==2.13.0`,
# which resolves to the local CPU wheel (CI has no network). Budget: ~5 min on 2 cores (dependency installs
# from local wheels ~1.5 min, the sdkern build ~2.5 min, the bench ~20 s).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
t0=$(date +%s)
tmp=$(mktemp -d)
if [ -n "${SDKERN_NEWCOMER_KEEP:-}" ]; then
  echo "newcomer: keeping $tmp (SDKERN_NEWCOMER_KEEP)"
else
  trap 'rm -rf "$tmp"' EXIT
fi

git clone -q "$repo" "$tmp/sdkern"
cd "$tmp/sdkern"
install=$(python3 .ci/readme_block.py README.md install)
main=$(python3 .ci/readme_block.py README.md main)
install=$(printf '%s\n' "$install" | sed -E 's/^(python -m )?pip install torch( .*)?$/pip install torch==2.13.0/')
printf '== newcomer: install block\n%s\n' "$install"
# Run the install block as a script of its own lines (it activates the venv it creates).
unset VIRTUAL_ENV PYTHONPATH SDKERN_ORT_INCLUDE_DIR
# CPU-only build here (SDKERN_CUDA=OFF, a documented build option): the CUDA part of the same install
# was already built and checked by .ci/run's own install; compiling it again would add minutes.
export SDKERN_CUDA=OFF
export PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v "^$repo/.venv/bin$" | paste -sd:)
printf 'set -euo pipefail\n%s\n' "$install" > "$tmp/install.sh"
if ! bash -c ". '$tmp/install.sh'; python -c 'import sys; assert sys.prefix != sys.base_prefix, \"no venv\"'" \
    > "$tmp/install.log" 2>&1; then
  tail -n 60 "$tmp/install.log"
  echo "newcomer: the README's install block failed (log above)"
  exit 1
fi
. .venv/bin/activate
cd "$tmp"  # outside the clone: the installed package, not the source folder
python - <<'PY'
import sys, sysconfig
assert sys.prefix != sys.base_prefix, "not in the README's venv"
import sdkern, sdkern._C, sdkern.ort
assert sdkern.__file__.startswith(sysconfig.get_paths()["purelib"]), f"sdkern imported from {sdkern.__file__}"
print("newcomer: ORT library", sdkern.ort.library_path())
PY
echo "== newcomer: install $(( $(date +%s) - t0 )) s; main command: $main --preset tiny"
$main --preset tiny
echo "== newcomer: $(( $(date +%s) - t0 )) s"
