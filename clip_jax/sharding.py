"""One mesh, logical axis rules, and the shardings derived from them; the one owner of placement.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'vocab', 'conv_out', ...);
a rules table, kept in the config, maps those names to the mesh axes ('data', 'fsdp', 'tensor').
Everything else here turns (abstract tree, rules, mesh) into NamedShardings, decides which mesh
axes split a batch (`batch_axes`, asked by every trainer, evaluator and sampler) and places input
batches on the mesh (`place_local_batch`, `place_global_batch`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that is not tensor-parallel (ask `batch_axes(mesh)`).
BATCH_AXES = ("data", "fsdp")

# Parameters: FSDP shards the embedding dimension, tensor parallelism the wide ones.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
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


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[tuple[int, int, tuple[str, ...]]]]:
  """Keeps a dimension whole where its mesh axes do not divide it (a 16-channel conv on a 3-way
  axis). Returns (the spec, [(dim index, dim size, the axes not used)])."""
  fitted, unsplit = [], []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if names and dim % size:
      unsplit.append((i, dim, names))
    fitted.append(None if not names or dim % size else (names if len(names) > 1 else names[0]))
  return P(*fitted), unsplit


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays; unboxed leaves
  (scalars, batch statistics without names) are replicated. A dimension that its mesh axes do
  not divide stays whole on every device, and is reported in one WARNING line (it costs memory)."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  unsplit: list[str] = []

  def fit(path, spec, x):
    fitted, dropped = _fit_spec(spec, x.shape, mesh)
    unsplit.extend(f"{_path_name(path)}[dim {i}: {dim} over {'x'.join(names)}]" for i, dim, names in dropped)
    return NamedSharding(mesh, fitted)
  out = jax.tree_util.tree_map_with_path(fit, mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))
  if unsplit:
    logging.warning("%d parameter axes do not divide over their mesh axes %s and stay whole (replicated) on "
                    "every device: %s%s", len(unsplit), dict(mesh.shape), ", ".join(unsplit[:4]),
                    f" and {len(unsplit) - 4} more" if len(unsplit) > 4 else "")
  return out


def _path_name(path) -> str:
  return "/".join(_key_names(path))


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


# ----------------------------------------------------------------------------- batches
def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch's leading dimension is split over: the mesh's BATCH_AXES of size > 1
  (the first of them when all have size 1); a mesh without any (a custom one) splits over all."""
  present = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
  if not present:
    return tuple(mesh.axis_names)
  return tuple(a for a in present if mesh.shape[a] > 1) or present[:1]


def batch_ways(mesh: Mesh) -> int:
  """How many pieces a batch is split into: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading dimension over `batch_axes(mesh)`, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch_size(rows: int, mesh: Mesh, what: str = "a batch") -> None:
  """Raises ValueError unless `rows` splits evenly over the mesh's batch axes."""
  ways = batch_ways(mesh)
  if rows % ways:
    raise ValueError(f"{what} of {rows} does not split over the mesh's {ways}-way batch axes "
                     f"{batch_axes(mesh)} (mesh {dict(mesh.shape)}); use a multiple of {ways} or another mesh.")


def splits_evenly(rows: int, mesh: Mesh) -> bool:
  """Whether `rows` split evenly over the mesh's batch axes."""
  return rows % batch_ways(mesh) == 0


def put_global(tree: Any, shardings: Any) -> Any:
  """Host values (numpy, or arrays on one device), identical on every process -> global arrays in
  `shardings`; each process copies only the pieces its devices hold (works with several processes,
  where device_put of a local array onto other processes' devices does not)."""
  def put(x, sharding_):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def place_local_batch(local_batch: Any, mesh: Mesh, axes: Sequence[str] | None = None) -> Any:
  """Per-process numpy rows -> global jax.Arrays split over the batch axes (or `axes`). Each
  process passes its own rows (leading dim = global batch / process_count), e.g. from its own
  input pipeline."""
  sharding_ = batch_sharding(mesh) if axes is None else NamedSharding(mesh, P(tuple(axes)))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding_, np.asarray(x)), local_batch)


def place_global_batch(global_batch: Any, mesh: Mesh, split: bool = True) -> Any:
  """The whole batch, identical on every process (e.g. a pure function of the step) -> global
  jax.Arrays split over the batch axes (split=False: replicated, for a batch too small to split;
  see `splits_evenly`); each process copies only the rows its devices hold, so the result does not
  depend on how many processes there are."""
  sharding_ = batch_sharding(mesh) if split else NamedSharding(mesh, P())

  def place(x):
    x = np.asarray(x)
    if split:
      check_batch_size(x.shape[0], mesh)
    return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])
  return jax.tree.map(place, global_batch)


def to_host(x: Any) -> Any:
  """A (tree of) jax.Array as numpy on every process, also when other processes hold parts of it
  (then gathered: a collective every process must enter)."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))
  return jax.tree.map(get, x)


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] where micro-batch i takes rows i, i+k, i+2k, ...: every device keeps
  its own rows (each holds a contiguous block of the batch), so no data moves."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: Any) -> Any:
  """Inverse of `split_microbatches`: [k, B/k, ...] -> [B, ...] in the original row order (numpy
  or jax; on the host it lays out k micro-batches so that `split_microbatches` finds them)."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def auto_mesh(mesh: Mesh) -> Mesh:
  """`mesh` with every axis Auto (same devices, names and shape): code written for Auto axes
  (`create_mesh`) then runs on a mesh made with `jax.make_mesh`'s default Explicit axes."""
  if all(kind == AxisType.Auto for kind in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def on_auto_axes(module: nn.Module, method: Callable[..., Any], x: jax.Array, *args: Any) -> Any:
  """`method(module, x, *args)`, with every Explicit axis of the mesh `x` is placed on switched to Auto
  around it; outputs keep x's batch split (dimension 0), the rest replicated. Just the call otherwise.

  `jax.make_mesh` makes Explicit axes by default (jax >= 0.7); there every reshape, gather and
  concatenate of a sharded array must state its output sharding, which the models' code (written for
  Auto axes, `create_mesh`) does not. The same program under Auto axes gives the same numbers: x and
  the module's variables are retyped to Auto (no data moves), and the outputs back to Explicit.
  Variables the call updates (BatchNorm statistics in training) come back typed on the Auto mesh.
  """
  sharding_ = jax.typeof(x).sharding
  mesh = sharding_.mesh
  explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit)
  if not explicit:
    return method(module, x, *args)

  def to_context_mesh(tree):  # Explicit-typed variables -> the (Auto) context mesh, same split.
    return jax.tree.map(lambda v: jax.reshard(v, jax.typeof(v).sharding.spec), tree)

  def run(x):
    mapped = nn.map_variables(lambda mdl, x: method(mdl, x, *args), mapped_collections=True,
                              trans_in_fn=to_context_mesh, init=module.is_initializing(),
                              mutable=True)
    return mapped(module, x)

  batch_spec = P(sharding_.spec[0] if len(sharding_.spec) else None)
  return jax.sharding.auto_axes(run, axes=explicit, out_sharding=NamedSharding(mesh, batch_spec))(x)
