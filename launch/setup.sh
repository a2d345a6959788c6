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
  LIBTPU="$(.venv/bin/python -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')"
  if ! .venv/bin/python -c 'import sys, glob, re; v = sys.argv[1].split("==")[1].rstrip("*").rstrip("."); sys.exit(not any(re.search(r"libtpu-" + re.escape(v) + r"[.\d]*\.dist-info$", d) for d in glob.glob(".venv/libtpu/libtpu-*.dist-info")))' "$LIBTPU"; then
    rm -rf .venv/libtpu
    .venv/bin/python -m pip install --quiet --no-deps --target .venv/libtpu "$LIBTPU"
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps -e .  # ignore: setuptools warns about editable installs
