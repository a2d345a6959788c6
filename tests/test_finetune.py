"""Starting from a pretrained CLIP: locked towers (== open_clip's lock groups), layer-wise
learning-rate decay, and the trainer's `init` (bitwise loading, resume wins, clear errors)."""
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import convert, optim

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from tests.test_models import _randomize_open_clip, _tiny_open_clip_cfg  # noqa: E402


def _tiny_params(resnet: bool = False):
  """Random parameters of a tiny model, shaped by eval_shape (no compilation)."""
  model = clip_jax.create_model("RN-Tiny" if resnet else "ViT-Tiny")
  abstract = jax.eval_shape(lambda: clip_jax.init_variables(model, jax.random.key(0)))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.02), abstract)


def _flat(tree):
  """{'visual/conv1': value}; arrays come to the host (numpy), so comparisons compile nothing."""
  return {"/".join(k): (np.asarray(v) if isinstance(v, jax.Array) else v)
          for k, v in traverse_util.flatten_dict(tree).items()}


def _open_clip_trainable(model) -> dict[str, bool]:
  """open_clip's requires_grad, per Flax parameter path (through the conversion table)."""
  grads = {name: p.requires_grad for name, p in model.named_parameters()}
  cfg = convert.infer_openai_config(convert.split_fused_attention(
      {k: v.numpy() for k, v in model.state_dict().items()}), "gelu")
  out = {}
  for entry in convert.openai_entries(cfg):
    if entry.flax_key[0] != "params":
      continue
    torch_name = re.sub(r"attn\.[qkv]_proj\.(weight|bias)$", r"attn.in_proj_\1", entry.torch_key)
    out["/".join(entry.flax_key[1:])] = grads[torch_name]
  return out


@pytest.mark.parametrize("tower", ["image", "text"])
def test_lock_groups_equal_open_clip(tower):
  """Every unlocked-group count, on both towers: the parameters left trainable are open_clip's."""
  reference = open_clip.model.CLIP(**_tiny_open_clip_cfg(False))  # 2 blocks per tower: 4 groups
  state = convert.split_fused_attention({k: v.numpy() for k, v in reference.state_dict().items()})
  _, variables = convert.load_openai_state_dict(state, act="gelu")
  for unlocked in range(0, 5):
    for p in reference.parameters():
      p.requires_grad = True
    if tower == "image":
      reference.lock_image_tower(unlocked_groups=unlocked)
      mask = optim.lock_mask(variables["params"], lock_image=True, lock_image_unlocked_groups=unlocked)
    else:
      reference.lock_text_tower(unlocked_layers=unlocked)
      mask = optim.lock_mask(variables["params"], lock_text=True, lock_text_unlocked_layers=unlocked)
    expected = _open_clip_trainable(reference)
    ours = {k: not v for k, v in _flat(mask).items()}
    assert ours == expected, f"{tower} unlocked={unlocked}"


def test_lock_errors_are_clear():
  vit, resnet = _tiny_params(), _tiny_params(resnet=True)
  with pytest.raises(ValueError, match="lock_image_unlocked_groups=2 needs lock_image=True"):
    optim.lock_mask(vit, lock_image_unlocked_groups=2)
  with pytest.raises(ValueError, match="only 4 groups"):
    optim.lock_mask(vit, lock_image=True, lock_image_unlocked_groups=5)
  with pytest.raises(ValueError, match="ResNet image tower is locked whole"):
    optim.lock_mask(resnet, lock_image=True, lock_image_unlocked_groups=1)
  assert all(v for k, v in _flat(optim.lock_mask(resnet, lock_image=True)).items() if k.startswith("visual/"))


def test_layer_decay_scales_follow_beit():
  """ViT-Tiny has 2 blocks per tower: embeddings d^3, block 0 d^2, block 1 d, the rest 1."""
  d = 0.5
  scales = _flat(optim.layer_decay_scales(_tiny_params(), d))
  expected = {"visual/conv1": d ** 3, "visual/positional_embedding": d ** 3, "visual/ln_pre/scale": d ** 3,
              "visual/transformer/resblocks_0/attn/q/kernel": d ** 2,
              "visual/transformer/resblocks_1/c_fc/bias": d, "visual/ln_post/scale": 1.0, "visual/proj": 1.0,
              "text/token_embedding": d ** 3, "text/transformer/resblocks_1/ln_1/scale": d,
              "text/ln_final/bias": 1.0, "text/text_projection": 1.0, "logit_scale": 1.0}
  for key, value in expected.items():
    assert scales[key] == value, key
  with pytest.raises(ValueError, match="layer_decay must be in"):
    optim.layer_decay_scales(_tiny_params(), 1.5)
  with pytest.raises(ValueError, match="for ViT image towers"):
    optim.layer_decay_scales(_tiny_params(resnet=True), 0.7)


def _opt_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, total_steps=10, b1=0.9, b2=0.98,
                                       eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0, frozen_regex=""))
  cfg.update(overrides)
  return cfg


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), params)


def _one_update(tx, params, grads):
  """(updates, opt_state) of one step, compiled once (eager optax ops compile per leaf)."""
  opt_state = jax.jit(tx.init)(params)
  return jax.jit(tx.update)(grads, opt_state, params)[0], opt_state


def test_locked_parameters_have_no_moments_and_no_update():
  params = _tiny_params()
  frozen = optim.lock_mask(params, lock_image=True)
  tx = optim.make_optimizer(_opt_cfg(), params, frozen=frozen)
  updates, opt_state = _one_update(tx, params, _grads(params))
  trainable_size = sum(x.size for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f)
  moment_sizes = [x.size for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert sum(moment_sizes) == 2 * trainable_size  # Adam's mu and nu, for trainable leaves only
  new, old = _flat(jax.jit(optax.apply_updates)(params, updates)), _flat(params)
  for key in old:
    if key.startswith("visual/"):
      np.testing.assert_array_equal(new[key], old[key], err_msg=key)
  assert not np.array_equal(new["text/token_embedding"], old["text/token_embedding"])
  assert not np.array_equal(new["logit_scale"], old["logit_scale"])


def test_layer_decay_scales_each_update_exactly():
  """With decay d each update is the undecayed one times its factor (weight decay included);
  with a locked tower as well, the locked updates are zero."""
  params, grads = _tiny_params(), _grads(_tiny_params())
  scales = _flat(optim.layer_decay_scales(params, 0.5))
  u_plain = _flat(_one_update(optim.make_optimizer(_opt_cfg(), params), params, grads)[0])
  u_decayed = _flat(_one_update(optim.make_optimizer(_opt_cfg(layer_decay=0.5), params), params, grads)[0])
  for key, u in u_decayed.items():
    np.testing.assert_array_equal(u, u_plain[key] * scales[key], err_msg=key)
  locked = optim.make_optimizer(_opt_cfg(layer_decay=0.5), params, frozen=optim.lock_mask(params, lock_text=True))
  u_locked = _flat(_one_update(locked, params, grads)[0])
  assert all(not np.any(u) for k, u in u_locked.items() if k.startswith("text/"))
  assert np.any(u_locked["visual/conv1"])


# ----------------------------------------------------------------------------- init from a checkpoint
def _tiny_open_clip_like_vit_tiny(seed=0, vision_width=64):
  """An open_clip CLIP with ViT-Tiny's shapes (32 px, patch 8, 2 layers; text context 32)."""
  return _randomize_open_clip(open_clip.model.CLIP(
      embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=vision_width, patch_size=8),
      text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)), seed)


def _target(model, mesh_shape=(("data", 2), ("fsdp", 4))):
  """The train state's variables as ShapeDtypeStructs in their shardings (as the trainer makes them)."""
  import flax.linen as nn
  from clip_jax import sharding
  mesh = sharding.create_mesh(dict(mesh_shape))
  cfg = model.config
  dummy = (jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3)), jnp.zeros((1, cfg.text.context_length),
                                                                                       jnp.int32))
  boxed = jax.eval_shape(lambda r: model.init(r, *dummy), jax.random.key(0))
  shardings = nn.meta.unbox(sharding.logical_shardings(boxed, mesh, list(sharding.DEFAULT_RULES)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                      shardings)


@pytest.fixture(scope="module")
def init_sources(tmp_path_factory):
  """The same random weights as an open_clip .pt, a Hugging Face directory and a workdir."""
  from clip_jax import checkpoint as ckpt
  root = tmp_path_factory.mktemp("init")
  reference = _tiny_open_clip_like_vit_tiny()
  torch.save(reference.state_dict(), root / "open_clip.pt")
  model, variables = convert.load_openai_state_dict(
      {k: v.numpy() for k, v in reference.state_dict().items()}, model_name="ViT-Tiny")
  convert.export_hf(model, variables, str(root / "hf"))
  ckpt.write_model_config(str(root / "workdir"), model.config)
  manager = ckpt.make_manager(str(root / "workdir"), with_data=False, async_save=False)
  ckpt.save(manager, 7, {"params": variables["params"], "opt_state": {"mu": variables["params"]},
                         "step": np.int32(7)})
  manager.wait_until_finished()
  manager.close()
  return {"open_clip.pt": str(root / "open_clip.pt"), "hf": str(root / "hf"), "workdir": str(root / "workdir"),
          "variables": variables, "root": root}


@pytest.mark.parametrize("kind", ["open_clip.pt", "hf", "workdir"])
def test_load_init_is_bitwise_and_sharded(init_sources, kind, capsys, caplog):
  from clip_jax import pretrained
  model = clip_jax.create_model("ViT-Tiny")
  target = _target(model)
  loaded = traverse_util.flatten_dict(pretrained.load_init(init_sources[kind], target, model.config))
  if kind == "open_clip.pt":  # what the file does not state is said as what happens, not as convert's guess
    assert "its weights go into the configured model (gelu, 1 image and 2 text heads)" in capsys.readouterr().out
    assert "assumed" not in caplog.text
    pretrained.load_init(init_sources[kind], target, model.config, act="gelu")  # init.act given: said as given
    assert "a bare state dict, read with init.act's activation (gelu); it does not state its attention heads" in \
        capsys.readouterr().out
  flat_target = traverse_util.flatten_dict(target)
  for key, want in traverse_util.flatten_dict(init_sources["variables"]).items():
    assert loaded[key].sharding == flat_target[key].sharding, key
    np.testing.assert_array_equal(np.asarray(loaded[key]), want, err_msg=str(key))


def test_load_init_errors_are_one_clear_line(init_sources, tmp_path):
  from clip_jax import pretrained
  from clip_jax.cli import MissingPathError, UserError
  from clip_jax.weights import CheckpointError
  model = clip_jax.create_model("ViT-Tiny")
  target = _target(model)
  with pytest.raises(MissingPathError, match="init.checkpoint openai/clip-vit-base-patch32: no such file or directory; if it is a Hugging Face hub id"):
    pretrained.load_init("openai/clip-vit-base-patch32", {}, None)
  with pytest.raises(MissingPathError, match="init.checkpoint /nonexistent.pt: no such file or directory"):
    pretrained.load_init("/nonexistent.pt", target, model.config)
  with pytest.raises(UserError, match=r"activation is quick_gelu \(as init.act / init.model_name state\), but the "
                     r"configured model uses gelu"):
    pretrained.load_init(init_sources["open_clip.pt"], target, model.config, act="quick_gelu")
  with pytest.raises(UserError, match="activation is quick_gelu"):
    pretrained.load_init(init_sources["open_clip.pt"], target, model.config, model_name="ViT-Tiny-quickgelu")
  quick = clip_jax.create_model("ViT-Tiny-quickgelu")  # the HF directory's config.json says gelu
  # A directory states its architecture, the activation included: any difference is one line with the
  # argument that matches (tests/test_init_architecture.py).
  with pytest.raises(UserError, match=r"/hf/config.json states another architecture than the configured model .*"
                     r"act 'gelu' in the checkpoint, 'quick_gelu' configured.*"
                     r"--config.model.overrides=\{'act': 'gelu'\}"):
    pretrained.load_init(init_sources["hf"], _target(quick), quick.config)
  with pytest.raises(UserError, match="clip_config.json states another architecture.*act 'gelu' in the checkpoint"):
    pretrained.load_init(init_sources["workdir"], _target(quick), quick.config)
  wide = tmp_path / "wide.pt"
  torch.save(_tiny_open_clip_like_vit_tiny(vision_width=128).state_dict(), wide)
  with pytest.raises(CheckpointError, match=r"parameter visual/class_embedding has shape \(128,\) in the checkpoint, "
                     r"the configured model needs \(64,\) \(\d+ more problems\)"):
    pretrained.load_init(str(wide), target, model.config)
  # LiT from scratch: what dont_load matches keeps its fresh init; the rest must still fit.
  loaded = pretrained.load_init(str(wide), target, model.config, dont_load="^visual/")
  assert sorted(loaded["params"]) == ["logit_scale", "text"]
  summary = pretrained.loaded_summary(str(wide), loaded, target)  # the line a run prints at its start
  total = len(traverse_util.flatten_dict(target))
  assert summary == (f"init.checkpoint {wide}: {len(traverse_util.flatten_dict(loaded))} of {total} variables "
                     "loaded; fresh: params/visual.")


def test_load_init_resamples_a_new_image_size(init_sources):
  """A 48 px model from the 32 px weights: the grid embedding as clip_jax.resize makes it."""
  from clip_jax import pretrained, resize
  model = clip_jax.create_model("ViT-Tiny", vision={"image_size": 48})
  for kind in ("open_clip.pt", "workdir"):
    loaded = pretrained.load_init(init_sources[kind], _target(model), model.config)
    want = resize.resize_grid_embedding(init_sources["variables"]["params"]["visual"]["positional_embedding"], 6)
    np.testing.assert_array_equal(np.asarray(loaded["params"]["visual"]["positional_embedding"]), want)


def test_load_init_says_the_grid_was_resampled(init_sources, capsys):
  """A new resolution resampled the grid embedding silently; now one line says from which grid to which and how."""
  from clip_jax import pretrained
  model = clip_jax.create_model("ViT-Tiny", vision={"image_size": 48})
  pretrained.load_init(init_sources["open_clip.pt"], _target(model), model.config)
  assert (f"init.checkpoint {init_sources['open_clip.pt']}: the positional grid resampled from 4 x 4 (32 px) to 6 x 6 "
          "(48 px): bicubic with antialiasing, the class-token row kept (as open_clip's resize_pos_embed).") in \
      capsys.readouterr().out.splitlines()
  model = clip_jax.create_model("ViT-Tiny")
  pretrained.load_init(init_sources["open_clip.pt"], _target(model), model.config)
  assert "resampled" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- the tokenizer of an init folder
def _write_other_bpe(folder) -> None:
  """vocab.json + merges.txt of a BPE that is not OpenAI's: the byte symbols and OpenAI's first 300 merges
  only, special tokens at 812 / 813, so nearly every word gets other ids (and more of them)."""
  import json
  from clip_jax.tokenizer import default_tokenizer
  openai = default_tokenizer()
  tokens = [openai.decoder[i] for i in range(512 + 300)] + ["<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in openai.merges[:300]),
                                     encoding="utf-8")


@pytest.fixture(scope="module")
def hf_own_tokenizer(init_sources):
  """init_sources' Hugging Face folder with a tokenizer of its own (not OpenAI's BPE)."""
  import shutil
  folder = init_sources["root"] / "hf_own_tokenizer"
  shutil.copytree(init_sources["hf"], folder)
  _write_other_bpe(folder)
  return str(folder)


def test_training_tokenizes_with_the_init_folders_own_tokenizer(hf_own_tokenizer, capsys):
  """The trainer tokenized with OpenAI's BPE whatever init.checkpoint's folder carried, while evaluation read
  the folder's own: now the input and the zero-shot hook tokenize with the folder's, and the config names it;
  an explicit --config.data.tokenizer wins."""
  from clip_jax import evaluate, train as trainer
  from clip_jax.data.digits import captions_for
  from clip_jax.eval.zeroshot import build_training_evaluators, prompt_texts
  from clip_jax.tokenizer import default_tokenizer, get_tokenizer
  from tests.test_train import tiny_config
  own = get_tokenizer(hf_own_tokenizer, context_length=32)
  openai = default_tokenizer()
  assert not np.array_equal(own("a photo of the number seven."), openai("a photo of the number seven.", 32))
  assert evaluate.tokenizer_for(None, hf_own_tokenizer, 32)[1] == hf_own_tokenizer  # evaluation's rule
  model = clip_jax.create_model("ViT-Tiny")
  for given, want in (("", own), ("clip", openai)):
    cfg = tiny_config(**{"data.source": "digits", "data.tokenizer": given, "init.checkpoint": hf_own_tokenizer})
    cfg.zeroshot_eval = ml_collections.ConfigDict(dict(enabled=True, source="digits", split="test", batch_size=16,
                                                       limit=16))
    batch = next(trainer.build_input(cfg, model))
    for tokens, label in zip(batch["tokens"], batch["label"]):
      assert any(np.array_equal(tokens, row) for row in want(captions_for(int(label)), context_length=32)), given
    (hook,) = build_training_evaluators(cfg)
    np.testing.assert_array_equal(hook.prompt_tokens, want(prompt_texts(hook.class_names, hook.templates), 32))
    trainer.resolve_tokenizer(cfg)  # what the run's config record then says
    assert cfg.data.tokenizer == (given or hf_own_tokenizer)
  assert "assuming" not in capsys.readouterr().out


def test_a_folder_that_states_no_tokenizer_says_clip_is_assumed(init_sources, tmp_path, capsys):
  """A Hugging Face folder without tokenizer files: 'clip', said in one line in training and in evaluation
  alike (nothing said when the user names the tokenizer, or for a bare state dict: OpenAI's convention)."""
  from clip_jax import evaluate, train as trainer
  from tests.test_train import tiny_config
  hf = init_sources["hf"]
  cfg = tiny_config(**{"init.checkpoint": hf})
  trainer.resolve_tokenizer(cfg)
  assert cfg.data.tokenizer == "clip"
  (line,) = capsys.readouterr().out.splitlines()
  assert line == (f"init.checkpoint {hf}: states no tokenizer and holds no tokenizer files (tokenizer.json, "
                  "vocab.json + merges.txt): assuming OpenAI's CLIP BPE ('clip'); if the model was trained with "
                  "another, pass --config.data.tokenizer=DIR.")
  evaluate._say_once.cache_clear()
  assert evaluate.tokenizer_for(None, hf, 32)[1] == "clip"
  assert capsys.readouterr().out.splitlines() == [line.replace("init.checkpoint ", "").replace(
      "--config.data.tokenizer=DIR", "--tokenizer DIR")]
  for overrides in ({"init.checkpoint": hf, "data.tokenizer": "clip"},
                    {"init.checkpoint": init_sources["open_clip.pt"]}):
    cfg = tiny_config(**overrides)
    trainer.resolve_tokenizer(cfg)
    assert cfg.data.tokenizer == "clip" and capsys.readouterr().out == ""
  # An open_clip folder whose config names no tokenizer states open_clip's default, OpenAI's BPE: nothing said.
  plain = tmp_path / "plain_open_clip"
  plain.mkdir()
  (plain / "open_clip_config.json").write_text('{"model_cfg": {"text_cfg": {"context_length": 77}}}')
  cfg = tiny_config(**{"init.checkpoint": str(plain)})
  trainer.resolve_tokenizer(cfg)
  assert cfg.data.tokenizer == "clip" and capsys.readouterr().out == ""
  # An open_clip folder naming a hub tokenizer (text_cfg.hf_tokenizer_name) needs its files: one line.
  hub = tmp_path / "hub"
  hub.mkdir()
  (hub / "open_clip_config.json").write_text('{"model_cfg": {"text_cfg": {"hf_tokenizer_name": "me/tok"}}}')
  with pytest.raises(ValueError, match=r"names the tokenizer 'me/tok' \(text_cfg.hf_tokenizer_name\), but the folder "
                     r"holds no tokenizer files .* pass --config.data.tokenizer=DIR"):
    trainer.resolve_tokenizer(tiny_config(**{"init.checkpoint": str(hub)}))
  _write_other_bpe(hub)
  cfg = tiny_config(**{"init.checkpoint": f"local-dir:{hub}"})
  trainer.resolve_tokenizer(cfg)
  assert cfg.data.tokenizer == str(hub)


@pytest.mark.slow  # a training run and a zero-shot evaluation
def test_evaluating_the_workdir_tokenizes_as_training_did(hf_own_tokenizer, tmp_path):
  """`clip_jax.evaluate --workdir` tokenized with 'clip' whatever the run trained with; now with the
  tokenizer the run's config records (the init folder's own here), also for WORKDIR/checkpoints/STEP."""
  import json
  from clip_jax import evaluate
  from clip_jax.tokenizer import get_tokenizer
  run = tmp_path / "run"
  _train(run, **{"init.checkpoint": hf_own_tokenizer})
  assert json.loads((run / "config.json").read_text())["data"]["tokenizer"] == hf_own_tokenizer
  assert evaluate.main(["--workdir", str(run), "--tasks", "zeroshot:digits", "--limit", "16", "--batch-size", "16",
                        "--out", str(tmp_path / "eval")]) == 0
  assert json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]["tokenizer"] == hf_own_tokenizer
  texts = ["a photo of the number seven.", "8"]
  for path in (run, run / "checkpoints" / "1"):
    tokenizer, spec = evaluate.tokenizer_for(None, str(path), 32)
    assert spec == hf_own_tokenizer
    np.testing.assert_array_equal(tokenizer(texts), get_tokenizer(hf_own_tokenizer, context_length=32)(texts))


# ----------------------------------------------------------------------------- the trainer
def _train(workdir, evaluators=None, **overrides):
  """train_and_evaluate on a tiny synthetic config over a (data 2, fsdp 4) mesh; lr 0 by default."""
  from clip_jax import train as trainer
  from tests.test_train import tiny_config
  cfg = tiny_config(**{"total_steps": 1, "optimizer.learning_rate": 0.0, "optimizer.warmup_steps": 0,
                       "mesh.data": 2, "mesh.fsdp": 4, "checkpoint_every": 1, **overrides})
  return trainer.train_and_evaluate(cfg, str(workdir), evaluators)


def _host_params(out):
  return traverse_util.flatten_dict(jax.device_get(out["state"]["params"]))


@pytest.mark.slow  # three tiny training runs (compiling each)
@pytest.mark.parametrize("kind", ["open_clip.pt", "hf", "workdir"])
def test_lr0_step_keeps_the_loaded_checkpoint_bitwise(init_sources, tmp_path, kind):
  out = _train(tmp_path / "run", **{"init.checkpoint": init_sources[kind]})
  assert out["step"] == 1
  params = _host_params(out)
  for key, want in traverse_util.flatten_dict(init_sources["variables"]["params"]).items():
    np.testing.assert_array_equal(params[key], want, err_msg=str(key))


@pytest.mark.slow  # a training run plus two zero-shot evaluations
def test_zeroshot_at_step0_equals_the_evaluation_cli(init_sources, tmp_path):
  """With learning rate 0 the model after step 1 is the checkpoint (previous test), so the
  trainer's zero-shot hook there reports step 0's accuracy; the evaluation CLI gives the same."""
  import json
  from clip_jax import evaluate
  from clip_jax.eval.zeroshot import build_training_evaluators
  from tests.test_train import tiny_config
  cfg = tiny_config(**{"init.checkpoint": init_sources["open_clip.pt"]})
  cfg.zeroshot_eval = ml_collections.ConfigDict(dict(enabled=True, source="digits", split="test", batch_size=64,
                                                     limit=128))
  out = _train(tmp_path / "run", build_training_evaluators(cfg),
               **{"init.checkpoint": init_sources["open_clip.pt"], "eval_every": 1})
  assert evaluate.main(["--checkpoint", init_sources["open_clip.pt"], "--model-name", "ViT-Tiny", "--tasks",
                        "zeroshot:digits", "--limit", "128", "--batch-size", "64", "--out", str(tmp_path / "eval")]) == 0
  cli = json.load(open(tmp_path / "eval" / "results.json"))["results"][0]["metrics"]
  for metric in ("top1", "top5", "mean_per_class"):
    assert out["eval"][f"zeroshot/digits/{metric}"] == cli[metric], metric


@pytest.mark.slow  # two short training runs
def test_lock_image_trains_only_the_text_tower_and_resume_wins(init_sources, tmp_path):
  run = tmp_path / "lit"
  out = _train(run, **{"init.checkpoint": init_sources["open_clip.pt"], "lock_image": True, "total_steps": 3,
                       "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 1, "checkpoint_every": 3})
  params, loaded = _host_params(out), traverse_util.flatten_dict(init_sources["variables"]["params"])
  for key, want in loaded.items():
    if key[0] == "visual":
      np.testing.assert_array_equal(params[key], want, err_msg=str(key))
  assert all(not np.array_equal(params[k], v) for k, v in loaded.items() if k[0] == "text")
  trainable = sum(v.size for k, v in loaded.items() if k[0] != "visual")
  moments = sum(x.size for x in jax.tree.leaves(out["state"]["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating))
  assert moments == 2 * trainable  # Adam's mu and nu for the text tower and temperature only
  # The workdir's own checkpoint wins over init (here a path that does not even exist).
  again = _train(run, **{"init.checkpoint": "/nonexistent.pt", "lock_image": True, "total_steps": 4,
                         "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 1, "checkpoint_every": 4})
  assert again["step"] == 4
  resumed = _host_params(again)
  for key in loaded:
    if key[0] == "visual":
      np.testing.assert_array_equal(resumed[key], loaded[key], err_msg=str(key))


def test_init_mistakes_are_one_line_before_anything_compiles(init_sources, tmp_path):
  """A wrong path, another architecture, a stated GELU/QuickGELU mismatch: a UserError each (the
  CLI prints it as one line), raised before the state's init function is compiled."""
  from clip_jax.cli import UserError
  compiled = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name"))
  wide = tmp_path / "wide.pt"
  torch.save(_tiny_open_clip_like_vit_tiny(vision_width=128).state_dict(), wide)
  cases = [({"init.checkpoint": "/nonexistent.pt"}, "init.checkpoint /nonexistent.pt: no such file or directory"),
           ({"init.checkpoint": str(wide)}, r"parameter visual/class_embedding has shape \(128,\)"),
           ({"init.checkpoint": init_sources["open_clip.pt"], "init.act": "quick_gelu"},
            r"activation is quick_gelu \(as init.act / init.model_name state\), but the configured model uses gelu")]
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i, (overrides, message) in enumerate(cases):
      with pytest.raises(UserError, match=message) as error:
        _train(tmp_path / f"run{i}", **overrides)
      assert "\n" not in str(error.value)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "init" not in compiled, compiled


@pytest.mark.slow  # a trainer child process (8 s); test_cli_errors keeps the one-line rule fast
def test_cli_reports_an_init_mistake_in_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py:runlocal",
                         f"--workdir={tmp_path / 'run'}", "--config.init.checkpoint=/nonexistent.pt"],
                        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == ["error: init.checkpoint /nonexistent.pt: no such file or directory."]


def test_paper_vit_l14_336_is_one_more_epoch_from_a_vit_l14(tmp_path):
  """configs/clip/paper.py:ViT-L-14-336: one epoch (400M / 32,768 steps) at lr 2e-5 from a
  ViT-L/14 checkpoint that the user must give; the 224 px grid (16 x 16) becomes 24 x 24."""
  from clip_jax import pretrained, resize
  from clip_jax.cli import UserError
  from clip_jax.models.configs import MODEL_CONFIGS
  from configs.clip import paper
  cfg = paper.get_config("ViT-L-14-336")
  assert cfg.model.name == "ViT-L-14-336-quickgelu"
  assert cfg.optimizer.learning_rate == 2e-5
  assert cfg.total_steps == cfg.optimizer.total_steps == 400_000_000 // 32768
  assert cfg.init.model_name == "ViT-L-14-quickgelu"
  with pytest.raises(UserError, match="give --config.init.checkpoint=PATH"):
    pretrained.init_from_config(cfg.init, str(tmp_path), MODEL_CONFIGS[cfg.model.name])
  small, large = MODEL_CONFIGS["ViT-L-14"].vision, MODEL_CONFIGS["ViT-L-14-336"].vision
  assert (resize.grid_size(small, small.image_size), resize.grid_size(large, large.image_size)) == (16, 24)
  assert paper.get_config("ViT-L-14").init.checkpoint == ""  # the others start from scratch


def test_demo_configs():
  """configs/clip/digits_finetune.py: 48 px fine-tuning and LiT, both from the digits workdir."""
  from configs.clip import digits_finetune
  res48, lit = digits_finetune.get_config("res48"), digits_finetune.get_config("lit")
  assert res48.model.overrides.vision.image_size == 48 and not res48.lock_image
  assert lit.lock_image and lit.init.dont_load == "^text/"
  assert res48.init.checkpoint == lit.init.checkpoint == "workdirs/digits"
  assert digits_finetune.get_config("lit,runlocal").total_steps == 4
  with pytest.raises(ValueError, match="unknown variant"):
    digits_finetune.get_config("lit48")


def test_a_run_resumes_with_the_tokenizer_its_record_names(hf_own_tokenizer, tmp_path, capsys, monkeypatch):
  """A workdir whose record (written before init folders' own tokenizers were used) says 'clip' resumes
  with 'clip' from that folder, not refused as a changed setting; an explicit tokenizer is the user's
  (a relative path made absolute); what an init folder states but training does not apply
  (init.stated_preprocessing) is no reason to refuse a resume or a finished run's check."""
  import json
  from clip_jax import loop, train as trainer
  from tests.test_train import tiny_config
  workdir = tmp_path / "run"
  cfg = tiny_config(**{"init.checkpoint": hf_own_tokenizer})
  old = json.loads(cfg.to_json_best_effort())
  old["data"]["tokenizer"] = "clip"
  os.makedirs(workdir / "checkpoints" / "2")
  (workdir / "config.json").write_text(json.dumps(old))
  trainer.resolve_tokenizer(cfg, str(workdir))
  assert cfg.data.tokenizer == "clip"
  with cfg.unlocked():
    cfg.init.stated_preprocessing = "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5], bicubic, resize squash"
  assert loop.check_workdir(str(workdir), cfg, total_steps=cfg.total_steps) is False  # resumes, nothing refused
  fresh = tiny_config(**{"init.checkpoint": hf_own_tokenizer})
  trainer.resolve_tokenizer(fresh, str(tmp_path / "new"))  # no record: the folder's own
  assert fresh.data.tokenizer == hf_own_tokenizer
  monkeypatch.chdir(os.path.dirname(hf_own_tokenizer))
  given = tiny_config(**{"data.tokenizer": os.path.basename(hf_own_tokenizer)})
  trainer.resolve_tokenizer(given, str(workdir))
  assert given.data.tokenizer == hf_own_tokenizer  # absolute; the user's wins over the record
  assert capsys.readouterr().out == ""
