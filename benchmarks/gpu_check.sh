#!/usr/bin/env bash
# The GPU check, planned for a lent device machine: 15 minutes of device time per session in all
# (the machine's start, 1-2 min, included), at most 10 minutes per call, no network. Two calls,
# each a list of steps with its own time budget; README.md, "The GPU check", gives the calls.
#
#   bash benchmarks/gpu_check.sh run1      # device call timeout 540 s; the steps take <= 510 s
#   bash benchmarks/gpu_check.sh run2      # what is left: GPU_CHECK_BUDGET_S=<seconds> (default 240)
#   bash benchmarks/gpu_check.sh run1 --dry-run   # CPU, tiny shapes: same steps, same files
#   bash benchmarks/gpu_check.sh run1 --list      # the plan (steps, budgets) as JSON; runs nothing
#
# run1: env, build (sm_90 only), torchvision, gpu-tests (pytest -m gpu), kernels
#       (benchmarks/kernels.py), throughput-b128 (official, tuned, dino_fast; 10 timed steps),
#       throughput-rn50 (the same for the official ResNet-50 recipe; 5 timed steps).
# run2: env, build (a no-op when run1's build is still there), torchvision,
#       throughput-b128-compiled (tuned+compile, dino_fast+compile), throughput-b64 (official,
#       tuned, dino_fast), inference (ViT-S/16 and ResNet-50 forward images/s at 224 px), dali
#       (only with DALI_PARTS_DIR: the parts benchmarks/dali_bundle.sh had carried there).
# torchvision: the machine's own, else the wheels benchmarks/torchvision_bundle.sh made, carried
# in .torchvision_wheels (or TORCHVISION_WHEELS_DIR) and installed into a folder the later steps
# import from; with neither, throughput-rn50 and the inference step's ResNet row are left out,
# with one line saying how to carry it. The CPU suite is not run here: CI runs it.
#
# Everything lands under $OUT as it is produced, so a call that is cut off still returns what it
# measured: environment.json, gpu_check.json (the plan and every step's status, exit code and
# seconds, rewritten after each step), logs/<step>.log, and each step's JSON (throughput.py
# rewrites its file after every variant). A step runs under `timeout` with its own budget, cut to
# the time the call has left (GPU_CHECK_BUDGET_S); one that fails or runs out of time is recorded
# and the next step runs. GPU_CHECK_BUDGETS="step=seconds ..." overrides single budgets;
# GPU_CHECK_ONLY="step ..." runs those steps of the plan alone (the others are recorded skipped).
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs the same steps on the CPU at tiny shapes and writes the
# same files, so the script cannot rot between GPU runs (tests/benchmarks/test_gpu_check.py runs it):
# build checks the extension already built instead of compiling one, gpu-tests only collects
# (without CUDA every gpu test is skipped), and the compiled variants run with
# TORCHDYNAMO_DISABLE=1 (their eager step: inductor on a 2-core CPU takes minutes).
set -uo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

plan=""
dry=${GPU_CHECK_DRY_RUN:-0}
list=0
one_step=""  # internal: `--run-step NAME` runs one step's body (under run_step's timeout)
while [ $# -gt 0 ]; do
  case $1 in
    run1 | run2) plan=$1 ;;
    --dry-run) dry=1 ;;
    --list) list=1 ;;
    --run-step) one_step=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$plan" ]; then
  echo "gpu_check.sh: say which call: run1 or run2" >&2
  usage >&2
  exit 2
fi
[ "$dry" = 1 ] || dry=0

# Per-step budgets in seconds, estimated for an H100/H200-class machine with 16 cores until a run
# has measured them (gpu_check.json records every step's real seconds). Each call's budgets add up
# under its total, and the total under the device call's timeout. The build's covers a cold nvcc
# compile of csrc/ for one arch: 26-42 s on 2 cores here, cmake's configure included; run 2's
# build is a no-op (~10 s) while run 1's is still on the warm machine. throughput-rn50: model
# builds, the fp32 reference and cuDNN's autotuning of each precision's convolutions dominate.
declare -A BUDGET
case $plan in
  run1)
    STEPS=(env build torchvision gpu-tests kernels throughput-b128 throughput-rn50)
    BUDGET=([env]=15 [build]=90 [torchvision]=10 [gpu-tests]=150 [kernels]=55 [throughput-b128]=100
      [throughput-rn50]=70)
    DEFAULT_TOTAL=510 # 490 s of steps; the device call's timeout is 540
    ;;
  run2)
    STEPS=(env build torchvision throughput-b128-compiled throughput-b64 inference dali)
    BUDGET=([env]=10 [build]=40 [torchvision]=10 [throughput-b128-compiled]=110 [throughput-b64]=40
      [inference]=25 [dali]=120)
    DEFAULT_TOTAL=240 # 235 s without DALI; with DALI carried give it GPU_CHECK_BUDGET_S=360
    ;;
esac
for override in ${GPU_CHECK_BUDGETS:-}; do
  BUDGET[${override%%=*}]=${override#*=}
done
TOTAL=${GPU_CHECK_BUDGET_S:-$DEFAULT_TOTAL}
RESERVE=5  # seconds kept for the last gpu_check.json and the exit
# The dry run's steps run on a 2-core CPU, not a GPU: its limits are 3x the plan's, so that a slow
# CI machine does not turn a dry run into a timeout (the plan and its files stay the same).
SCALE=$([ "$dry" = 1 ] && echo 3 || echo 1)

# The throughput steps' variants, in order (throughput.py rewrites its JSON after each).
declare -A DRY_VARIANTS=()
declare -A VARIANTS=(
  [throughput-b128]="official tuned dino_fast"
  [throughput-rn50]="official tuned dino_fast"
  [throughput-b128-compiled]="tuned+compile dino_fast+compile"
  [throughput-b64]="official tuned dino_fast"
)
if [ "$dry" = 1 ]; then
  DEVICE=cpu
  export CUDA_VISIBLE_DEVICES="" TORCHDYNAMO_DISABLE=1
  # Tiny shapes: a full-depth ViT-tiny on 2x2 / 1x1 patch grids, B=2, K=64, one timed step. On a
  # CPU each variant costs 10-20 s (mostly building the models), so one variant per step runs;
  # tests/benchmarks/test_gpu_check.py checks that throughput.py accepts the full lists above.
  VIT=(--device cpu --preset tiny --local_crops_number 1 --out_dim 64 --steps 1 --warmup 0 --num_workers 1)
  # ResNet-18 at its tiny preset's B=4 and 2 local crops: fewer images leave its last batch norms
  # so few values per channel that bf16 rounding alone moves the loss past the check's tolerance.
  RESNET=(--device cpu --preset rn_tiny --steps 1 --warmup 0 --num_workers 1)
  B128=(--batch_size_per_gpu 2)
  B64=(--batch_size_per_gpu 1)
  DRY_VARIANTS=([throughput-b128]="dino_fast" [throughput-rn50]="dino_fast"
    [throughput-b128-compiled]="dino_fast+compile" [throughput-b64]="official")
  KERNELS=(--device cpu --once)
  INFERENCE=(--device cpu --preset tiny --steps 2 --warmup 1)
  INFERENCE_VIT=vit_tiny
else
  DEVICE=cuda
  VIT=(--device cuda --preset anchor --steps 10 --warmup 3)
  RESNET=(--device cuda --preset rn50 --steps 5 --warmup 2)
  B128=(--batch_size_per_gpu 128)
  B64=(--batch_size_per_gpu 64)
  KERNELS=(--device cuda)
  INFERENCE=(--device cuda --preset anchor)
  INFERENCE_VIT=vit_small
fi
# torchvision: the machine's own, else the carried wheels installed into TORCHVISION_SITE, which
# is on every step's path from the start (a folder that does not exist changes nothing; run 2
# finds run 1's there while the machine is warm).
TORCHVISION_WHEELS_DIR=${TORCHVISION_WHEELS_DIR:-$PWD/.torchvision_wheels}
TORCHVISION_SITE=${TORCHVISION_SITE:-/tmp/gpu_check_torchvision_site}
export PYTHONPATH=$TORCHVISION_SITE${PYTHONPATH:+:$PYTHONPATH}

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

json_list() {  # json_list "a b c" -> ["a", "b", "c"]
  local sep="" word
  printf '['
  for word in $1; do
    printf '%s"%s"' "$sep" "$word"
    sep=", "
  done
  printf ']'
}
plan_json() {
  local sep="" step
  printf '{"plan": "%s", "dry_run": %s, "budget_s": %s, "limit_scale": %s, "steps": [' "$plan" \
    "$([ "$dry" = 1 ] && echo true || echo false)" "$TOTAL" "$SCALE"
  for step in "${STEPS[@]}"; do
    printf '%s{"name": "%s", "budget_s": %s' "$sep" "$step" "${BUDGET[$step]}"
    if [ -n "${VARIANTS[$step]:-}" ]; then
      printf ', "variants": %s' "$(json_list "${VARIANTS[$step]}")"
      if [ -n "${DRY_VARIANTS[$step]:-}" ]; then
        printf ', "dry_run_variants": %s' "$(json_list "${DRY_VARIANTS[$step]}")"
      fi
    fi
    printf '}'
    sep=", "
  done
  printf ']}\n'
}
if [ "$list" = 1 ]; then
  plan_json
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export OUT GPU_CHECK_DRY_RUN=$dry
SUMMARY=$OUT/gpu_check.json
START=$SECONDS

say() { echo "$*" | tee -a "$OUT/gpu_check.log"; }

# gpu_check.json: the plan, then each step's result as it comes.
record() {  # record STEP STATUS EXIT SECONDS LIMIT NOTE
  "$PY" - "$SUMMARY" "$@" <<'PY'
import json, os, sys
path, name, status, code, seconds, limit, note = sys.argv[1:8]
summary = json.load(open(path))
for step in summary["steps"]:
    if step["name"] == name:
        log = f"logs/{name}.log"
        step.update(status=status, exit=int(code) if code else None, seconds=int(seconds),
                    limit_s=int(limit) if limit else None, note=note or None,
                    log=log if os.path.exists(os.path.join(os.path.dirname(path), log)) else None)
summary["elapsed_s"] = sum(s.get("seconds", 0) for s in summary["steps"])
json.dump(summary, open(path + ".tmp", "w"), indent=2)
PY
  mv "$SUMMARY.tmp" "$SUMMARY"
}

failed=()
run_step() {  # run_step NAME: step_NAME under its budget, cut to what the call has left
  local name=$1
  local left=$((TOTAL * SCALE - RESERVE - (SECONDS - START)))
  local limit=$((BUDGET[$name] * SCALE))
  if [ "$left" -lt 10 ]; then
    say "=== [$name] not run: the call has ${left} s left"
    record "$name" "out-of-time" "" 0 "" "not run: ${left} s left of $((TOTAL * SCALE))"
    failed+=("$name")
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  say "=== [$name] budget ${limit} s"
  local t0=$SECONDS
  # A step runs in a fresh bash under `timeout`, which kills its whole process group at the limit.
  timeout -k 10 "$limit" bash "$0" "$plan" --run-step "$name" 2>&1 | tee "$OUT/logs/$name.log" |
    tee -a "$OUT/gpu_check.log"
  local code=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status=ok note=""
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    status=timeout note="cut off at its budget of ${limit} s"
  elif [ "$code" -ne 0 ]; then
    status=failed
  fi
  say "=== [$name] $status (exit $code) after ${took} s"
  record "$name" "$status" "$code" "$took" "$limit" "$note"
  [ "$status" = ok ] || failed+=("$name")
}
skip_step() {  # skip_step NAME REASON: a step that has nothing to do here (not a failure)
  say "=== [$1] skipped: $2"
  record "$1" "skipped" "" 0 "" "$2"
}


step_env() {
  if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    nvcc --version 2>/dev/null | tail -2 || /usr/local/cuda/bin/nvcc --version | tail -2 || true
  fi
  "$PY" - "$DEVICE" "$plan" "$dry" <<'PY'
import datetime, importlib.metadata as md, json, os, platform, re, shutil, subprocess, sys
import torch
device, plan, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
nvcc_version = None
if nvcc:
    found = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    nvcc_version = found and found.group(1)
info = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "plan": plan, "dry_run": dry, "python": platform.python_version(), "cpu_count": os.cpu_count(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "nvcc": nvcc_version, "nvcc_path": nvcc,
    **{name: version(name) for name in ("triton", "numpy", "pybind11", "cmake", "ninja", "pytest", "setuptools",
                                        "wheel", "nvidia-dali-cuda130", "torchvision", "pillow")},
}
if device == "cuda":
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
else:
    info.update(device="cpu", capability=None, sms=None, memory_gib=None, gpus=0)
slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower().replace("nvidia", "")).strip("-")
info["results_dir"] = f"benchmarks/results/{info['date'][:10]}-{slug}"
print(json.dumps(info, indent=2))
json.dump(info, open(os.path.join(os.environ["OUT"], "environment.json"), "w"), indent=2)
PY
}

step_build() {
  if [ "$DEVICE" = cuda ]; then
    # Hopper only (sm_90): one arch is all this check has time for.
    TORCH_CUDA_ARCH_LIST="9.0" "$PY" setup.py build_ext --inplace -q || return
  else
    echo "dry run: not compiling (the device runs: TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py build_ext --inplace -q);"
    echo "checking the extension this environment already has"
  fi
  WANT_CUDA=$([ "$DEVICE" = cuda ] && echo 1 || echo 0) "$PY" -c "
import json, os, dino_fast, dino_fast._C as C
info = C.build_info()
print(json.dumps(info), dino_fast.ops.available_backends())
json.dump(info, open(os.path.join(os.environ['OUT'], 'build_info.json'), 'w'), indent=2)
assert os.environ['WANT_CUDA'] == '0' or info['cuda'], 'the extension was built without its CUDA sources'"
}

step_gpu_tests() {
  # Only the files that hold gpu tests: the others may import what the GPU machine lacks
  # (torchvision), and one module that fails to import must not stop the rest from running.
  local files
  mapfile -t files < <(grep -rl --include="test_*.py" "mark.gpu" tests | sort)
  local args=(-q -m gpu -p no:cacheprovider -rA --continue-on-collection-errors
    --junitxml="$OUT/gpu_tests.xml" "${files[@]}")
  if [ "$DEVICE" = cpu ]; then
    "$PY" -m pytest "${args[@]}" --collect-only
  else
    "$PY" -m pytest "${args[@]}"
  fi
}

step_kernels() {
  "$PY" benchmarks/kernels.py "${KERNELS[@]}" --json "$OUT/kernels.json"
}

has_torchvision() {
  "$PY" -c "import torchvision" >/dev/null 2>&1
}
no_torchvision() {  # why the ResNet steps cannot run, and the fix, in one line
  if [ -d "$TORCHVISION_WHEELS_DIR" ]; then
    echo "the torchvision wheels carried in $TORCHVISION_WHEELS_DIR did not install (logs/torchvision.log says why)"
  else
    echo "torchvision is neither installed nor carried: run 'bash benchmarks/torchvision_bundle.sh' with PyPI at" \
      "hand and carry .torchvision_wheels with the call (or point TORCHVISION_WHEELS_DIR at the wheels)"
  fi
}

step_torchvision() {
  if has_torchvision; then
    "$PY" -c "import torchvision; print('torchvision', torchvision.__version__, 'at', torchvision.__file__)"
  else
    echo "torchvision not installed: installing the carried wheels from $TORCHVISION_WHEELS_DIR"
    PYTHON=$PY bash benchmarks/torchvision_bundle.sh --install "$TORCHVISION_WHEELS_DIR" "$TORCHVISION_SITE"
  fi
}

step_throughput() {  # step_throughput STEP JSON_NAME ARGS...
  local step=$1 json=$2
  shift 2
  local variants
  read -r -a variants <<< "${DRY_VARIANTS[$step]:-${VARIANTS[$step]}}"
  "$PY" benchmarks/throughput.py "$@" --variants "${variants[@]}" --json "$OUT/$json"
}

step_inference() {
  local archs=()
  if ! has_torchvision; then
    echo "the ResNet row is left out: $(no_torchvision)"
    archs=(--arch "$INFERENCE_VIT")
  fi
  "$PY" benchmarks/throughput.py --mode inference "${INFERENCE[@]}" "${archs[@]}" --json "$OUT/inference.json"
}

step_dali() {
  local site=/tmp/gpu_check_dali_site
  PYTHON=$PY bash benchmarks/dali_bundle.sh --install "$DALI_PARTS_DIR" "$site" || return
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  local status=0
  "$PY" -m pytest -q -p no:cacheprovider -rA --junitxml="$OUT/dali_tests.xml" tests/data/test_data_gpu.py || status=1
  "$PY" benchmarks/data_loading.py --pipeline dali synthetic --device "$DEVICE" --batch_size 128 \
    --num_images 1024 --steps 30 --json "$OUT/data_loading.json" || status=1
  return $status
}

if [ -n "$one_step" ]; then  # inside run_step's timeout
  case $one_step in
    env) step_env ;;
    build) step_build ;;
    torchvision) step_torchvision ;;
    gpu-tests) step_gpu_tests ;;
    kernels) step_kernels ;;
    throughput-b128) step_throughput throughput-b128 throughput_b128.json "${VIT[@]}" "${B128[@]}" ;;
    throughput-rn50) step_throughput throughput-rn50 throughput_rn50.json "${RESNET[@]}" ;;
    throughput-b128-compiled)
      step_throughput throughput-b128-compiled throughput_b128_compiled.json "${VIT[@]}" "${B128[@]}" ;;
    throughput-b64) step_throughput throughput-b64 throughput_b64.json "${VIT[@]}" "${B64[@]}" ;;
    inference) step_inference ;;
    dali) step_dali ;;
    *) echo "gpu_check.sh: no step '$one_step'" >&2; exit 2 ;;
  esac
  exit
fi

say "GPU check $plan$([ "$dry" = 1 ] && echo ' (dry run: CPU, tiny shapes)'): ${STEPS[*]}; ${TOTAL} s in all; results in $OUT"
plan_json > "$SUMMARY"
for name in "${STEPS[@]}"; do
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    skip_step "$name" "not in GPU_CHECK_ONLY"
  elif [ "$name" = dali ] && ! [ -d "${DALI_PARTS_DIR:-/nonexistent}" ]; then
    skip_step dali "DALI not carried (DALI_PARTS_DIR: the folder the dali_bundle.sh parts were copied to)"
  elif [ "$name" = torchvision ] && ! [ -d "$TORCHVISION_WHEELS_DIR" ] && ! has_torchvision; then
    skip_step torchvision "$(no_torchvision)"
  elif [ "$name" = throughput-rn50 ] && ! has_torchvision; then
    skip_step throughput-rn50 "$(no_torchvision)"
  else
    run_step "$name"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  say "GPU CHECK $plan: not passed: ${failed[*]} (after $((SECONDS - START)) s; see $OUT/gpu_check.json)"
  exit 1
fi
say "GPU CHECK $plan: all steps passed in $((SECONDS - START)) s"
