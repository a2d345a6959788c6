"""Does the compiled ring loss overlap its ppermutes with the block matmuls? (issue 15.4)

  python benchmarks/ring_overlap_check.py [--kind softmax_ring] [--batch 4096] [--dim 512]

Compiles value_and_grad of `clip_jax.losses.contrastive_loss` (a ring kind) over every device of
the default backend and reads the scheduled HLO of each ring step (a while-loop body with
collective-permutes). Where collectives are asynchronous (GPUs, TPUs) a step overlaps when a
collective-permute-start comes before the step's first matmul and its -done after it; the script
prints each body's order and 'overlap: yes/no'. XLA:CPU's collectives are synchronous (no start/done
pairs): it says so and exits 0; tests/test_losses.py checks the independence that allows the overlap.
Exit code 1 when an asynchronous body does not overlap, 2 with fewer than 2 devices.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from clip_jax import losses  # noqa: E402

# What a matmul looks like in scheduled HLO: a dot, a fusion around one, or a library call (cuBLAS).
MATMUL = re.compile(r"= \S+ (dot|convolution)\(|custom_call_target=\"__cublas|\"__onednn\$matmul|kind=kOutput|"
                    r"fusion\(.*calls=%\S*(dot|gemm)")


def while_bodies(hlo: str) -> dict[str, list[str]]:
  """name -> instruction lines of every computation used as a while body."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  bodies, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1) if header.group(1) in names else None
      if current:
        bodies[current] = []
    elif current and line.strip() == "}":
      current = None
    elif current:
      bodies[current].append(line.strip())
  return bodies


def overlap_report(hlo: str) -> list[tuple[str, str, bool | None]]:
  """For each ring body: (name, order summary, overlaps) with overlaps None when synchronous."""
  report = []
  for name, lines in while_bodies(hlo).items():
    kinds = []
    for line in lines:
      if "collective-permute-start" in line:
        kinds.append("start")
      elif "collective-permute-done" in line:
        kinds.append("done")
      elif "collective-permute(" in line:
        kinds.append("permute")
      elif MATMUL.search(line):
        kinds.append("matmul")
    if not any(k in ("start", "permute") for k in kinds):
      continue
    order = " ".join(k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1])
    if "start" not in kinds:
      report.append((name, order, None))
      continue
    first_matmul = kinds.index("matmul") if "matmul" in kinds else None
    overlaps = (first_matmul is not None and kinds.index("start") < first_matmul
                and len(kinds) - 1 - kinds[::-1].index("done") > first_matmul)
    report.append((name, order, overlaps))
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kind", choices=("sigmoid", "softmax_ring"), default="softmax_ring")
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=512)
  args = parser.parse_args(argv)
  devices = jax.devices()
  if len(devices) < 2:
    print(f"ring overlap: needs 2 or more devices, this {jax.default_backend()} backend has {len(devices)}: skipped")
    return 2
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
  emb = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  loss = lambda *a: losses.contrastive_loss(*a, kind=args.kind, mesh=mesh, batch_axes=("data",))  # noqa: E731
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile().as_text()
  report = overlap_report(hlo)
  print(f"ring overlap ({args.kind}, {len(devices)} x {jax.default_backend()}, B={args.batch}, d={args.dim}):")
  for name, order, overlaps in report:
    verdict = {None: "synchronous collectives (no start/done on this backend)", True: "yes", False: "NO"}[overlaps]
    print(f"  {name}: {order}  -> overlap: {verdict}")
  if not report:
    print("  no ring body found")
    return 1
  return 1 if any(o is False for _, _, o in report) else 0


if __name__ == "__main__":
  sys.exit(main())
