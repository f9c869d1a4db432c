#!/usr/bin/env bash
# The CUDA path, checked and measured on the GPU machine in one call (docs/gpu.md says how to call it).
#
# Phases, each time-boxed, all within GPU_CHECK_BUDGET seconds (default 420; 5× that without CUDA):
#   setup       nvidia-smi; the wheels of .whl/ whose distribution the image lacks, into a scratch site
#               folder (benchmarks/gpu_wheels.sh fills .whl/ beforehand, on a machine with pip's registry);
#               the project from this working tree (PYTHONPATH=src)
#   tests       tests/test_cuda.py: bf16/fp16 autocast through every path, ResiDual's fp32 parts, no
#               host↔device copy in a λ step (the `cuda` tests skip without CUDA)
#   notebooks   the notebooks in smoke mode (tests/test_notebooks.py, tests/test_retrieval_notebook.py)
#   bench       benchmarks/gpu_bench.py's measures (GPU_BENCH_MEASURES to pick some)
#   experiment  benchmarks/gpu_bench.py experiment: the study at ESC-50 scale, extrapolated
# GPU_CHECK_PHASES picks phases ("tests bench" reruns two). Without CUDA (the rehearsal: `make gpu-rehearsal`)
# every CUDA part is skipped with a line saying so and the rest runs on toy sizes.
#
# Results go to $OUT (the device tool brings back at most 8 files): summary.txt (also printed last),
# gpu_bench.json, gpu_bench.png, cuda_tests.xml, notebooks.xml and gpu_check_logs.tar.gz (every log).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:?set OUT to the folder the results go to}
PYTHON=${PYTHON:-python3}
PHASES=${GPU_CHECK_PHASES:-setup tests notebooks bench experiment}
WORK=$(mktemp -d -t gpu_check.XXXXXX)
LOGS=$WORK/logs
SITE=${GPU_CHECK_SITE:-$(dirname "$WORK")/audio_residual_site}  # kept while the machine stays warm: a rerun reuses it
mkdir -p "$OUT" "$LOGS"
export ROOT PYTHON LOGS SITE WORK PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}:$SITE" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
declare -A CAP=([setup]=45 [tests]=90 [notebooks]=120 [bench]=150 [experiment]=150)  # seconds, on the GPU
SCALE=1
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || SCALE=5
for phase in "${!CAP[@]}"; do CAP[$phase]=$((CAP[$phase] * SCALE)); done  # a CPU rehearsal's toy sizes crawl
BUDGET=${GPU_CHECK_BUDGET:-$((420 * SCALE))}
declare -a REPORT=()
FAILED=0

note() { echo "[gpu_check $((SECONDS))s] $*" | tee -a "$LOGS/progress.txt"; }

# run_phase NAME COMMAND...: the command under `timeout` (SIGINT first, so pytest and Python write what they
# have), its output in $LOGS/NAME.log, its status in the summary.
run_phase() {
  local name=$1
  shift
  local left=$((BUDGET - SECONDS - 10)) cap=${CAP[$name]}
  local box=$((left < cap ? left : cap))
  if ((box < 15)); then
    REPORT+=("$name: skipped, ${left}s of the budget left")
    note "$name skipped: ${left}s of the budget left"
    return
  fi
  note "$name (at most ${box}s)"
  local started=$SECONDS rc
  timeout --signal=INT --kill-after=15 "$box" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - started)) status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${box}s" && FAILED=1 ;;
    *) status="FAILED (exit $rc)" && FAILED=1 ;;
  esac
  local counts
  counts=$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$LOGS/$name.log" | tail -n 1 | tr -d '=')
  REPORT+=("$name: $status in ${took}s${counts:+ ($counts)}")
  note "$name: $status in ${took}s"
  tail -n 25 "$LOGS/$name.log"
}

has_cuda() { "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

setup() {
  (nvidia-smi || echo "no nvidia-smi") >"$LOGS/nvidia-smi.txt" 2>&1
  "$PYTHON" - "$ROOT/.whl" "$SITE" <<'EOF'
"""Install the wheels whose distribution is missing here (never shadow the image's own packages)."""
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

folder, site = Path(sys.argv[1]), Path(sys.argv[2])
wheels = sorted(folder.glob("*.whl"))
if not wheels:
    print(f"no wheels in {folder}: nothing to install (benchmarks/gpu_wheels.sh fills it)")
missing = []
for wheel in wheels:
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        print(f"present: {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(wheel)
if missing and sys.version_info[:2] != (3, 12):
    print(f"not installing {len(missing)} missing: the wheels are for CPython 3.12 (the GPU image), this is "
          f"{sys.version.split()[0]}")
elif missing:
    print(f"installing {len(missing)}: {' '.join(w.name.split('-')[0] for w in missing)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, missing)],
                   check=True)
EOF
  local rc=$?
  "$PYTHON" - <<'EOF'
import importlib
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("GPU:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
broken = []
for module in ("transformers", "peft", "sklearn", "soundfile", "soxr", "captum", "librosa", "schedulefree",
               "audio_residual.cli", "audio_residual.analysis.saliency", "nbclient", "ipykernel"):
    try:
        version = getattr(importlib.import_module(module), "__version__", "")
        print(f"import {module} {version}")
    except Exception as error:  # noqa: BLE001 — list every failure, then fail once
        broken.append(f"{module}: {type(error).__name__}: {error}")
print("\n".join(f"CANNOT IMPORT {b}" for b in broken))
raise SystemExit(1 if any(not b.startswith(("nbclient", "ipykernel")) for b in broken) else 0)
EOF
  local imported=$?
  return $((rc || imported))
}

tests() {
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py --junitxml="$LOGS/cuda_tests.xml"
}

notebooks() {
  if ! has_cuda; then
    echo "notebooks skipped: CUDA absent (on the CPU, \`make test-slow\` runs them)"
    return 0
  fi
  local parallel=()
  "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 4)
  "$PYTHON" -m pytest -q -p no:cacheprovider -m slow "${parallel[@]}" tests/test_notebooks.py \
    tests/test_retrieval_notebook.py --junitxml="$LOGS/notebooks.xml"
}

bench() {
  # shellcheck disable=SC2086  # GPU_BENCH_MEASURES is a list of names
  "$PYTHON" benchmarks/gpu_bench.py ${GPU_BENCH_MEASURES:-} --out "$LOGS/bench" --budget "$1"
}

experiment() {
  "$PYTHON" benchmarks/gpu_bench.py experiment --out "$LOGS/bench" --budget "$1" --inputs "$WORK/e2e"
}

export -f setup tests notebooks bench experiment has_cuda
note "phases: $PHASES; budget ${BUDGET}s; results to $OUT"
if ((SCALE > 1)); then
  REPORT+=("CUDA absent: a rehearsal (CUDA tests skip, notebooks skip, gpu_bench runs toy sizes; figures mean nothing)")
  note "${REPORT[0]}"
fi
[[ " $PHASES " == *" setup "* ]] || PHASES="setup $PHASES"  # a fresh machine lacks the wheels: always install
for phase in $PHASES; do
  case $phase in
    setup)
      run_phase setup setup
      if [[ " $PHASES " == *" experiment "* ]]; then  # 2000 clips to generate on the CPU while the GPU works
        note "preparing the experiment's data and model in the background"
        "$PYTHON" benchmarks/gpu_bench.py --prepare --inputs "$WORK/e2e" --out "$LOGS/bench" >"$LOGS/prepare.log" 2>&1 &
        PREPARING=$!
      fi
      ;;
    tests | notebooks) run_phase "$phase" "$phase" ;;
    bench | experiment)
      left=$((BUDGET - SECONDS - 25))
      run_phase "$phase" "$phase" "$((left < CAP[$phase] - 15 ? left : CAP[$phase] - 15))"
      ;;
    *) note "unknown phase $phase: choose from setup tests notebooks bench experiment" && FAILED=1 ;;
  esac
done

{
  echo "gpu_check: $(date -u +%FT%TZ), ${SECONDS}s, phases: $PHASES"
  head -n 12 "$LOGS/nvidia-smi.txt" 2>/dev/null | grep -E "NVIDIA|MiB" || true
  printf '%s\n' "${REPORT[@]}"
  if [[ -f $LOGS/bench/gpu_bench.json ]]; then
    echo
    "$PYTHON" benchmarks/gpu_bench.py --table --out "$LOGS/bench"
  fi
} >"$LOGS/summary.txt" 2>&1
for file in summary.txt bench/gpu_bench.json bench/gpu_bench.png cuda_tests.xml notebooks.xml; do
  [[ -f $LOGS/$file ]] && cp "$LOGS/$file" "$OUT/"
done
[[ -n ${PREPARING:-} ]] && kill "$PREPARING" 2>/dev/null  # the experiment never came to use it
wait
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" logs
rm -rf "$WORK"
echo
cat "$OUT/summary.txt"
exit $FAILED
