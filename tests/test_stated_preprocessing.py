"""A checkpoint's own image preprocessing (open_clip's preprocess_cfg, transformers' image processor):
read by `convert.stated_preprocessing`, applied by `clip_jax.preprocess` and evaluation, equal to
open_clip's `create_model_and_transforms('local-dir:...')` preprocess + encode_image."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import convert, evaluate
from clip_jax.data.images import OPENAI, Preprocessing

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SQUASH = {**IMAGENET, "interpolation": "bilinear", "resize_mode": "squash"}


def _open_clip_folder(path, model, variables, preprocess_cfg):
  folder = convert.export_open_clip(model, variables, str(path))
  config_path = os.path.join(folder, "open_clip_config.json")
  config = json.loads(open(config_path).read())
  config["preprocess_cfg"] = preprocess_cfg
  open(config_path, "w").write(json.dumps(config))
  return folder


def _photos(directory=None):
  """Non-square RGB images (and, given a directory, the same as PNGs in two class folders)."""
  rng = np.random.default_rng(0)
  photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((45, 70), (90, 33), (37, 52))]
  if directory is not None:
    for i, photo in enumerate(photos):
      os.makedirs(os.path.join(directory, f"class{i % 2}"), exist_ok=True)
      photo.save(os.path.join(directory, f"class{i % 2}", f"{i}.png"))
  return photos


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow  # ~10 s: open_clip's model, our pipeline and the evaluation CLI on a ViT-Tiny
def test_an_open_clip_folder_stating_imagenet_bilinear_squash_embeds_as_open_clip(tmp_path, capsys, caplog):
  """A new user's folder (ImageNet mean/std, bilinear, squash) was evaluated with OpenAI's: pixels 3.98
  off, embeddings 1.27, zero-shot probabilities 0.13 against open_clip's own."""
  model = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(0))
  folder = _open_clip_folder(tmp_path / "oc", model, variables, SQUASH)
  reference, _, reference_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
  photos = _photos(tmp_path / "photos")
  with torch.no_grad():
    ref_pixels = torch.stack([reference_preprocess(photo) for photo in photos])
    ref_emb = _unit(reference.eval().encode_image(ref_pixels).numpy())

  preprocessing = convert.stated_preprocessing(folder)
  assert preprocessing == Preprocessing(IMAGENET["mean"], IMAGENET["std"], "bilinear", "squash")
  size = model.config.vision.image_size
  pixels = clip_jax.preprocess(photos, size, preprocessing)
  np.testing.assert_allclose(pixels, ref_pixels.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
  ours = _unit(np.asarray(model.apply(variables, pixels, method="encode_image")))
  np.testing.assert_allclose(ours, ref_emb, rtol=0, atol=1e-5)

  # The eval pipeline (zero-shot, probe and retrieval embed through it) with the folder's settings
  from clip_jax.data.sources import open_source
  from clip_jax.eval import embed
  from clip_jax.sharding import create_mesh
  mesh = create_mesh({"data": -1})
  source = open_source(str(tmp_path / "photos"), "test", labelled=True)
  batches = embed.image_batches(source, batch_size=8, image_size=size, mesh=mesh, preprocessing=preprocessing)
  features = embed.embed_images(model, variables, batches, len(source), mesh)
  order = [source.record_key(int(i)) for i in features.indices]
  expected = np.stack([ref_emb[int(os.path.splitext(os.path.basename(key))[0])] for key in order])
  np.testing.assert_allclose(features.features, expected, rtol=0, atol=1e-5)

  # The CLI says which preprocessing it uses (not the loader's "OpenAI's elsewhere" line) and records it
  caplog.clear()
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    rc = evaluate.main(["--checkpoint", f"local-dir:{folder}", "--tasks", f"zeroshot:mine={tmp_path / 'photos'}",
                        "--out", str(tmp_path / "out")])
  assert rc == 0
  printed = capsys.readouterr().out
  assert ("Image preprocessing: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], bilinear, resize squash, "
          "as ") in printed
  assert not [r for r in caplog.records if "states image preprocessing" in r.getMessage()]
  meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
  assert meta["preprocessing"] == {**SQUASH, "fill_color": 0}
  assert "- image preprocessing: mean [0.485, 0.456, 0.406]" in (tmp_path / "out" / "results.md").read_text()


def test_stated_preprocessing_reads_open_clip_and_transformers_settings(tmp_path, caplog):
  folder = tmp_path / "oc"
  folder.mkdir()
  config = folder / "open_clip_config.json"
  config.write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {
      "mean": 0.5, "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 128}}))
  assert convert.stated_preprocessing(str(folder)) == Preprocessing(0.5, 0.5, "bilinear", "longest", 128)
  assert convert.stated_preprocessing(f"local-dir:{folder}") == Preprocessing(0.5, 0.5, "bilinear", "longest", 128)
  config.write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {"mean": list(OPENAI.mean), "std": list(OPENAI.std)}}))
  assert convert.stated_preprocessing(str(folder)) == OPENAI  # what this project's open_clip export writes
  for bad, message in (({"interpolation": "lanczos"}, "interpolation 'lanczos' is not supported"),
                       ({"resize_mode": "crop"}, "resize_mode 'crop' is not supported"),
                       ({"mean": [0.5, 0.5]}, "mean must be 3 numbers")):
    config.write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": bad}))
    with pytest.raises(ValueError, match=message) as e:
      convert.stated_preprocessing(str(folder))
    assert "\n" not in str(e.value) and str(config) in str(e.value)
  assert "clip_jax.evaluate refuses it" in convert.stated_preprocessing_note(str(folder))  # loading still works

  hf = tmp_path / "hf"
  hf.mkdir()
  processor = hf / "preprocessor_config.json"
  processor.write_text(json.dumps(convert.image_processor_config(224)))  # what the HF export writes
  assert convert.stated_preprocessing(str(hf)) == OPENAI and convert.stated_preprocessing_note(str(hf)) is None
  siglip_like = {**convert.image_processor_config(224), "size": {"height": 224, "width": 224}, "resample": 2,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
  processor.write_text(json.dumps(siglip_like))
  caplog.clear()
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    assert convert.stated_preprocessing(str(hf)) == Preprocessing(0.5, 0.5, "bilinear", "squash")
  assert not caplog.records  # maps exactly
  processor.write_text(json.dumps({**convert.image_processor_config(224), "do_center_crop": False}))
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    assert convert.stated_preprocessing(str(hf)) == OPENAI
  (message,) = [r.getMessage() for r in caplog.records]
  assert "transformers would not centre-crop (do_center_crop false" in message and "\n" not in message
  processor.write_text(json.dumps({**convert.image_processor_config(224), "size": 256, "crop_size": 224}))
  caplog.clear()  # old processors' int size and crop_size: the crop is checked as the dict form's
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    convert.stated_preprocessing(str(hf))
  assert "resize the shortest side to 256 and crop 224" in caplog.text
  processor.write_text(json.dumps({"resample": 1}))
  with pytest.raises(ValueError, match="interpolation 'lanczos' is not supported"):
    convert.stated_preprocessing(str(hf))
  processor.unlink()  # transformers >= 5: CLIPProcessor.save_pretrained's file
  (hf / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.5, 0.5, 0.5],
                                                                           "resample": 2}}))
  assert convert.stated_preprocessing(str(hf)) == Preprocessing(0.5, OPENAI.std, "bilinear")
  bare = tmp_path / "weights.safetensors"
  bare.write_bytes(b"")
  assert convert.stated_preprocessing(str(bare)) == OPENAI  # a bare state dict states nothing: OpenAI's


def test_transformers_squash_equals_its_pil_image_processor(tmp_path):
  """size {height, width} maps exactly ('squash'), bilinear too, against transformers' PIL processor."""
  pil_processor = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
  config = {**convert.image_processor_config(32), "size": {"height": 32, "width": 32}, "resample": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
  processor = pil_processor.CLIPImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
  for photo in _photos():
    theirs = processor(photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = clip_jax.preprocess(photo, 32, convert.stated_preprocessing(str(tmp_path)))[0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_the_loader_says_who_applies_a_stated_preprocessing(tmp_path, caplog):
  """Loading for training, guidance or an export says those preprocess as OpenAI's; evaluation loads
  inside `applying_stated_preprocessing` and says what it uses instead."""
  folder = tmp_path / "siglip_like"
  folder.mkdir()
  (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {
      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}}))
  with caplog.at_level("WARNING"), pytest.raises(Exception):  # no weights: the loader's own error follows
    convert.load_checkpoint(str(folder))
  assert ("states image preprocessing mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5], bilinear, resize squash: "
          "`clip_jax.evaluate` and `clip_jax.preprocess(..., preprocessing=clip_jax.stated_preprocessing(PATH))` "
          "apply it") in caplog.text  # the public name, as the README's Python section uses (was convert.'s)
  assert "training, guidance (draw, edit) and DreamBooth's metrics preprocess as OpenAI's" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"), pytest.raises(Exception), convert.applying_stated_preprocessing():
    convert.load_checkpoint(str(folder))
  assert "states image preprocessing" not in caplog.text


def test_training_records_what_its_init_folder_states(tmp_path):
  import ml_collections

  from clip_jax import train
  folder = tmp_path / "oc"
  folder.mkdir()
  (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": SQUASH}))
  cfg = ml_collections.ConfigDict({"init": {"checkpoint": str(folder)}})
  cfg.lock()
  train.record_init_preprocessing(cfg)
  assert cfg.init.stated_preprocessing == ("mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], bilinear, "
                                           "resize squash (training preprocessed as OpenAI's CLIP)")
  plain = ml_collections.ConfigDict({"init": {"checkpoint": ""}})
  train.record_init_preprocessing(plain)
  assert "stated_preprocessing" not in plain.init  # OpenAI-preprocessed runs record nothing new


def test_exports_state_the_source_s_preprocessing(tmp_path):
  """`clip_jax.export` of a folder stating its own preprocessing wrote OpenAI's into the export (a model
  converted to HF through it shipped a wrong processor config); now both formats state the source's, and
  one transformers cannot state ('longest': pad to a square) is one line for --format hf."""
  from clip_jax import export
  model = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(0))
  source = _open_clip_folder(tmp_path / "src", model, variables, SQUASH)
  want = convert.stated_preprocessing(source)
  assert want == Preprocessing(IMAGENET["mean"], IMAGENET["std"], "bilinear", "squash")
  for fmt in ("hf", "open_clip"):
    out = export.export(source, str(tmp_path / fmt), fmt)
    assert convert.stated_preprocessing(out) == want, fmt
  plain = export.export(_open_clip_folder(tmp_path / "plain", model, variables, dict(IMAGENET)), str(tmp_path / "p"), "hf")
  assert json.load(open(os.path.join(plain, "preprocessor_config.json")))["size"] == {"shortest_edge": 32}
  padded = _open_clip_folder(tmp_path / "longest", model, variables, {**IMAGENET, "resize_mode": "longest"})
  from clip_jax.cli import UserError
  with pytest.raises(UserError, match=r"resize_mode 'longest'\), which transformers' CLIPImageProcessor cannot do: "
                     "export it with --format open_clip") as refused:
    export.main(["--checkpoint", padded, "--out", str(tmp_path / "x")])
  assert "\n" not in str(refused.value) and not (tmp_path / "x").exists()
  assert convert.stated_preprocessing(export.export(padded, str(tmp_path / "oc"), "open_clip")).resize_mode == "longest"


def test_a_folder_with_both_layouts_states_the_preprocessing_of_the_weights_loaded(tmp_path):
  # A hub repository of an open_clip model often holds transformers' files too; load_checkpoint reads it as
  # a CLIPModel folder, so its preprocessor_config.json, not open_clip_config.json, says how to preprocess.
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": SQUASH}))
  assert convert.stated_preprocessing(str(tmp_path)).resize_mode == "squash"  # open_clip's files alone
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(convert.image_processor_config(224)))
  assert convert.loads_as_hf_folder(str(tmp_path)) and convert.stated_preprocessing(str(tmp_path)) == OPENAI
