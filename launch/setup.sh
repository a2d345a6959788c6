#!/usr/bin/env bash
# Creates .venv (Python 3.11 or 3.12), installs the pinned requirements, then this checkout itself as an
# editable package (no dependencies: the pins above are the ones used), so `import clip_jax` and the
# `clip-jax-train`-style commands work from any directory.
#   bash launch/setup.sh          # runtime only
#   bash launch/setup.sh --test   # plus the test runner and the PyTorch reference packages
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
  # libtpu, the TPU compiler jax's [tpu] extra pins: benchmarks/ring_overlap_check.py --tpu-topology compiles
  # for TPU slices with it on this CPU (tests/test_losses.py). Kept in .venv/libtpu, outside the packages:
  # there, jax would look for a TPU at every import.
  # The pin, printed only when .venv/libtpu does not already hold a version it accepts.
  LIBTPU="$(.venv/bin/python - <<'EOF'
import importlib.metadata as m
from packaging.requirements import Requirement
pin = next(Requirement(r.split(";")[0]) for r in m.requires("jax") if r.startswith("libtpu"))
if not any(pin.specifier.contains(d.version) for d in m.distributions(name="libtpu", path=[".venv/libtpu"])):
  print(pin)
EOF
)"
  if [ -n "$LIBTPU" ]; then
    rm -rf .venv/libtpu
    .venv/bin/python -m pip install --quiet --no-deps --target .venv/libtpu "$LIBTPU"
  fi
  # jax's CUDA plugin of the same version with CUDA 13.0's ptxas and libdevice (~650 MB; no driver, no
  # CUDA runtime libraries): ring_overlap_check.py --gpu-topology compiles for GPU hosts with them on this CPU
  # (tests/test_losses.py). In .venv/cuda-aot, outside the packages for the same reason as libtpu.
  # The pins, printed only when .venv/cuda-aot does not hold them.
  CUDA_AOT="$(.venv/bin/python - <<'EOF'
import importlib.metadata as m
version = m.version("jax")
wanted = [f"jax-cuda13-plugin=={version}", f"jax-cuda13-pjrt=={version}", "nvidia-cuda-nvcc==13.0.88",
          "nvidia-nvvm==13.0.88"]
held = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in m.distributions(path=[".venv/cuda-aot"])}
if any(held.get(name) != pin for name, pin in (w.split("==") for w in wanted)):
  print(" ".join(wanted))
EOF
)"
  if [ -n "$CUDA_AOT" ]; then
    rm -rf .venv/cuda-aot
    # shellcheck disable=SC2086  # several requirement specifiers
    .venv/bin/python -m pip install --quiet --no-deps --target .venv/cuda-aot $CUDA_AOT
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps -e .  # ignore: setuptools warns about editable installs
