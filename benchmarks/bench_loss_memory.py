"""Per-device memory of the contrastive loss and its gradient, against the global batch.

  python benchmarks/bench_loss_memory.py [--batches 1024,...,65536] [--dim 512] [--devices 8]
      [--out benchmarks/results/loss_memory.md] [--plot benchmarks/results/loss_memory.png]

Every program is compiled, never run, for `--devices` simulated CPU devices, and the numbers are
XLA's own buffer assignment (`jax.jit(...).lower(...).compile().memory_analysis()`): the
`temp_size_in_bytes` of one device's program, i.e. everything the loss allocates beyond its
inputs and outputs. The embeddings are fp32 `[B, d]` split over one 'data' axis (b = B / N).

Compared, each as `jax.value_and_grad` over both embeddings, the scale and the bias (the training
step's cost), and as the forward pass alone:
  naive         the full [B, B] matrix on one device (`naive_softmax_loss`)
  softmax       all-gathered embeddings, this device's [b, B] rows and columns
  sigmoid       ring of ppermutes, [b, b] blocks, custom_vjp backward ring
  softmax_ring  the CLIP loss over the same ring with running log-sum-exps
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="1024,2048,4096,8192,16384,32768,65536",
                      help="comma-separated global batch sizes (multiples of --devices)")
  parser.add_argument("--dim", type=int, default=512, help="embedding width d")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices, N (gpu: at most the GPUs)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                      help="cpu: N simulated devices; gpu: the machine's GPUs (XLA:GPU's buffer assignment)")
  parser.add_argument("--out", default="benchmarks/results/loss_memory.md")
  parser.add_argument("--plot", default="benchmarks/results/loss_memory.png")
  return parser.parse_args()


ARGS = _parse_args()
# Before jax is imported: the device count is fixed when the CPU backend starts.
if ARGS.platform == "cpu":
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu" if ARGS.platform == "cpu" else "cuda")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from clip_jax import losses  # noqa: E402

MIB = 2 ** 20
KINDS = ("naive",) + losses.LOSS_KINDS


def compiled_temp_bytes(kind: str, batch: int, dim: int, mesh) -> dict[str, int]:
  """Temp bytes per device of the forward pass and of value_and_grad, compiled only."""
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  if kind == "naive":
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    loss = lambda image, text, scale, bias: losses.naive_softmax_loss(image, text, scale)
  else:
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    loss = lambda image, text, scale, bias: losses.contrastive_loss(
        image, text, scale, bias, kind=kind, mesh=mesh, batch_axes=("data",))
  programs = {"forward": loss, "grad": jax.value_and_grad(loss, argnums=(0, 1, 2, 3))}
  return {name: jax.jit(fn).lower(emb, emb, scalar, scalar).compile().memory_analysis()
          .temp_size_in_bytes for name, fn in programs.items()}


def write_table(results, batches, dim, devices, path, command, seconds):
  lines = [
      "# Contrastive loss: per-device memory against global batch",
      "",
      f"Command: `{command}`",
      "",
      f"jax {jax.__version__}, {devices} {'simulated CPU devices (XLA CPU)' if ARGS.platform == 'cpu' else 'GPUs (XLA GPU)'}, d = {dim}, fp32, "
      "batch split over one mesh axis (b = B / N). Compiled only, never run "
      f"({seconds:.0f} s for all programs). Numbers are XLA's buffer assignment for one "
      "device's program, `compile().memory_analysis().temp_size_in_bytes`: memory the loss "
      "allocates beyond its inputs and outputs. 'naive' is the full matrix on one device.",
      "",
      "## Loss + gradient (value_and_grad w.r.t. both embeddings, scale, bias), MiB per device",
      "",
      "| B | b | [b, b] fp32 | [b, B] fp32 | [B, B] fp32 "
      "| naive | softmax | sigmoid | softmax_ring |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]

  def row(program):
    for batch in batches:
      local = batch // devices
      sizes = [local * local * 4, local * batch * 4, batch * batch * 4]
      cells = [f"{size / MIB:,.1f}" for size in sizes]
      cells += [f"{results[kind, batch][program] / MIB:,.1f}" for kind in KINDS]
      lines.append(f"| {batch:,} | {local:,} | " + " | ".join(cells) + " |")

  row("grad")
  lines += ["", "## Forward pass only, MiB per device", "",
            lines[-len(batches) - 2], lines[-len(batches) - 1]]
  row("forward")
  largest = batches[-1]
  ratio = lambda kind: results["softmax", largest]["grad"] / results[kind, largest]["grad"]
  lines += [
      "",
      "## Reading",
      "",
      f"- At B = {largest:,}, loss + gradient: softmax (all-gather) needs "
      f"{ratio('softmax_ring'):.0f}x the temp memory of softmax_ring and "
      f"{ratio('sigmoid'):.0f}x that of sigmoid; naive needs "
      f"{results['naive', largest]['grad'] / results['softmax', largest]['grad']:.1f}x softmax.",
      "- naive grows as B^2 and softmax as b*B (a few [b, B] arrays: both directions' logits "
      "and their softmaxes are kept for the backward pass). The rings grow as b^2: their "
      "gradient is a second ring (custom_vjp) that recomputes each [b, b] block, so the "
      "backward pass holds about three [b, b] arrays and no per-step residuals.",
      "- With N devices the ring's saving over all-gather softmax is about N-fold on top of the "
      "constant factors, so it widens with the device count.",
      "- Why a custom_vjp: an earlier version differentiated the ring with autodiff, its body "
      "under jax.checkpoint. Measured the same way at B = 16,384 (d = 512, 8 devices) its "
      "loss + gradient took 128 MiB (softmax_ring) and 88 MiB (sigmoid), against 48 and 52 MiB "
      "now: the scan kept every step's text chunk ([B, d] in all) and the backward block "
      "needed more [b, b] temporaries: 128 MiB is a whole [b, B] array.",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(results, batches, dim, devices, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for kind, marker in zip(KINDS, "osv^"):
    axes.plot(batches, [results[kind, batch]["grad"] / MIB for batch in batches],
              marker=marker, label=kind)
  axes.plot(batches, [(batch // devices) * batch * 4 / MIB for batch in batches], "k:",
            label="one [b, B] fp32 array")
  axes.plot(batches, [(batch // devices) ** 2 * 4 / MIB for batch in batches], "k--",
            label="one [b, b] fp32 array")
  axes.set_xscale("log", base=2)
  axes.set_yscale("log")
  axes.set_xlabel("global batch B")
  axes.set_ylabel("temp memory per device (MiB)")
  axes.set_title(f"Contrastive loss + gradient, d={dim}, {devices} devices (compiled, XLA {ARGS.platform.upper()})")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main():
  if ARGS.platform == "gpu":
    ARGS.devices = min(ARGS.devices, len(jax.devices()))
  batches = [int(batch) for batch in ARGS.batches.split(",")]
  if any(batch % ARGS.devices for batch in batches):
    raise SystemExit(f"Every batch size must be a multiple of --devices={ARGS.devices}.")
  mesh = jax.make_mesh((ARGS.devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:ARGS.devices])
  start = time.perf_counter()
  results = {}
  for batch in batches:
    for kind in KINDS:
      results[kind, batch] = compiled_temp_bytes(kind, batch, ARGS.dim, mesh)
      print(f"B={batch:>6} {kind:>12}: forward {results[kind, batch]['forward'] / MIB:10.1f} MiB"
            f"  loss+grad {results[kind, batch]['grad'] / MIB:10.1f} MiB", flush=True)
  seconds = time.perf_counter() - start
  command = "python benchmarks/bench_loss_memory.py " + " ".join(sys.argv[1:])
  write_table(results, batches, ARGS.dim, ARGS.devices, ARGS.out, command.strip(), seconds)
  write_plot(results, batches, ARGS.dim, ARGS.devices, ARGS.plot)
  print(f"Wrote {ARGS.out} and {ARGS.plot}")


if __name__ == "__main__":
  main()
