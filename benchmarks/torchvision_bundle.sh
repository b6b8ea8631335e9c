#!/usr/bin/env bash
# Bring torchvision (the ResNet backbones, and what dino_fast.official imports) to the GPU device
# machine, which may lack it and reaches no registry.
#
# Here (with PyPI): download the torchvision release built for the device's torch (0.26.0 for
# torch 2.11) and Pillow, which torchvision imports, for CPython 3.11 and 3.12 on manylinux
# x86_64, without other dependencies (torch and numpy are there). About 25 MB: one call carries
# it with the working tree.
#
#     bash benchmarks/torchvision_bundle.sh          # -> .torchvision_wheels/ (ignored by git)
#
# On the device the GPU check finds the folder in the repository root (or at
# TORCHVISION_WHEELS_DIR) when torchvision is not installed, and its `torchvision` step installs
# what is missing into /tmp/gpu_check_torchvision_site, which the later steps import from:
#
#     carry=[".torchvision_wheels"]
#     bash benchmarks/gpu_check.sh run1
#
# By hand instead:
#
#     bash benchmarks/torchvision_bundle.sh --install .torchvision_wheels /tmp/site
#     PYTHONPATH=/tmp/site python benchmarks/throughput.py --preset rn50
#
# TORCHVISION_VERSION and PILLOW_VERSION choose other releases when downloading (a torchvision
# release needs the torch its wheel names; --install refuses one that does not match).
set -euo pipefail

TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.26.0}
PILLOW_VERSION=${PILLOW_VERSION:-13.0.0}
PYTHON_VERSIONS=(3.11 3.12)
PYTHON=${PYTHON:-python}

if [[ "${1:-}" == "--install" ]]; then
  wheels=$(cd "${2:?usage: torchvision_bundle.sh --install WHEELS_DIR TARGET}" && pwd)
  target=${3:?usage: torchvision_bundle.sh --install WHEELS_DIR TARGET}
  # Installed and checked beside the target, copied into it only when it imports: a folder on
  # someone's PYTHONPATH never holds a torchvision that cannot.
  staging=$(mktemp -d "${target%/}.staging.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  wanted=(torchvision)  # the release the folder holds; checked against this torch below
  # Pillow only where it is missing: an installed one stays in charge.
  "$PYTHON" -c "import PIL" 2>/dev/null || wanted+=(pillow)
  # --find-links picks the wheel built for this interpreter; --no-deps keeps the installed torch.
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$wheels" --target "$staging" "${wanted[@]}"
  PYTHONPATH="$staging${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$target" <<'PY'
import importlib.metadata as md, re, sys
import torch

# Checked before the import: a torchvision built for another torch fails inside its own import.
needs = [r for r in md.requires("torchvision") or [] if re.match(r"torch\b", r)]
pinned = re.search(r"==\s*([\w.]+)", needs[0]) if needs else None
have = torch.__version__.split("+")[0]
if pinned and pinned.group(1) != have:
    sys.exit(f"torchvision {md.version('torchvision')} is built for torch {pinned.group(1)}, this machine has "
             f"torch {have}: rebuild the bundle with TORCHVISION_VERSION set to the release for torch {have}")
import torchvision

print(f"torchvision {torchvision.__version__} installed into {sys.argv[1]} (for torch {have})")
PY
  mkdir -p "$target"
  cp -a "$staging"/. "$target"/
  exit 0
fi

out=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)/.torchvision_wheels}
rm -rf "$out"
mkdir -p "$out"
for version in "${PYTHON_VERSIONS[@]}"; do
  abi=cp${version/./}
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp --abi "$abi" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$out" "torchvision==$TORCHVISION_VERSION" "pillow==$PILLOW_VERSION"
done
ls -l "$out"
