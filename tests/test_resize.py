"""Positional-embedding resizing (clip_jax.resize) against open_clip's `resize_pos_embed`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import resize

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
F = torch.nn.functional

from tests.test_models import _inputs, _randomize_open_clip, _tiny_open_clip_cfg  # noqa: E402


def _open_clip_resized(embedding: np.ndarray, grid: int) -> np.ndarray:
  """open_clip's own resize of a ViT positional embedding to `grid` x `grid` cells."""
  class Visual:  # resize_pos_embed reads only model.visual.grid_size
    grid_size = (grid, grid)
  state = {"visual.positional_embedding": torch.from_numpy(embedding)}
  open_clip.model.resize_pos_embed(state, type("Model", (), {"visual": Visual})())
  return state["visual.positional_embedding"].numpy()


@pytest.mark.parametrize("old,new", [(7, 12), (4, 6), (16, 24), (16, 7), (7, 7)],
                         ids=["7to12", "4to6", "16to24", "16to7_shrink", "same"])
def test_equals_open_clip_resize_pos_embed(old, new):
  # Scale 0.1: above a trained CLIP's (about width**-0.5), so float32 rounding of the two
  # summation orders stays well under the 1e-6 asked for (values near 2 differ by ~1.7e-6).
  rng = np.random.default_rng(old * 31 + new)
  embedding = (0.1 * rng.normal(size=(1 + old * old, 48))).astype(np.float32)
  ours = resize.resize_grid_embedding(embedding, new)
  assert ours.shape == (1 + new * new, 48)
  np.testing.assert_array_equal(ours[0], embedding[0])  # the class token is kept as is
  np.testing.assert_allclose(ours, _open_clip_resized(embedding, new), atol=1e-6, rtol=0)


def test_resized_open_clip_vit_gives_equal_embeddings(tmp_path):
  """A 32 px open_clip ViT moved to 48 px by open_clip (resize_pos_embed + load_state_dict) and
  the same .pt loaded here with image_size=48: equal image embeddings."""
  small = _randomize_open_clip(open_clip.model.CLIP(**_tiny_open_clip_cfg(False)))
  path = tmp_path / "vit32.pt"
  torch.save(small.state_dict(), path)
  cfg = _tiny_open_clip_cfg(False)
  cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": 48}
  large = open_clip.model.CLIP(**cfg).eval()
  state = dict(small.state_dict())
  open_clip.model.resize_pos_embed(state, large)
  large.load_state_dict(state)

  module, variables = clip_jax.load_checkpoint(str(path), act="gelu", image_size=48)
  assert module.config.vision.image_size == 48
  images, _ = _inputs(48)
  with torch.no_grad():
    reference = large.encode_image(torch.from_numpy(images)).numpy()
  encode_image = jax.jit(module.apply, static_argnames="method")  # one compile, not one per op
  ours = encode_image(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image")
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.slow  # ~12 s at low load: kept out of the fast subset (< 5 min)
def test_resized_resnet_attention_pool_gives_equal_embeddings(tmp_path):
  """open_clip does not resize a ModifiedResNet's attention pool; the reference here resizes it
  with the same PyTorch call resize_pos_embed makes, then compares the whole image tower."""
  small = _randomize_open_clip(open_clip.model.CLIP(**_tiny_open_clip_cfg(True)))  # 64 px: 2x2 grid
  path = tmp_path / "rn64.pt"
  torch.save(small.state_dict(), path)
  cfg = _tiny_open_clip_cfg(True)
  cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": 96}  # 3x3 grid
  large = open_clip.model.CLIP(**cfg).eval()
  state = dict(small.state_dict())
  old = state["visual.attnpool.positional_embedding"]
  grid = old[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
  state["visual.attnpool.positional_embedding"] = torch.cat([old[:1], grid.permute(0, 2, 3, 1).reshape(9, -1)])
  large.load_state_dict(state)

  module, variables = clip_jax.load_checkpoint(str(path), act="gelu", image_size=96)
  np.testing.assert_allclose(variables["params"]["visual"]["attnpool"]["positional_embedding"],
                             state["visual.attnpool.positional_embedding"].numpy(), atol=1e-6, rtol=0)
  images, _ = _inputs(96)
  with torch.no_grad():
    reference = large.encode_image(torch.from_numpy(images)).numpy()
  encode_image = jax.jit(module.apply, static_argnames="method")  # one compile, not one per op
  ours = encode_image(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image")
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_refuses_sizes_that_do_not_fit():
  vit = clip_jax.create_model("ViT-Tiny")  # patch 8
  variables = {"params": {"visual": {"positional_embedding": np.zeros((17, 64), np.float32)}}}
  with pytest.raises(ValueError, match="image size 44 does not fit the model: the ViT's patches are 8 px"):
    resize.resize_model(vit, variables, 44)
  with pytest.raises(ValueError, match="multiple of 32"):
    resize.resize_model(clip_jax.create_model("RN-Tiny"), {}, 80)
  with pytest.raises(ValueError, match="not 1 extra row"):
    resize.resize_grid_embedding(np.zeros((18, 4), np.float32), 3)
