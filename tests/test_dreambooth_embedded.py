"""The embedded DreamBooth default end to end, at smoke-test size: pretrain the tiny SD on the digits
for a couple of steps, then the Table 3 experiment (both fine-tunes, generation, metrics, files)."""
import glob
import json
import os

import numpy as np
import pytest

from dreambooth_jax.embedded import pretrain, table3


def test_subject_is_red_and_shifted():
  images = table3.subject_images(32)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  assert table3.red_ink_fraction(images) > 0.9
  assert len({image.tobytes() for image in images}) == 4  # four distinct "poses"
  grey = pretrain.load_digits(32)[0][:8]
  assert table3.red_ink_fraction(np.round((grey + 1) * 127.5).astype(np.uint8)) == 0.0


def test_cosine_diversity_matches_pairs():
  emb = np.random.default_rng(0).normal(size=(5, 7))
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  expected = np.mean([1 - unit[i] @ unit[j] for i in range(5) for j in range(i + 1, 5)])
  np.testing.assert_allclose(table3.cosine_diversity(emb), expected, rtol=1e-6)


def test_digit_classifier_reads_heldout_scans_and_checks_shapes():
  from dreambooth_jax.eval import digit_classifier
  judge, accuracy = digit_classifier.default_judge()
  assert accuracy >= 0.97  # 359/359 held-out scans at the time of writing
  images, labels = digit_classifier.digit_images("test")
  blank = np.ones_like(images[:3])
  assert np.mean(digit_classifier.classify(images) == labels) == accuracy
  assert digit_classifier.classify(blank).shape == (3,)
  with pytest.raises(ValueError, match="multiples of 8"):
    digit_classifier.ink_features(np.ones((2, 30, 30, 3)))


def test_pretrain_cli_rejects_bad_steps(tmp_path):
  with pytest.raises(SystemExit):
    pretrain.main(["--workdir", str(tmp_path), "--vae_steps", "0"])


@pytest.mark.slow
def test_pretrain_then_table3_smoke(tmp_path):
  cfg = pretrain.get_config()
  cfg.vae.steps, cfg.unet.steps, cfg.batch_size = 2, 2, 4
  cfg.sample.steps, cfg.sample.per_prompt = 2, 1
  base = pretrain.pretrain(cfg, str(tmp_path / "base"), progress=False)
  assert os.path.isfile(os.path.join(base["export_dir"], "model_index.json"))
  assert os.path.isfile(base["samples"]) and base["vae_scaling_factor"] > 0
  from PIL import Image
  assert Image.open(base["samples"]).height > 10 * 256  # a labelled row per prompt, 32 px enlarged 8x
  files = lambda: {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "base" / "**" / "*"), recursive=True)  # noqa: E731
                   if os.path.isfile(p)}
  before = files()
  assert pretrain.pretrain(cfg, str(tmp_path / "base"), progress=False) == base  # finished: left as it is
  assert files() == before

  result = table3.run(str(tmp_path / "t3"), pretrain_dir=str(tmp_path / "base"), images_per_prompt=2,
                      config_args="runlocal", progress=False)
  assert set(result["rows"]) == {"base", "no prior preservation", "prior preservation"}
  for row in result["rows"].values():
    assert all(np.isfinite(v) for v in row.values())
    assert -1.0 <= row["subject_fidelity"] <= 1.0 and -1.0 <= row["pres"] <= 1.0
  with open(result["paths"]["json"]) as f:
    assert json.load(f)["meta"]["class_prompt"] == "a seven"
  table = open(result["paths"]["markdown"]).read()
  assert "| prior preservation |" in table and "PRES" in table
  for path in result["grids"].values():
    assert os.path.isfile(path)
  assert len(os.listdir(tmp_path / "t3" / "runs" / "prior" / "class_images")) == 4
