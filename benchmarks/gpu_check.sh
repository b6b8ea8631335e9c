#!/usr/bin/env bash
# The whole GPU check in one call on a lent device machine (see README, "Developing"):
#   build the CUDA extension, run the gpu-marked tests on CUDA and the CPU suite beside them,
#   run every benchmark at the anchor shapes, and leave a log plus JSON under $OUT.
#
# Device call (repo root):  bash benchmarks/gpu_check.sh
# With DALI carried in parts (benchmarks/dali_bundle.sh: one call per part copies it to
# /tmp/dali_parts), the last part's call runs
#   DALI_PARTS_DIR=/tmp/dali_parts bash benchmarks/gpu_check.sh
# Steps can be chosen: GPU_CHECK_STEPS="build tests kernels throughput data" (the default: all).
set -uo pipefail

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-build tests kernels throughput data}
failed=()

wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME TIMEOUT_S CMD...: run, time, and remember failures without stopping
  local name=$1 limit=$2
  shift 2
  echo "=== [$name] $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local status=$?
  echo "=== [$name] exit $status after $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY - <<'PY'
import json, os, torch, triton
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
print(info)
json.dump(info, open(os.path.join(os.environ.get("OUT", "."), "environment.json"), "w"), indent=2)
PY

if [ -n "${DALI_PARTS_DIR:-}" ] && [ -d "$DALI_PARTS_DIR" ]; then
  # The parts were copied there by the previous calls (benchmarks/dali_bundle.sh explains).
  bash benchmarks/dali_bundle.sh --install "$DALI_PARTS_DIR" /tmp/site &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if wants build; then
  # Hopper only: halves the nvcc time of a check that has minutes, not hours.
  step build 300 env TORCH_CUDA_ARCH_LIST="9.0" $PY setup.py build_ext --inplace -q
  step info 60 $PY -c "import dino_fast, dino_fast._C as C; print(C.build_info()); print(dino_fast.ops.available_backends())"
fi
if wants tests; then
  step gpu-tests 300 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests
  # The CPU suite as CI runs it, on this machine's cores (Triton under the interpreter).
  step cpu-tests 300 env TRITON_INTERPRET=1 $PY -m pytest -q -m "not gpu and not slow" -p no:cacheprovider tests
fi
if wants kernels; then
  step kernels 240 $PY benchmarks/kernels.py --device cuda --json "$OUT/kernels.json"
fi
if wants throughput; then
  for batch in 128 64; do
    step "throughput-b$batch" 600 $PY benchmarks/throughput.py --device cuda --preset anchor \
      --batch_size_per_gpu "$batch" --json "$OUT/throughput_b$batch.json"
  done
fi
if wants data && $PY -c "import nvidia.dali" 2>/dev/null; then
  step data 240 $PY benchmarks/data_loading.py --pipeline dali synthetic --device cuda --batch_size 128 \
    --num_images 1024 --steps 30 --json "$OUT/data_loading.json"
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "GPU CHECK: failed steps: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK: all steps passed"
