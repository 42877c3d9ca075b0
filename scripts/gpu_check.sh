#!/usr/bin/env bash
# GPU check (issue 6): paper-scale steps/s of the real training loop on a fresh GPU machine.
#
#   bash scripts/gpu_check.sh                      # install what is missing, then benchmark
#   bash scripts/gpu_check.sh --steps 150          # fewer measured steps per run
#   bash scripts/gpu_check.sh --compile            # also LS and NTKMTL with train.compile=true
#   bash scripts/gpu_check.sh --device cpu --steps 5 --no-install   # its Python parts, on a CPU
#
# Runs scripts/bench_train.py at paper scale (batch 1280, 3x400, MT10, async env workers)
# for LS, NTKMTL (n = 1 and n = 4) and Nash-MTL, then prints steps/s, the update-time ratio
# to LS, peak GPU memory and the projected 2M-step wall time (scripts/bench_report.py).
# With $OUT set, the results land in $OUT/gpu_check.json (and one JSON per run beside it).
# Meant to finish in under 5 minutes on one H100 with the default 200 steps per run.
#
# Installing: nothing is installed when `import torch, metaworld, ...` already works and
# torch sees a GPU. Otherwise `pip install torch==2.13.0` (its PyPI wheel is the CUDA build)
# when torch is missing or CPU-only, then `pip install -e .[rl]`; without a package index,
# pip is pointed at wheels in $WHEELS (default: .whl in the repository), if any. The
# package itself is also put on PYTHONPATH, so a failed editable install is no obstacle.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repository=$(pwd)
python=${PYTHON:-python3}
device=cuda
steps=200
install=1
compile=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --no-install) install=0; shift ;;
        --compile) compile=1; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

export PYTHONUNBUFFERED=1
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
wheels=${WHEELS:-$repository/.whl}
started=$SECONDS

log() { echo "gpu_check [$((SECONDS - started)) s]: $*" >&2; }

deps_ok() {
    "$python" - "$device" <<'PY' 2>/dev/null
import sys
import gymnasium, hydra, metaworld, omegaconf, tensorboard, torch, tqdm  # noqa: F401
sys.exit(0 if sys.argv[1] != "cuda" or torch.cuda.is_available() else 1)
PY
}

pip_install() {  # pip install "$@", from the index or else from the local wheels
    if "$python" -m pip install --disable-pip-version-check -q "$@"; then
        return 0
    fi
    if [[ -d $wheels ]]; then
        log "the package index failed; trying the wheels in $wheels"
        "$python" -m pip install --disable-pip-version-check -q --no-index \
            --find-links "$wheels" "$@"
        return $?
    fi
    return 1
}

if [[ $install == 1 ]] && ! deps_ok; then
    if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
            2>/dev/null; then
        log "installing torch==2.13.0 (the CUDA build on PyPI)"
        pip_install torch==2.13.0 || log "could not install torch==2.13.0"
    fi
    log "installing mtrl_ntk[rl]"
    pip_install --no-build-isolation -e ".[rl]" \
        || pip_install -e ".[rl]" \
        || log "pip install -e .[rl] failed; relying on what is installed"
fi
if ! deps_ok; then
    log "missing: torch with CUDA ($device), metaworld, gymnasium, hydra-core, tensorboard or tqdm"
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' \
        >&2 || true
    exit 3
fi

"$python" - "$device" <<'PY'
import sys, torch, metaworld, gymnasium
device = sys.argv[1]
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {name}, "
      f"metaworld {metaworld.__version__ if hasattr(metaworld, '__version__') else '?'}, "
      f"gymnasium {gymnasium.__version__}", flush=True)
PY

results=${OUT:+$OUT/gpu_check_runs}
results=${results:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$results"
# name|bench_train arguments
runs=(
    "ls|--combiner ls"
    "ntkmtl_n1|--combiner ntkmtl combiner.num_minibatches=1"
    "ntkmtl_n4|--combiner ntkmtl combiner.num_minibatches=4"
    "nashmtl|--combiner nashmtl"
)
if [[ $compile == 1 ]]; then
    if "$python" -c 'import sys; from mtrl_ntk.config import TrainSettings as T; sys.exit(0 if "compile" in T.__dataclass_fields__ else 1)'; then
        runs+=("ls_compiled|--combiner ls train.compile=true"
               "ntkmtl_n4_compiled|--combiner ntkmtl combiner.num_minibatches=4 train.compile=true")
    else
        log "this checkout has no train.compile setting: compiled runs skipped"
    fi
fi

status=0
for run in "${runs[@]}"; do
    name=${run%%|*}
    read -r -a arguments <<< "${run#*|}"
    log "$name: bench_train --preset paper --steps $steps --device $device ${arguments[*]}"
    if ! timeout 900 "$python" scripts/bench_train.py --preset paper --steps "$steps" \
            --device "$device" --json-out "$results/$name.json" "${arguments[@]}"; then
        log "$name failed"
        status=1
    fi
done

reports=("$results"/*.json)
report_arguments=("${reports[@]}")
if [[ -n ${OUT:-} ]]; then
    report_arguments+=(--out "$OUT/gpu_check.json")
fi
if [[ -e ${reports[0]} ]]; then
    "$python" scripts/bench_report.py "${report_arguments[@]}"
else
    log "no run finished"
    status=1
fi
log "done in $((SECONDS - started)) s"
exit $status
