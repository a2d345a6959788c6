"""`--config.init.checkpoint=DIR` where DIR states its architecture (an open_clip hub folder, a Hugging
Face CLIPModel folder, a workdir): the configured model must be that architecture, heads included,
which no parameter shape shows. A difference is refused in one line naming each field with both
values and the `--config.model.overrides=...` argument that matches; pasted, it loads and computes
what the checkpoint does. A new image size stays a supported change (the grid is resampled)."""
import ast
import json
import os
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import convert
from clip_jax.models.configs import get_config

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from tests.test_finetune import _target  # noqa: E402
from tests.test_models import _randomize_open_clip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fresh user's checkpoint: ViT-Tiny's shapes, but 2 image heads of 32 (ViT-Tiny: 1 of 64) and
# open_clip's 77-token context.
MODEL_CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
USER_OVERRIDES = {"text": {"context_length": 77}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The same random weights as an open_clip hub folder, a Hugging Face folder and a workdir."""
  from clip_jax import checkpoint as ckpt
  from clip_jax.weights import save_safetensors
  root = tmp_path_factory.mktemp("arch")
  reference = _randomize_open_clip(open_clip.model.CLIP(**MODEL_CFG)).eval()
  hub = root / "hub"
  hub.mkdir()
  (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
  save_safetensors({k: v.numpy() for k, v in reference.state_dict().items()}, str(hub / "open_clip_model.safetensors"))
  model, variables = convert.load_checkpoint(str(hub))
  convert.export_hf(model, variables, str(root / "hf"))
  ckpt.write_model_config(str(root / "workdir"), model.config)
  manager = ckpt.make_manager(str(root / "workdir"), with_data=False, async_save=False)
  ckpt.save(manager, 3, {"params": variables["params"], "step": np.int32(3)})
  manager.wait_until_finished()
  manager.close()
  return {"hub": str(hub), "hf": str(root / "hf"), "workdir": str(root / "workdir"),
          "step": str(root / "workdir" / "checkpoints" / "3"), "reference": reference,
          "variables": variables}


def _images_and_tokens():
  images = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
  tokens = np.random.RandomState(1).randint(1, 49406, (3, 77))
  tokens[:, 9], tokens[:, 10:] = 49407, 0
  return images, tokens


def _pasted_overrides(message: str) -> dict:
  """The `--config.model.overrides=...` argument of a refusal, as the shell hands it over."""
  quoted = re.search(r'add ("--config\.model\.overrides=[^"]*")', message).group(1)
  (argument,) = shlex.split(quoted)
  return ast.literal_eval(argument.split("=", 1)[1])


@pytest.mark.parametrize("kind", ["hub", "hf", "workdir", "step"])
def test_other_heads_are_refused_with_the_override_that_matches(sources, kind):
  """Fails before the check: all variables loaded into 1 image head of 64, silently."""
  from clip_jax import pretrained
  from clip_jax.cli import UserError
  model = clip_jax.create_model("ViT-Tiny", **USER_OVERRIDES)
  with pytest.raises(UserError) as error:
    pretrained.load_init(sources[kind], _target(model), model.config, model_overrides=USER_OVERRIDES)
  message = str(error.value)
  assert "\n" not in message
  stated = {"hub": "hub/open_clip_config.json", "hf": "hf/config.json", "workdir": "workdir/clip_config.json",
            "step": "workdir/clip_config.json"}[kind]
  assert f"{stated} states another architecture" in message
  assert "vision.head_width 32 in the checkpoint, 64 configured" in message
  assert "text.context_length" not in message  # the user's own override matches already
  # The user's own overrides are kept in the argument (it replaces model.overrides whole).
  assert _pasted_overrides(message) == {"text": {"context_length": 77}, "vision": {"head_width": 32}}


def test_every_differing_field_is_named():
  """Activation, text heads, pooling, context, depth: each with both values, one argument for all."""
  from clip_jax import pretrained
  from clip_jax.cli import UserError
  stated = get_config("ViT-Tiny").replace(act="quick_gelu", text={"heads": 4, "eot_token_id": 49406},
                                                   vision={"layers": 3, "image_size": 64})
  configured = get_config("ViT-Tiny")
  with pytest.raises(UserError) as error:
    pretrained.check_architecture("ck", (stated, "ck/config.json"), configured, {"embed_dim": 64})
  message = str(error.value)
  for said in ("vision.layers 3 in the checkpoint, 2 configured", "text.heads 4 in the checkpoint, 2 configured",
               "text.eot_token_id 49406 in the checkpoint, None configured",
               "act 'quick_gelu' in the checkpoint, 'gelu' configured"):
    assert said in message
  assert "image_size" not in message  # a new resolution is a supported change
  assert _pasted_overrides(message) == {"embed_dim": 64, "act": "quick_gelu", "vision": {"layers": 3},
                                        "text": {"heads": 4, "eot_token_id": 49406}}
  # Pooling at the vocabulary's last token (as Hugging Face configs state it) is argmax pooling: the same.
  pretrained.check_architecture("ck", (configured.replace(text={"eot_token_id": 49407}), "ck/config.json"), configured)
  # A tower that starts fresh (init.dont_load) may be of another architecture.
  pretrained.check_architecture("ck", (stated.replace(act="gelu", vision={"layers": 2}), "ck/config.json"),
                                configured, text=False)


def test_the_pasted_override_loads_and_computes_the_checkpoint(sources):
  from clip_jax import pretrained
  model = clip_jax.create_model("ViT-Tiny", **USER_OVERRIDES)
  with pytest.raises(ValueError) as error:
    pretrained.load_init(sources["hub"], _target(model), model.config, model_overrides=USER_OVERRIDES)
  overrides = _pasted_overrides(str(error.value))
  model = clip_jax.create_model("ViT-Tiny", **overrides)
  loaded = pretrained.load_init(sources["hub"], _target(model), model.config, model_overrides=overrides)
  images, tokens = _images_and_tokens()
  with torch.no_grad():
    want_image = sources["reference"].encode_image(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
    want_text = sources["reference"].encode_text(torch.tensor(tokens)).numpy()
  np.testing.assert_allclose(model.apply(loaded, jnp.asarray(images), method=model.encode_image), want_image,
                             atol=1e-5)
  np.testing.assert_allclose(model.apply(loaded, jnp.asarray(tokens), method=model.encode_text), want_text, atol=1e-5)


@pytest.mark.parametrize("kind", ["hub", "workdir"])
def test_a_new_image_size_is_still_a_supported_change(sources, kind):
  from clip_jax import pretrained, resize
  overrides = {"vision": {"image_size": 48, "head_width": 32}, "text": {"context_length": 77}}
  model = clip_jax.create_model("ViT-Tiny", **overrides)
  loaded = pretrained.load_init(sources[kind], _target(model), model.config, model_overrides=overrides)
  want = resize.resize_grid_embedding(sources["variables"]["params"]["visual"]["positional_embedding"], 6)
  np.testing.assert_allclose(np.asarray(loaded["params"]["visual"]["positional_embedding"]), want, atol=1e-6)


def test_lit_text_tower_from_scratch_may_differ(sources):
  """init.dont_load='^text/': the text tower's architecture is the configured one (32 tokens here)."""
  from clip_jax import pretrained
  overrides = {"vision": {"head_width": 32}}
  model = clip_jax.create_model("ViT-Tiny", **overrides)
  loaded = pretrained.load_init(sources["hub"], _target(model), model.config, dont_load="^text/",
                                model_overrides=overrides)
  assert sorted(loaded["params"]) == ["logit_scale", "visual"]


@pytest.mark.slow  # two trainer processes (the refusal, then a 1-step run), ~25 s
def test_cli_refuses_then_the_pasted_argument_trains_from_the_checkpoint(sources, tmp_path):
  """The fresh user's command: one `error:` line; with its argument pasted, an lr-0 step keeps the
  checkpoint, whose embeddings then equal open_clip's."""
  run = tmp_path / "run"
  command = [sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py", f"--workdir={run}",
             f"--config.init.checkpoint={sources['hub']}", "--config.data.source=synthetic",
             "--config.total_steps=1", "--config.global_batch=16", "--config.optimizer.learning_rate=0",
             "--config.optimizer.warmup_steps=0", "--config.eval_every=0", "--config.peak_flops_per_device=1e12",
             "--config.compilation_cache=", "--config.progress_bar=False"]
  refused = subprocess.run(command + ["--config.model.overrides={'text': {'context_length': 77}}"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert refused.returncode == 2, refused.stderr
  (line,) = refused.stderr.strip().splitlines()
  assert line.startswith("error: ") and "vision.head_width 32 in the checkpoint, 64 configured" in line
  pasted = shlex.split(re.search(r'add ("--config\.model\.overrides=[^"]*")', line).group(1))
  done = subprocess.run(command + pasted, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  model, variables = convert.load_checkpoint(str(run))
  images, tokens = _images_and_tokens()
  with torch.no_grad():
    want = sources["reference"].encode_image(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(images), method=model.encode_image), want, atol=1e-5)
  saved = traverse_util.flatten_dict(variables["params"])
  for key, value in traverse_util.flatten_dict(sources["variables"]["params"]).items():
    np.testing.assert_array_equal(np.asarray(saved[key]), np.asarray(value), err_msg=str(key))


def test_a_bare_state_dict_of_other_sizes_says_the_argument_too(tmp_path):
  """A state dict states no heads (today's behaviour: the configured model's); its shapes tell its
  sizes, and the shape error now names the argument that builds them (it only asked 'another architecture?')."""
  from clip_jax import pretrained
  from clip_jax.weights import CheckpointError
  wide = _randomize_open_clip(open_clip.model.CLIP(
      embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
      text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)))
  path = str(tmp_path / "wide.pt")
  torch.save(wide.state_dict(), path)
  model = clip_jax.create_model("ViT-Tiny")
  with pytest.raises(CheckpointError) as error:
    pretrained.load_init(path, _target(model), model.config)
  message = str(error.value)
  assert "parameter visual/class_embedding has shape (128,)" in message
  assert "vision.width 128 in the checkpoint, 64 configured" in message
  overrides = _pasted_overrides(message.replace("to build them, add", "add"))
  assert overrides == {"vision": {"width": 128}}
  model = clip_jax.create_model("ViT-Tiny", **overrides)
  loaded = pretrained.load_init(path, _target(model), model.config, model_overrides=overrides)
  assert len(traverse_util.flatten_dict(loaded)) == len(traverse_util.flatten_dict(_target(model)))
