"""Reading and writing PyTorch-style state dicts with numpy only: no torch, no code from the file.

Shared by the CLIP converters (`clip_jax.convert`) and the Stable Diffusion converters
(`dreambooth_jax`). Everything here speaks numpy: a state dict is `{name: np.ndarray}`.

PyTorch files are read without torch. A `.pt`/`.bin`/`.ckpt` file is a pickle (a zip holding
`<name>/data.pkl` and one raw file per storage under `<name>/data/` since torch 1.6; before that
one stream of pickles followed by the storages). OpenAI's released CLIP checkpoints are TorchScript
archives: the same zip layout plus `code/` and `constants.pkl`; their `data.pkl` pickles the module
tree. The pickles are read by `_TensorUnpickler`, which resolves only the names that rebuild tensors
(storage types, dtypes, `torch._utils._rebuild_tensor*`/`_rebuild_parameter*`, `OrderedDict`,
`torch.Size`) and, in TorchScript archives, turns `__torch__.*` module classes into inert records of
their attributes. Any other global (`os.system`, ...) is refused with a CheckpointError, so loading
never runs pickled Python or TorchScript code (`code/` and `constants.pkl` are never read; a
module's scripted `__setstate__` does not run).

Directories (`load_weights_dir`) are searched the way transformers / diffusers name their files:
single, sharded (`*.index.json`), variant (`model.fp16.safetensors`) and `.bin` files.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A file that is not a supported checkpoint, or whose contents do not fit the model."""


# ----------------------------------------------------------------------------- PyTorch pickles
# torch's storage classes and dtype names -> numpy dtypes (bfloat16 and float8 via ml_dtypes).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}


@dataclasses.dataclass(frozen=True)
class _DType:
  """What the pickle's `torch.FloatStorage` / `torch.float32` names resolve to."""
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: Any
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor not read yet: legacy files store the bytes after the pickle that names them."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: Any


class _ScriptObject:
  """A TorchScript module or class instance from an archive's data.pkl: only its attributes.

  Its scripted `__setstate__` (code in the archive) is never run; the pickled state is kept.
  Each archive class name gets a subclass (pickle's NEWOBJ needs a type), made by `_script_class`.
  """
  state: Any = None

  def __setstate__(self, state):
    self.state = state


def _script_class(qualified_name: str) -> type:
  return type(qualified_name.rsplit(".", 1)[-1], (_ScriptObject,), {"qualified_name": qualified_name})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused, dtype=None):
  if not isinstance(storage, _StorageRef):
    raise CheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage.")
  shape, strides = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(shape) != len(strides) or min(shape + strides + (int(storage_offset),), default=0) < 0:
    raise CheckpointError(f"a tensor has a malformed layout (size {shape}, stride {strides}, offset {storage_offset}).")
  return _TensorRef(storage, int(storage_offset), shape, strides, dtype if dtype is not None else storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, *unused):
  return data


class _TensorUnpickler(pickle.Unpickler):
  """Resolves only the globals that rebuild tensors; refuses every other one."""

  _TENSOR_GLOBALS: dict[tuple[str, str], Callable] = {
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("collections", "OrderedDict"): collections.OrderedDict,  # state dicts and backward hooks
      ("torch", "Size"): tuple,
  }
  # TorchScript's pickler tags typed containers; the tags are data, never code.
  _SCRIPT_GLOBALS: dict[tuple[str, str], Callable] = {
      ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
      ("torch.jit._pickle", "build_intlist"): list,
      ("torch.jit._pickle", "build_doublelist"): list,
      ("torch.jit._pickle", "build_boollist"): list,
      ("torch.jit._pickle", "build_tensorlist"): list,
  }

  def __init__(self, file, source: str, torchscript: bool = False, storages: bool = True):
    super().__init__(file)
    self._source, self._torchscript, self._storages = source, torchscript, storages
    self.storage_refs: dict[str, _StorageRef] = {}  # every storage the pickle names, by key

  def find_class(self, module: str, name: str):
    if (module, name) in self._TENSOR_GLOBALS:
      return self._TENSOR_GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _DType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _DType(_TORCH_DTYPES[name])
    if self._torchscript and (module, name) in self._SCRIPT_GLOBALS:
      return self._SCRIPT_GLOBALS[(module, name)]
    if self._torchscript and module.startswith("__torch__"):
      return _script_class(f"{module}.{name}")
    raise CheckpointError(f"{self._source}: refused to load: the pickle asks for '{module}.{name}', which is "
                          "not a tensor; only tensors (and dicts/lists of them) are read from PyTorch files, "
                          "so no code in the file runs.")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (self._storages and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _DType)):
      raise CheckpointError(f"{self._source}: unexpected persistent id {str(pid)[:80]} in the pickle.")
    if len(pid) > 5 and pid[5] is not None:
      raise CheckpointError(f"{self._source}: storage views (files written by torch < 1.0) are not supported; "
                            "re-save the state dict with a recent torch or as .safetensors.")
    ref = _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))
    self.storage_refs[ref.key] = ref
    return ref


def _unpickle(data, source: str, torchscript: bool = False, storages: bool = True, seen: dict | None = None):
  """One pickle from `data` (bytes or an open file); `seen` collects the storages it names."""
  try:
    unpickler = _TensorUnpickler(data if hasattr(data, "read") else io.BytesIO(data), source, torchscript,
                                 storages)
    obj = unpickler.load()
    if seen is not None:
      seen.update(unpickler.storage_refs)
    return obj
  except CheckpointError as e:
    if str(e).startswith(source):
      raise
    raise CheckpointError(f"{source}: {e}") from None
  except Exception as e:  # truncated streams, bad opcodes, wrong argument counts
    raise CheckpointError(f"{source}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'corrupt pickle'}).") from None


def _materialize(ref: _TensorRef, raw: bytes, big_endian: bool, source: str, name: str) -> np.ndarray:
  """The tensor `ref` describes, as an owned numpy array (bfloat16 widened to float32)."""
  try:
    return _materialize_checked(ref, raw, big_endian, source, name)
  except (TypeError, ValueError, OverflowError) as e:  # fields a crafted pickle filled with junk
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{source}: tensor '{name}' is malformed ({type(e).__name__}).") from None


def _materialize_checked(ref: _TensorRef, raw: bytes, big_endian: bool, source: str, name: str) -> np.ndarray:
  dtype = np.dtype(ref.dtype)
  if big_endian and dtype.itemsize > 1:
    dtype = dtype.newbyteorder(">")
  if len(raw) % dtype.itemsize:
    raise CheckpointError(f"{source}: storage of '{name}' has {len(raw)} bytes, not a multiple of "
                          f"{dtype.itemsize} ({dtype}).")
  flat = np.frombuffer(raw, dtype)
  if any(n == 0 for n in ref.shape):
    array = np.zeros(ref.shape, dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= flat.size:
      raise CheckpointError(f"{source}: tensor '{name}' reaches past its storage ({flat.size} elements); "
                            "the file is truncated or corrupt.")
    array = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape,
                                            tuple(s * dtype.itemsize for s in ref.stride), writeable=False)
  array = np.array(array, dtype.newbyteorder("="))  # owned, writable, native order
  return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def _flatten_script_module(obj: _ScriptObject, prefix: str = "") -> dict[str, _TensorRef]:
  """A TorchScript module tree -> {'visual.conv1.weight': tensor}: every tensor attribute."""
  state = obj.state
  items = state.items() if isinstance(state, Mapping) else (
      enumerate(state) if isinstance(state, (tuple, list)) else ())
  out = {}
  for name, value in items:
    key = f"{prefix}{name}"
    if isinstance(value, _TensorRef):
      out[key] = value
    elif isinstance(value, _ScriptObject):
      out.update(_flatten_script_module(value, f"{key}."))
  return out


def _unwrap_state_dict(obj, source: str) -> Mapping[str, _TensorRef]:
  """The state dict inside a pickled object: training checkpoints wrap it ({'state_dict': ...})."""
  if isinstance(obj, _ScriptObject):
    return _flatten_script_module(obj)
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model", "module"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, _TensorRef) for v in obj.values()):
    raise CheckpointError(f"{source}: holds no state dict of tensors.")
  return obj


def _strip_module_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # DistributedDataParallel prefixes every name with 'module.'.
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def _load_torch_zip(path: str) -> dict[str, np.ndarray]:
  """torch>=1.6 `torch.save` zips and TorchScript archives (`torch.jit.save`)."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: a zip file but not a PyTorch checkpoint (no single */data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    torchscript = f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names)
    byteorder = archive.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else "little"
    obj = _unpickle(archive.read(pickles[0]), path, torchscript)
    refs = _unwrap_state_dict(obj, path)
    storages: dict[str, bytes] = {}
    state = {}
    for name, ref in refs.items():
      key = ref.storage.key
      if key not in storages:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise CheckpointError(f"{path}: storage '{member}' of '{name}' is missing from the archive.")
        storages[key] = archive.read(member)
      state[name] = _materialize(ref, storages[key], byteorder == "big", path, name)
  return _strip_module_prefix(state)


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _load_torch_legacy(path: str) -> dict[str, np.ndarray]:
  """torch<1.6 files (or `_use_new_zipfile_serialization=False`): magic, protocol, system info
  and the object as pickles, then the sorted storage keys, then per storage int64 numel + bytes."""
  with open(path, "rb") as f:
    if _unpickle(f, path, storages=False) != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: a pickle, but not a PyTorch checkpoint (no torch magic number).")
    _unpickle(f, path, storages=False)  # protocol version
    sys_info = _unpickle(f, path, storages=False)
    big_endian = isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False
    seen: dict[str, _StorageRef] = {}
    obj = _unpickle(f, path, seen=seen)
    keys = _unpickle(f, path, storages=False)
    refs = _unwrap_state_dict(obj, path)
    wanted = {ref.storage.key for ref in refs.values()}
    storages = {}
    for key in keys:
      header = f.read(8)
      if len(header) < 8:
        raise CheckpointError(f"{path}: truncated (storage '{key}' is missing).")
      numel = struct.unpack("<q" if not big_endian else ">q", header)[0]
      if key not in seen:
        raise CheckpointError(f"{path}: storage '{key}' is listed but no tensor names it; the file is corrupt.")
      size = numel * np.dtype(seen[key].dtype).itemsize
      data = f.read(size)  # read even when unused (optimizer state): the next storage follows it
      if len(data) < size:
        raise CheckpointError(f"{path}: truncated (storage '{key}' is cut short).")
      if key in wanted:
        storages[key] = data
  state = {}
  for name, ref in refs.items():
    if ref.storage.key not in storages:
      raise CheckpointError(f"{path}: storage of '{name}' is missing.")
    state[name] = _materialize(ref, storages[ref.storage.key], big_endian, path, name)
  return _strip_module_prefix(state)


def _load_torch(path: str) -> dict[str, np.ndarray]:
  if zipfile.is_zipfile(path):
    return _load_torch_zip(path)
  with open(path, "rb") as f:
    if f.read(2) == b"PK":  # a zip's start without its directory at the end: the unpickler's error would puzzle
      raise CheckpointError(f"{path}: a zip archive (torch.save's format) that is truncated or corrupt: its "
                            "directory is missing; copy or download it again.")
  return _load_torch_legacy(path)


# ----------------------------------------------------------------------------- safetensors
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U64": np.uint64,
                       "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64}
# safetensors dtype names numpy lacks; ml_dtypes has them.
_SAFETENSORS_EXTRA_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                             "F8_E5M2": ml_dtypes.float8_e5m2}
_WIDENED = tuple(np.dtype(d) for d in _SAFETENSORS_EXTRA_DTYPES.values())


def _load_safetensors_widening(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file with dtypes numpy lacks (bfloat16, float8), widened to float32.

  The format: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the tensors' bytes.
  """
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
    data = f.read()
  state = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_EXTRA_DTYPES.get(info["dtype"]) or _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which cannot be read.")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end], np.dtype(dtype).newbyteorder("<")).reshape(info["shape"])
    state[name] = array.astype(np.float32) if info["dtype"] in _SAFETENSORS_EXTRA_DTYPES else array.copy()
  return state


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    # Newer safetensors return ml_dtypes arrays for bfloat16/float8; widen them as the fallback does.
    return {k: v.astype(np.float32) if v.dtype in _WIDENED else v for k, v in load_file(path).items()}
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    message = str(e)
    if any(name.lower() in message.lower() or name in message for name in ("bfloat16", "bf16", "F8_")):
      return _load_safetensors_widening(path)
    raise CheckpointError(f"{path}: not a valid safetensors file ({message.splitlines()[0]}).") from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads `.safetensors`, `.pt`, `.pth`, `.bin` or `.ckpt` into `{name: np.ndarray}`.

  PyTorch files (zip or legacy pickles, TorchScript archives) are read with numpy and a
  restricted unpickler, without torch: no pickled object or TorchScript code from the file runs.
  bfloat16 tensors come back as float32 (numpy has no bfloat16). Training checkpoints that wrap
  the weights ({'state_dict': ...}, {'model': ...}, DDP's 'module.' prefix) are unwrapped.
  Raises FileNotFoundError, or CheckpointError (one line) for anything else that cannot be read.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file.")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a directory, expected a weights file.")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch>=1.6) or legacy pickle
    return _load_torch(path)
  if not head:
    raise CheckpointError(f"{path}: is empty (0 bytes); copy or download it again.")
  if path.lower().endswith((".pt", ".pth", ".bin", ".ckpt")):
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle): "
                          "corrupt, or another format under that name.")
  raise CheckpointError(f"{path}: not a supported checkpoint (expected .safetensors, or a PyTorch "
                        ".pt/.pth/.bin/.ckpt file).")


# ----------------------------------------------------------------------------- directories
@dataclasses.dataclass(frozen=True)
class WeightNames:
  """File stems of a library's weights: transformers' `model.safetensors` + `pytorch_model.bin`,
  diffusers' `diffusion_pytorch_model.{safetensors,bin}`."""
  safetensors: str
  bin: str


TRANSFORMERS_WEIGHTS = WeightNames("model", "pytorch_model")
DIFFUSERS_WEIGHTS = WeightNames("diffusion_pytorch_model", "diffusion_pytorch_model")
OPEN_CLIP_WEIGHTS = WeightNames("open_clip_model", "open_clip_pytorch_model")  # open_clip's hub folders
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _candidates(names: WeightNames, variant: str | None) -> list[str]:
  """File names in transformers'/diffusers' order of preference: safetensors before .bin, a
  single file before an index of shards. A variant goes before the extension
  (`model.fp16.safetensors`) or before `.json` of an index (`model.safetensors.index.fp16.json`);
  diffusers' older index name (`model.safetensors.fp16.index.json`) is read too."""
  out = []
  for stem, ext in ((names.safetensors, "safetensors"), (names.bin, "bin")):
    if variant:
      out += [f"{stem}.{variant}.{ext}", f"{stem}.{ext}.index.{variant}.json", f"{stem}.{ext}.{variant}.index.json"]
    else:
      out += [f"{stem}.{ext}", f"{stem}.{ext}.index.json"]
  return out


def weight_variants(directory: str, names: WeightNames) -> list[str]:
  """The variants (e.g. ['fp16']) whose weight files are in `directory`."""
  stems = "|".join(re.escape(s) for s in {names.safetensors, names.bin})
  pattern = re.compile(rf"(?:{stems})\.(?:(?:safetensors|bin)\.index\.([^./]+)\.json|(?:safetensors|bin)\.([^./]+)"
                       rf"\.index\.json|([^./-]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin))$")
  found = set()
  for file in os.listdir(directory) if os.path.isdir(directory) else ():
    match = pattern.fullmatch(file)
    if match and (variant := next(g for g in match.groups() if g) if any(match.groups()) else None):
      found.add(variant)
  return sorted(found)


def has_weights(directory: str, names: WeightNames, variant: str | None = None) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in _candidates(names, variant))


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: not a valid shard index (needs a 'weight_map'): {e}.") from None
  directory = os.path.dirname(index_path)
  state: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(directory, shard)
    if not os.path.isfile(shard_path):
      raise CheckpointError(f"{index_path}: names shard '{shard}', which is not in {directory}.")
    state.update(load_state_dict(shard_path))
  missing = sorted(set(weight_map) - set(state))
  if missing:
    raise CheckpointError(f"{index_path}: {len(missing)} weights it lists are in no shard, e.g. "
                          f"{missing[0]!r} (expected in {weight_map[missing[0]]}).")
  return state


def load_weights_dir(directory: str, names: WeightNames, variant: str | None = None) -> dict[str, np.ndarray]:
  """The state dict of a transformers/diffusers model folder, found as those libraries find it.

  Tries, in order: `<stem>.safetensors`, `<stem>.safetensors.index.json` (+ the shards it names),
  `<bin stem>.bin`, its index; with `variant='fp16'` the variant's names instead
  (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`, ...); a folder with no plain files
  and one variant's loads that variant's (a WARNING line says so). Half-precision files are
  returned in their own dtype. Raises CheckpointError naming what was looked for and what the
  folder holds (and which variants) when nothing fits.
  """
  for name in _candidates(names, variant):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return _load_sharded(path) if name.endswith(".json") else load_state_dict(path)
  present = sorted(f for f in os.listdir(directory) if f.endswith(_WEIGHT_SUFFIXES) or f.endswith(".index.json")
                   or ".index." in f) if os.path.isdir(directory) else []
  variants = weight_variants(directory, names)
  if variant is None and len(variants) == 1:
    # Only a variant's files (a hub download of the fp16 files alone): what else could be meant. The
    # libraries ask for variant= here, which no command line of this project can pass.
    logging.getLogger(__name__).warning("%s: no plain weight files, only the %r variant's: loading those.",
                                        directory, variants[0])
    return load_weights_dir(directory, names, variants[0])
  hint = ""
  if variants and variant not in variants:
    hint = f"; pass variant={variants[0]!r}" if variant is None else f"; variants here: {', '.join(variants)}"
  elif variant is not None:
    hint = "; pass variant=None for the plain files"
  suffix = f".{variant}" if variant else ""
  expected = f"{names.safetensors}{suffix}.safetensors or {names.bin}{suffix}.bin"
  listing = ", ".join(present[:6]) + (" ..." if len(present) > 6 else "") if present else "no weight files"
  raise CheckpointError(f"{directory}: no weights named {expected} (or their sharded index); found {listing}{hint}.")


def save_safetensors(state: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.ascontiguousarray would turn 0-d tensors (logit_scale) into shape [1].
  save_file({k: np.asarray(v, order="C") for k, v in state.items()}, path,
            metadata=metadata or {"format": "pt"})
  # safetensors creates the file 0600; give it the permissions any other file written here gets (umask).
  os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
  """The process's umask, read without changing it (os.umask sets it, racing other threads' writes)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError):
    return 0o022


# Layout conversions between PyTorch and Flax parameters.
def linear_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def linear_to_torch(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).T)


def conv_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_to_torch(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))
