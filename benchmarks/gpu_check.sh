#!/usr/bin/env bash
# The accelerator checks of issue 15, in one go (< 10 minutes on one H100/H200-class GPU):
#   0. attention: the form 'auto' picks (cuDNN fused attention for bf16 on GPU) against XLA's, on the
#      benchmarks' shapes: errors vs an f32 reference and fwd+bwd time (benchmarks/attention_check.py)
#   1. CLIP ViT-B-16 train step, images/s and MFU: ours (bf16, cuDNN attention) vs open_clip (amp bf16)
#   2. SD 1.5 UNet fwd+bwd (64x64 latents = 512 px, batch 8): ours bf16 vs diffusers bf16 autocast,
#      step time and device peak memory, then two traced steps of each: our kernels by category
#      (benchmarks/profile_summary.py) and diffusers' device time
#   3. contrastive loss memory per device at large global batch (XLA:GPU's buffer assignment)
#   4. with 2+ GPUs: the ring loss's collective-permute-start/-done around the block matmuls
# and writes gpu.md (the sections' tables, each section's status, the versions, nvidia-smi's GPU).
# Each section runs under `timeout` (a slow one cannot eat the others' time), writes its own file
# as soon as it ends, and gpu.md is rewritten after every section, so a run cut short still leaves
# what it measured. If the attention check fails (not on a timeout), the benchmarks run with
# --attention xla (said so).
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine (jax[cuda] + torch with CUDA)
#   bash benchmarks/gpu_check.sh --dry-run    # on any machine: the same steps at toy sizes on the CPU
# Environment:
#   PYTHON=...            the interpreter (default .venv/bin/python, else python3)
#   GPU_CHECK_OUT=DIR     where gpu.md and the sections' files go (default: gpu.md into
#                         benchmarks/results, the sections' files into a temporary folder; dry run:
#                         all into $DRY_OUT, default /tmp/gpu_check_dry)
#   GPU_CHECK_LIMITS="A T U L R"  seconds for the attention, train, UNet, loss and ring sections
#                         (default "100 200 200 50 40": 610 s with the probes at most; on an H200 on
#                         2026-11-30 they took about 90, 156, 86 + 45, 15 and 0 s: one GPU, ring skipped;
#                         the UNet section with its two traced steps per variant, ~120-145 s;
#                         --dry-run: "200 400 900 200 100")
set -uo pipefail   # no -e: a failed section is recorded and the next one runs
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DEFAULT_LIMITS="100 200 200 50 40"
[ $DRY = 1 ] && DEFAULT_LIMITS="200 400 900 200 100"   # a 2-core CPU compiles the toy UNets for minutes
read -r LIMIT_ATTN LIMIT_TRAIN LIMIT_UNET LIMIT_LOSS LIMIT_RING <<< "${GPU_CHECK_LIMITS:-$DEFAULT_LIMITS}"

if [ $DRY = 1 ]; then
  OUT_DIR=${GPU_CHECK_OUT:-${DRY_OUT:-/tmp/gpu_check_dry}}
  SECTIONS=$OUT_DIR
  DEVICE=cpu
  ATTN_ARGS="--sizes toy --repeats 2"
  TRAIN_ARGS="--model ViT-Tiny --batch 4 --steps 1 --warmup 1 --runs jax_bf16"
  UNET_ARGS="--unet tiny --size 8 --batch 1 --steps 1 --warmup 1 --variants jax_bf16,jax_bf16_remat,torch_bf16"
  LOSS_ARGS="--batches 64,128 --dim 16 --devices 4"
  LOSS_ENV="JAX_PLATFORMS=cpu"
  export XLA_FLAGS="--xla_force_host_platform_device_count=4"   # the ring check's 4 "devices"
  RING_ENV="JAX_PLATFORMS=cpu"
  RING_ARGS="--batch 64 --dim 16"
else
  OUT_DIR=${GPU_CHECK_OUT:-benchmarks/results}
  SECTIONS=${GPU_CHECK_OUT:-}
  DEVICE=gpu
  ATTN_ARGS="--sizes gpu --repeats 5"
  # ViT-B-16 at batch 256: 2 warm-up + 10 timed steps each; open_clip needs no compile.
  TRAIN_ARGS="--model ViT-B-16 --batch 256 --steps 10 --warmup 2 --runs jax_bf16,torch_bf16"
  UNET_ARGS="--unet sd15 --size 64 --batch 8 --steps 5 --warmup 2 --variants jax_bf16,torch_bf16"
  # Compiled only, never run. One GPU: b = B, so [B, B] fp32 is 16 GiB at 65,536 (autotuning off:
  # it would run each matmul on buffers of that size, and memory analysis does not depend on it).
  LOSS_ARGS="--batches 16384,65536 --dim 512 --devices 8"
  LOSS_ENV="JAX_PLATFORMS=cuda XLA_FLAGS=--xla_gpu_autotune_level=0"
  RING_ENV="JAX_PLATFORMS=cuda"
  RING_ARGS=""
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
    echo "error: jax sees no GPU here; install the GPU extra (pip install '.[gpu]') or use --dry-run" >&2
    exit 2
  fi
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: torch sees no CUDA device (the open_clip / diffusers side needs one)" >&2; exit 2; }
fi
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
[ -n "$SECTIONS" ] || SECTIONS=$WORK
mkdir -p "$SECTIONS"
start=$(date +%s)
export PYTHONUNBUFFERED=1

echo "== $(date -u '+%H:%M:%S') start ($PY)"
# What ran where: GPU, driver, packages (also in the log).
GPU_NAME=$( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
             || echo "no GPU: CPU dry run at toy sizes") | head -1)
VERSIONS=$("$PY" - <<'PYEOF' 2>&1 | tail -1
import importlib.metadata as m, platform
import jax
names = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch",
         "open_clip_torch", "diffusers", "transformers", "timm"]
found = []
for n in names:
  try:
    found.append(f"{n} {m.version(n)}")
  except m.PackageNotFoundError:
    pass
extra = ""
try:
  import torch
  if torch.cuda.is_available():
    extra = f", torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
except ImportError:
  pass
print(f"Python {platform.python_version()}; " + ", ".join(found) + f"; jax backend {jax.default_backend()} "
      f"({len(jax.devices())} x {jax.devices()[0].device_kind}){extra}")
PYEOF
)
echo "GPU: $GPU_NAME"
echo "versions: $VERSIONS"
N_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)

declare -A STATUS
# section NAME LIMIT_S command...: runs one section under `timeout` and records how it ended.
section() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit $limit s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) STATUS[$name]="ok, $(( $(date +%s) - t0 )) s" ;;
    124|137) STATUS[$name]="**timed out** after $limit s (the limit of this section)" ;;
    *) STATUS[$name]="**failed** (exit code $rc) after $(( $(date +%s) - t0 )) s: see the log" ;;
  esac
  echo "== $name: ${STATUS[$name]}"
  write_report
  return $rc
}

# A section's table, its first two lines (title, blank) dropped, or a note that it has none.
body() { if [ -s "$1" ]; then sed '1,2d' "$1"; else echo "(no table: ${STATUS[$2]:-not run})"; fi; }

write_report() {
  {
    echo "# Accelerator check (benchmarks/gpu_check.sh$([ $DRY = 1 ] && echo ' --dry-run'))"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') in $(( $(date +%s) - start )) s so far on: $GPU_NAME."
    echo "$VERSIONS."
    [ $DRY = 1 ] && echo && echo "**Dry run: toy sizes on the CPU, to check the script; no number here is a GPU measurement.**"
    echo
    echo "| section | status |"
    echo "|---|---|"
    for name in attention train unet loss ring; do echo "| $name | ${STATUS[$name]:-not run} |"; done
    echo
    echo "## 0. Attention: what 'auto' picks vs XLA's form"; echo
    if [ -s "$SECTIONS/attention.md" ]; then cat "$SECTIONS/attention.md"; else echo "(no table: ${STATUS[attention]:-not run})"; fi; echo
    echo "## 1. CLIP train step"; echo; body "$SECTIONS/train.md" train; echo
    echo "## 2. SD UNet train step"; echo; body "$SECTIONS/unet.md" unet; echo
    if [ -s "$SECTIONS/unet_profile.md" ]; then
      echo "### Our UNet step's device time (\`benchmarks/profile_summary.py\`, 2 traced steps)"; echo
      cat "$SECTIONS/unet_profile.md"; echo
    fi
    echo "## 3. Contrastive loss memory"; echo; body "$SECTIONS/loss.md" loss; echo
    echo "## 4. Ring loss: ppermute overlap (${STATUS[ring]:-not run})"
    echo; echo '```'; grep -v '^== ' "$SECTIONS/ring.txt" 2>/dev/null; echo '```'
  } > "$OUT_DIR/gpu.md.tmp" && mv "$OUT_DIR/gpu.md.tmp" "$OUT_DIR/gpu.md"
}

ATTENTION=auto
section attention "$LIMIT_ATTN" "$PY" benchmarks/attention_check.py $ATTN_ARGS --out "$SECTIONS/attention.md"
attn_rc=$?
if [ $attn_rc != 0 ] && [ $attn_rc != 124 ] && [ $attn_rc != 137 ]; then  # a timeout proves nothing wrong
  ATTENTION=xla
  STATUS[attention]+="; the benchmarks below ran with --attention xla"
fi
section train "$LIMIT_TRAIN" "$PY" benchmarks/bench_train_step.py $TRAIN_ARGS --device $DEVICE \
  --attention $ATTENTION --out "$SECTIONS/train.md"
# On the GPU the UNet section also traces two steps of each variant into $SECTIONS/profile (kept
# with GPU_CHECK_OUT): the kind of trace that showed our bf16 convs running as f32/TF32 kernels.
PROFILE_ARGS=""
[ $DRY = 0 ] && PROFILE_ARGS="--profile $SECTIONS/profile"
section unet "$LIMIT_UNET" "$PY" benchmarks/bench_unet_step.py $UNET_ARGS --device $DEVICE \
  --attention $ATTENTION --out "$SECTIONS/unet.md" $PROFILE_ARGS
if [ $DRY = 0 ] && [ -s "$SECTIONS/profile/jax_bf16.xplane.pb" ]; then
  # Our kernels per step by category, and diffusers' device time per step beside them.
  timeout -k 5 60 "$PY" benchmarks/profile_summary.py "$SECTIONS/profile/jax_bf16.xplane.pb" --top 12 \
    --torch-ops "$SECTIONS/profile/torch_bf16_ops.txt" > "$SECTIONS/unet_profile.md" 2>&1
  write_report
fi
section loss "$LIMIT_LOSS" env $LOSS_ENV "$PY" benchmarks/bench_loss_memory.py $LOSS_ARGS --platform $DEVICE \
  --out "$SECTIONS/loss.md" --plot "$WORK/loss.png"
if [ $DRY = 0 ] && [ "${N_GPUS:-0}" -lt 2 ]; then
  echo "ring overlap: needs 2 or more GPUs, this machine has ${N_GPUS:-0}: skipped" > "$SECTIONS/ring.txt"
  STATUS[ring]="skipped: one GPU (the overlap needs 2+ devices)"
  cat "$SECTIONS/ring.txt"
else
  section ring "$LIMIT_RING" env $RING_ENV "$PY" benchmarks/ring_overlap_check.py $RING_ARGS > "$SECTIONS/ring.txt" 2>&1
  ring_rc=$?
  cat "$SECTIONS/ring.txt"
  [ $ring_rc = 1 ] && STATUS[ring]="**no overlap** (exit code 1): see below"
  [ $ring_rc = 2 ] && STATUS[ring]="skipped: fewer than 2 devices"
fi
write_report
echo "wrote $OUT_DIR/gpu.md in $(( $(date +%s) - start )) s"
