r"""CPU collectives across local processes (gloo): all-reduce time before and after a reduce-scatter.

    python benchmarks/bench_multiprocess_cpu.py --num-processes=2 --devices-per-process=4
    python benchmarks/bench_multiprocess_cpu.py --num-processes=2 --devices-per-process=1

Starts the processes itself (through launch.local) and prints, from process 0, the seconds one
all-reduce (psum) of each size takes, first on fresh communicators, then after one small
reduce-scatter (psum_scatter) has run. This is what makes a data-parallel CLIP step slow in the
2 x 4 simulated multi-host setting: the contrastive loss's backward pass is a reduce-scatter, and
the replicated gradients' all-reduce (12.6 MB for ViT-Tiny's token embedding) follows it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES_MB = (0.25, 1.0, 4.0, 12.6)


def worker(coordinator: str, num_processes: int, process_id: int) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  jax.distributed.initialize(coordinator, num_processes, process_id, cluster_detection_method="deactivate")
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P("d"))
  all_reduce = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))
  reduce_scatter = jax.jit(jax.shard_map(lambda a: jax.lax.psum_scatter(jnp.tile(a, (n, 1)), "d", tiled=True),
                                         mesh=mesh, in_specs=P("d"), out_specs=P("d")))

  def timed(fn, x) -> float:
    jax.block_until_ready(fn(x))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    return time.perf_counter() - start

  def arrays():
    for mb in SIZES_MB:
      rows = int(mb * 1e6 / 4 / 64)
      yield mb, jax.jit(lambda: jnp.ones((n * rows, 64), jnp.float32), out_shardings=sharded)()

  before = {mb: timed(all_reduce, x) for mb, x in arrays()}
  timed(reduce_scatter, jax.jit(lambda: jnp.ones((n, 64), jnp.float32), out_shardings=sharded)())
  after = {mb: timed(all_reduce, x) for mb, x in arrays()}
  if process_id == 0:
    print(f"{num_processes} processes x {jax.local_device_count()} devices (gloo)")
    print("| all-reduce size | fresh | after one reduce-scatter |")
    print("| --- | --- | --- |")
    for mb in SIZES_MB:
      print(f"| {mb:g} MB | {before[mb]:.3f} s | {after[mb]:.3f} s |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=4)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # 'COORDINATOR,PROCESS_ID'
  args = p.parse_args()
  if args.worker:
    coordinator, process_id = args.worker.rsplit(",", 1)
    worker(coordinator, args.num_processes, int(process_id))
    return
  from launch import local
  port = local.free_port()
  children = []
  for i in range(args.num_processes):
    env = local.child_env(args.devices_per_process, "cpu")
    children.append(local.Child([sys.executable, os.path.abspath(__file__), f"--num-processes={args.num_processes}",
                                 f"--worker=localhost:{port},{i}"], env, f"process {i}"))
  sys.exit(local.supervise(children, grace_s=30))


if __name__ == "__main__":
  main()
