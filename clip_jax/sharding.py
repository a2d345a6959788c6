"""One mesh, logical axis rules, and the shardings derived from them.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'vocab', 'conv_out', ...);
a rules table, kept in the config, maps those names to the mesh axes ('data', 'fsdp', 'tensor').
Everything else here turns (abstract tree, rules, mesh) into NamedShardings.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that is not tensor-parallel.
BATCH_AXES = ("data", "fsdp")

# Parameters: FSDP shards the embedding dimension, tensor parallelism the wide ones.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
)


def create_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices of all processes; one axis size may be -1 (fills the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"Mesh shape needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"there are {len(devices)}.")
  # Auto axes: sharding propagates through jit from the declared in/out shardings.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (a 16-channel conv on a 3-way axis stays whole)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(None if not names or dim % size else (names if len(names) > 1 else names[0]))
  return P(*fitted)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays; unboxed leaves
  (scalars, batch statistics without names) are replicated."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shard_like_params(tree: Any, params_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path (Adam's mu
  and nu, also inside masked or multi-transform states) and has its shape is sharded like that
  parameter; everything else (step counts) is replicated."""
  by_path = {}
  for (path, leaf), sharding_ in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                                     jax.tree.leaves(params_shardings)):
    by_path[_key_names(path)] = (tuple(leaf.shape), sharding_)
  replicated = NamedSharding(mesh, P())

  def choose(path, leaf):
    names = _key_names(path)
    for start in range(len(names)):
      match = by_path.get(names[start:])
      if match is not None and match[0] == tuple(getattr(leaf, "shape", ())):
        return match[1]
    return replicated
  return jax.tree_util.tree_map_with_path(choose, tree)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(batch_axes)))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (which returns logically boxed leaves) directly into its shardings, so
  nothing larger than a device's share is materialised anywhere. Returns (unboxed tree, shardings)."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings
