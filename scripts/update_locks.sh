#!/usr/bin/env bash
# Pin mtrl_ntk's runtime dependencies (requirements.in) with uv (`pip install uv==0.13.9`).
#
#   bash scripts/update_locks.sh            rewrite both locks; a pin that still satisfies
#                                           requirements.in is kept (uv prefers the old lock)
#   bash scripts/update_locks.sh --upgrade  move every pin to the newest release allowed
#   bash scripts/update_locks.sh --check    change nothing; exit 1 when a lock differs from
#                                           what the first form would write (for CI)
#
# Two files, because no environment marker tells a CPU install from a CUDA one:
#   requirements.lock       the closure for CPython 3.11 on Linux x86_64 WITHOUT torch's CUDA
#                           runtime (the nvidia-*, cuda-* and triton wheels that torch's PyPI
#                           wheel depends on on Linux). A CPU build of torch 2.13.0 installed
#                           first (2.13.0+cpu) satisfies its torch==2.13.0, so installing it
#                           never downloads CUDA. CI and CPU machines use it.
#   requirements-cuda.lock  the same pins (resolved with requirements.lock as constraints)
#                           plus that CUDA runtime; the Docker image installs it. torch pins
#                           only part of its CUDA runtime itself (cuda-bindings and the
#                           cuda-toolkit components are ranges), so the image needs these pins.
# Resolving reads package metadata only: no wheel, and no CUDA torch, is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="write"
upgrade=()
case "${1:-}" in
  "") ;;
  --upgrade) upgrade=(--upgrade) ;;
  --check) mode=check ;;
  *) echo "usage: bash scripts/update_locks.sh [--upgrade | --check]" >&2; exit 2 ;;
esac
uv=${UV:-uv}
if ! command -v "$uv" >/dev/null; then
  echo "error: uv not found; install it with: pip install uv==0.13.9" >&2
  exit 2
fi

# torch 2.13.0's Linux-only requirements that make up its CUDA runtime. Excluding them
# also drops what only they need (nvidia-cublas, cuda-pathfinder, ...).
cuda_runtime=(cuda-toolkit cuda-bindings nvidia-cudnn-cu13 nvidia-cusparselt-cu13
              nvidia-nccl-cu13 nvidia-nvshmem-cu13 triton)

# Resolve in a scratch directory with relative names, so that the "# via" annotations
# are the same wherever this runs; the old locks go there too, as uv's preferences.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp requirements.in "$work/"
for lock in requirements.lock requirements-cuda.lock; do
  if [ -f "$lock" ]; then cp "$lock" "$work/"; fi
done
printf '%s\n' "${cuda_runtime[@]}" > "$work/cuda-runtime.txt"

compile=("$uv" pip compile --quiet --no-config --python-version 3.11
         --python-platform x86_64-manylinux_2_28
         --custom-compile-command "bash scripts/update_locks.sh" "${upgrade[@]}" requirements.in)
(
  cd "$work"
  "${compile[@]}" --excludes cuda-runtime.txt --output-file requirements.lock
  "${compile[@]}" --constraints requirements.lock --output-file requirements-cuda.lock
)

if grep -E -i '^(nvidia-|cuda-|triton==)' "$work/requirements.lock"; then
  echo "error: torch's CUDA runtime leaked into requirements.lock (above): torch's CUDA" \
       "requirements changed; update cuda_runtime in scripts/update_locks.sh" >&2
  exit 1
fi

prepend() {  # prepend FILE LINE...: put comment lines above uv's output
  local file=$1
  shift
  { printf '# %s\n' "$@"; cat "$file"; } > "$file.new"
  mv "$file.new" "$file"
}
prepend "$work/requirements.lock" \
  "Pinned runtime closure of mtrl_ntk for CPython 3.11 on Linux x86_64, WITHOUT torch's CUDA" \
  "runtime (nvidia-*, cuda-*, triton): installing it never downloads CUDA. Generated from" \
  "requirements.in by scripts/update_locks.sh (uv); do not edit by hand." \
  "CPU install (CI, laptops): a CPU build of torch 2.13.0 first (2.13.0+cpu satisfies the" \
  "torch pin below), then:" \
  "  pip install -r requirements.lock && pip install --no-deps -e ." \
  "GPU machines and the Docker image use requirements-cuda.lock (these pins + CUDA runtime)."
prepend "$work/requirements-cuda.lock" \
  "Pinned runtime closure of mtrl_ntk for CPython 3.11 on Linux x86_64 WITH the CUDA 13" \
  "runtime of torch 2.13.0's PyPI wheel: requirements.lock's pins plus the nvidia-*, cuda-*" \
  "and triton packages (NVIDIA driver >= 580 on the host). The Docker image installs it; on a" \
  "bare-metal GPU machine: pip install -r requirements-cuda.lock && pip install --no-deps -e ." \
  "Generated from requirements.in by scripts/update_locks.sh (uv); do not edit by hand."

stale=0
for lock in requirements.lock requirements-cuda.lock; do
  if [ "$mode" = check ]; then
    if ! diff -u "$lock" "$work/$lock"; then
      echo "error: $lock is not what requirements.in resolves to;" \
           "run: bash scripts/update_locks.sh" >&2
      stale=1
    fi
  else
    cp "$work/$lock" "$lock"
    echo "wrote $lock ($(grep -c '==' "$lock") pins)"
  fi
done
exit "$stale"
