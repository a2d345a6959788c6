"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") in Flax: the distance DreamBooth's DIV diversity metric averages.

As the `lpips` package (v0.1) computes it: inputs in [-1, 1] are shifted and scaled per channel,
run through the feature layers of an ImageNet AlexNet ('alex', the package's default) or VGG16
('vgg'); each tapped ReLU output is unit-normalised over channels, the squared difference of the
two images' features is weighted per channel by a learned non-negative 1x1 layer and averaged
over space; the five layers' values add up.

Weights: the learned linear layers ship inside the `lpips` package (`lpips/weights/v0.1/alex.pth`),
the backbone is torchvision's ImageNet classifier (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`).
Both load from their own files, or together from an `lpips.LPIPS` module's state dict.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.convert import Entry, tree_from_table
from clip_jax.convert import variables_to_state_dict as table_to_state_dict
from clip_jax.weights import CheckpointError, load_state_dict

# The `lpips` package's ScalingLayer: ImageNet statistics mapped to inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Backbone layer specs. ('conv', torchvision index, out channels, kernel, stride, padding) is a
# conv + ReLU; ('pool', kernel, stride) a max pool; ('tap',) marks a feature LPIPS compares.
_ALEX = (("conv", 0, 64, 11, 4, 2), ("tap",),
         ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), ("tap",),
         ("pool", 3, 2), ("conv", 6, 384, 3, 1, 1), ("tap",),
         ("conv", 8, 256, 3, 1, 1), ("tap",),
         ("conv", 10, 256, 3, 1, 1), ("tap",))


def _vgg16_spec():
  spec, index = [], 0
  for stage, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    if stage:
      spec.append(("pool", 2, 2))
      index += 1
    for _ in range(convs):
      spec.append(("conv", index, width, 3, 1, 1))
      index += 2  # conv, ReLU
    spec.append(("tap",))
  return tuple(spec)


BACKBONES = {"alex": _ALEX, "vgg": _vgg16_spec()}


def tap_channels(net: str) -> list[int]:
  spec = _backbone_spec(net)
  channels, last = [], None
  for layer in spec:
    if layer[0] == "conv":
      last = layer[2]
    elif layer[0] == "tap":
      channels.append(last)
  return channels


def _backbone_spec(net: str):
  if net not in BACKBONES:
    raise ValueError(f"Unknown LPIPS backbone '{net}'; choose one of {sorted(BACKBONES)}.")
  return BACKBONES[net]


def unit_normalize(features: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Divides by the channel norm plus eps, as `lpips.normalize_tensor` (eps outside the sqrt)."""
  return features / (jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True)) + eps)


class Backbone(nn.Module):
  """The feature layers, convs named by their torchvision index ('features_3' is features.3)."""
  net: str = "alex"

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for layer in _backbone_spec(self.net):
      if layer[0] == "conv":
        _, index, width, kernel, stride, pad = layer
        x = nn.relu(nn.Conv(width, (kernel, kernel), (stride, stride), [(pad, pad), (pad, pad)],
                            name=f"features_{index}")(x))
      elif layer[0] == "pool":
        x = nn.max_pool(x, (layer[1], layer[1]), (layer[2], layer[2]), "VALID")  # torch's floor mode
      else:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """`apply(variables, images0, images1)` -> [B] distances for NHWC images in [-1, 1].

  `method='features'` gives each image's unit-normalised taps once, and `method='distance'`
  compares two such lists: DIV's pairwise distances reuse one feature pass per image.
  """
  net: str = "alex"

  def setup(self):
    self.backbone = Backbone(self.net)
    # The learned per-channel weights: 1x1 convs without bias, one output. Kept in conv layout.
    self.lins = [self.param(f"lin{i}", nn.initializers.ones, (1, 1, c, 1))
                 for i, c in enumerate(tap_channels(self.net))]

  def features(self, images: jax.Array) -> list[jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"LPIPS takes NHWC RGB images [B, H, W, 3] in [-1, 1], got shape {images.shape}.")
    x = (images.astype(jnp.float32) - jnp.asarray(_SHIFT)) / jnp.asarray(_SCALE)
    return [unit_normalize(t) for t in self.backbone(x)]

  def distance(self, features0: Sequence[jax.Array], features1: Sequence[jax.Array]) -> jax.Array:
    total = 0.0
    for lin, f0, f1 in zip(self.lins, features0, features1):
      # The 1x1 layer is linear, so averaging over space first gives the same value cheaper.
      mean_sq = jnp.mean(jnp.square(f0 - f1), axis=(1, 2))                    # [B, C]
      total = total + mean_sq @ lin[0, 0, :, 0]
    return total                                                             # [B]

  def __call__(self, images0: jax.Array, images1: jax.Array) -> jax.Array:
    if images0.shape != images1.shape:
      raise ValueError(f"LPIPS compares images of one shape, got {images0.shape} and {images1.shape}.")
    return self.distance(self.features(images0), self.features(images1))


# ----------------------------------------------------------------------------- weights
def lpips_entries(net: str) -> list[Entry]:
  """Our variables <-> torchvision backbone names ('features.N.*') and the lpips package's
  linear layers ('linK.model.1.weight')."""
  entries = []
  for layer in _backbone_spec(net):
    if layer[0] == "conv":
      index = layer[1]
      entries += [Entry(("params", "backbone", f"features_{index}", "kernel"), f"features.{index}.weight", "conv"),
                  Entry(("params", "backbone", f"features_{index}", "bias"), f"features.{index}.bias")]
  entries += [Entry(("params", f"lin{i}"), f"lin{i}.model.1.weight", "conv") for i in range(len(tap_channels(net)))]
  return entries


# Not LPIPS weights: torchvision's classifier, and the lpips module's constant ScalingLayer.
_IGNORED = re.compile(r"^(classifier\.|scaling_layer\.)")


def _canonical_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An `lpips.LPIPS` module state dict names the backbone 'net.sliceK.N.*' (N is torchvision's
  index) and holds each linear layer twice ('linK.*' and its alias 'lins.K.*')."""
  out = {}
  for key, value in state.items():
    key = re.sub(r"^net\.slice\d+\.(\d+)\.", r"features.\1.", key)
    alias = re.match(r"^lins\.(\d+)\.(.*)$", key)
    if alias:
      key = f"lin{alias.group(1)}.{alias.group(2)}"
      if key in state:
        continue
    out[key] = np.asarray(value)
  for name, constant in (("scaling_layer.shift", _SHIFT), ("scaling_layer.scale", _SCALE)):
    if name in out and not np.allclose(out[name].ravel(), constant):
      raise CheckpointError(f"{name} is {out[name].ravel().tolist()}, not LPIPS v0.1's {list(constant)}.")
  return out


def _expected_shapes(model: LPIPS) -> dict[tuple, tuple]:
  from flax import traverse_util
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, image)
  return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def lpips_from_state_dict(state: Mapping[str, np.ndarray], net: str = "alex",
                          source: str = "checkpoint") -> tuple[LPIPS, dict[str, Any]]:
  """`(module, variables)` from one dict holding the backbone and the linear layers: an
  `lpips.LPIPS(net=...)` module's state dict, or torchvision's weights merged with the package's."""
  model = LPIPS(net)
  return model, tree_from_table(_canonical_names(state), lpips_entries(net), _expected_shapes(model), source,
                                f"an LPIPS-{net} model", _IGNORED)


def lpips_to_state_dict(model: LPIPS, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torchvision's backbone names plus the lpips package's linear-layer names."""
  return table_to_state_dict(variables, lpips_entries(model.net))


def packaged_linear_weights(net: str = "alex") -> str:
  """Path of the linear layers shipped inside the installed `lpips` package."""
  _backbone_spec(net)
  spec = importlib.util.find_spec("lpips")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("LPIPS's linear-layer weights come with the `lpips` package: pip install lpips, "
                            "or pass linear_weights=<path to lpips/weights/v0.1/%s.pth>." % net)
  return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", f"{net}.pth")


def load_lpips(backbone_weights: str, linear_weights: str | None = None,
               net: str = "alex") -> tuple[LPIPS, dict[str, Any]]:
  """`(module, variables)` from torchvision's ImageNet weights for the backbone (or an
  `lpips.LPIPS` state dict) and the package's linear layers (found in the installed package when
  not given)."""
  state = load_state_dict(backbone_weights)
  if not any(k.startswith("lin") for k in state):
    path = linear_weights or packaged_linear_weights(net)
    state = {**state, **load_state_dict(path)}
    source = f"{backbone_weights} + {path}"
  else:
    source = backbone_weights
  return lpips_from_state_dict(state, net, source)
