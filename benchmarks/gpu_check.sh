#!/usr/bin/env bash
# The accelerator checks of issue 15, in one go (< 10 minutes on one H100/H200-class GPU):
#   1. CLIP ViT-B-16 train step, images/s and MFU: ours (bf16, cuDNN attention) vs open_clip (amp bf16)
#   2. SD 1.5 UNet fwd+bwd (64x64 latents = 512 px, batch 8): ours bf16 vs diffusers bf16 autocast,
#      step time and device peak memory
#   3. contrastive loss memory per device at large global batch (XLA:GPU's buffer assignment)
#   4. with 2+ GPUs: the ring loss's collective-permute-start/-done around the block matmuls
# and writes benchmarks/results/gpu.md (the sections' tables, the commands, nvidia-smi's GPU name).
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine (jax[cuda] + torch with CUDA)
#   bash benchmarks/gpu_check.sh --dry-run    # on any machine: the same steps at toy sizes on the
#                                             # CPU, written to $DRY_OUT (default /tmp/gpu_check_dry)
# PYTHON=... picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ $DRY = 1 ]; then
  OUT_DIR=${DRY_OUT:-/tmp/gpu_check_dry}
  DEVICE=cpu
  TRAIN_ARGS="--model ViT-Tiny --batch 4 --steps 1 --warmup 1 --runs jax_bf16"
  UNET_ARGS="--unet tiny --size 8 --batch 1 --steps 1 --warmup 1"
  LOSS_ARGS="--batches 64,128 --dim 16 --devices 4"
  export XLA_FLAGS="--xla_force_host_platform_device_count=4"   # the ring check's 4 "devices"
  RING_ENV="JAX_PLATFORMS=cpu"
else
  OUT_DIR=benchmarks/results
  DEVICE=gpu
  # ViT-B-16 at batch 256: 2 warm-up + 10 timed steps each; open_clip needs no compile.
  TRAIN_ARGS="--model ViT-B-16 --batch 256 --steps 10 --warmup 2 --runs jax_bf16,torch_bf16"
  UNET_ARGS="--unet sd15 --size 64 --batch 8 --steps 5 --warmup 2"
  LOSS_ARGS="--batches 16384,65536,262144 --dim 512 --devices 8"
  RING_ENV="JAX_PLATFORMS=cuda"
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
start=$(date +%s)

echo "== 1/4 train step ($TRAIN_ARGS)"
"$PY" benchmarks/bench_train_step.py $TRAIN_ARGS --device $DEVICE --out "$WORK/train.md"
echo "== 2/4 UNet step ($UNET_ARGS)"
VARIANTS=jax_bf16,torch_bf16
[ $DRY = 1 ] && VARIANTS=jax_bf16,jax_bf16_remat,torch_bf16
"$PY" benchmarks/bench_unet_step.py $UNET_ARGS --variants $VARIANTS --device $DEVICE --out "$WORK/unet.md"
echo "== 3/4 loss memory ($LOSS_ARGS)"
"$PY" benchmarks/bench_loss_memory.py $LOSS_ARGS --platform $DEVICE --out "$WORK/loss.md" --plot "$WORK/loss.png"
echo "== 4/4 ring overlap"
set +e
env $RING_ENV "$PY" benchmarks/ring_overlap_check.py $([ $DRY = 1 ] && echo "--batch 64 --dim 16") > "$WORK/ring.txt" 2>&1
ring_rc=$?
set -e
cat "$WORK/ring.txt"

{
  echo "# Accelerator check (benchmarks/gpu_check.sh$([ $DRY = 1 ] && echo ' --dry-run'))"
  echo
  echo "Run $(date '+%Y-%m-%d %H:%M') in $(( $(date +%s) - start )) s on: $( (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: CPU dry run at toy sizes") | head -1)."
  echo "jax $("$PY" -c 'import jax; print(jax.__version__, jax.default_backend())'), $("$PY" -c 'import torch; print("torch", torch.__version__)')."
  [ $DRY = 1 ] && echo && echo "**Dry run: toy sizes on the CPU, to check the script; no number here is a GPU measurement.**"
  echo
  echo "## 1. CLIP train step"; echo; sed '1,2d' "$WORK/train.md"; echo
  echo "## 2. SD UNet train step"; echo; sed '1,2d' "$WORK/unet.md"; echo
  echo "## 3. Contrastive loss memory"; echo; sed '1,2d' "$WORK/loss.md"; echo
  echo "## 4. Ring loss: ppermute overlap (exit code $ring_rc: 0 overlap or synchronous, 1 no overlap, 2 one device)"
  echo; echo '```'; cat "$WORK/ring.txt"; echo '```'
} > "$OUT_DIR/gpu.md"
echo "wrote $OUT_DIR/gpu.md in $(( $(date +%s) - start )) s"
