"""`python -m clip_jax.evaluate` on the user's own data agrees with LAION's clip_benchmark and with
open_clip's own zero-shot classifier, image by image, on identical random weights and data.

The checkpoint is a random open_clip model saved as a bare `.pt` state dict with exact GELU (as most
LAION checkpoints are); the data a folder of class sub-folders with user class names and prompt
templates. Predictions must be identical; the metrics equal clip_benchmark's to float precision.
Every image's top-2 score margin is checked to be far above the fp32 difference between the two
implementations (~1e-6), so an argmax cannot flip by rounding alone.
"""
import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax import evaluate as cli

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
torchvision = pytest.importorskip("torchvision")
zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
torch.set_num_threads(2)

CLASS_NAMES = ["red fox", "tabby cat", "garden snail", "sea lion", "paper kite", "steam train"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}", "{} in the wild."]
FOLDERS = ["fox", "cat", "snail", "sea_lion", "kite", "train"]  # sorted order != the names' order
MIN_MARGIN = 1e-4


def _random_open_clip(cfg: dict, seed: int):
  model = open_clip.model.CLIP(**cfg)  # quick_gelu defaults to False: exact GELU
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith("logit_scale"):
        tensor.fill_(np.log(1 / 0.07))
      elif tensor.dtype.is_floating_point:
        is_gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight"))
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.05 if tensor.ndim > 1 else 0.1) + float(is_gain))
  return model.eval()


def _vit_tiny_cfg():  # the shapes of clip_jax's named 'ViT-Tiny' (text heads 32 wide: only the name says so)
  return {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _wide_head_cfg():  # 64-wide heads everywhere, so shapes alone give the architecture but for the activation
  return {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
  """A class-folder dataset with images of varied sizes and aspect ratios, a class-name file in
  sorted folder order and a template file."""
  root = tmp_path_factory.mktemp("agreement")
  rng = np.random.default_rng(3)
  for folder in FOLDERS:
    os.makedirs(root / "images" / folder)
    for i in range(5):
      height, width = rng.integers(24, 80, 2)
      pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / "images" / folder / f"{i:03d}.png")
  by_folder = dict(zip(FOLDERS, CLASS_NAMES))
  (root / "classes.txt").write_text("\n".join(by_folder[f] for f in sorted(FOLDERS)) + "\n")
  (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
  return root


def _save(model, path) -> str:
  torch.save(model.state_dict(), path)
  return str(path)


def _cli(args, out):
  assert cli.main([*args, "--batch-size", "8", "--out", str(out)]) == 0
  report = json.loads((out / "results.json").read_text())
  (result,) = report["results"]
  with open(out / "predictions" / f"zeroshot_{result['dataset']}.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  return report, result, {row["key"]: int(row["prediction"]) for row in rows}


def _reference(model, root, class_names, templates):
  """clip_benchmark's zero-shot pass and open_clip's own classifier on torchvision's ImageFolder."""
  tokenizer = lambda texts: open_clip.tokenize(texts, context_length=32)  # noqa: E731
  preprocess = open_clip.image_transform(32, is_train=False)
  dataset = torchvision.datasets.ImageFolder(str(root), transform=preprocess)
  loader = torch.utils.data.DataLoader(dataset, batch_size=7)
  bench_classifier = zsc.zero_shot_classifier(model, tokenizer, class_names,
                                              [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
  logits, target = zsc.run_classification(model, bench_classifier, loader, "cpu", amp=False)
  own_classifier = open_clip.build_zero_shot_classifier(model, tokenizer, class_names, templates, device="cpu")
  with torch.no_grad():
    image_emb = torch.cat([torch.nn.functional.normalize(model.encode_image(x), dim=-1) for x, _ in loader])
  own_logits = image_emb @ own_classifier
  keys = [os.path.relpath(path, root) for path, _ in dataset.samples]
  return dataset, loader, logits, target, own_logits, keys, tokenizer


def _margins(logits) -> np.ndarray:
  top2 = np.sort(np.asarray(logits), axis=1)[:, -2:]
  return (top2[:, 1] - top2[:, 0]) / 100.0  # clip_benchmark's logits are 100 x cosine


def test_cli_predictions_equal_clip_benchmark_and_open_clip(user_data, tmp_path, monkeypatch):
  model = _random_open_clip(_vit_tiny_cfg(), seed=0)
  checkpoint = _save(model, tmp_path / "vit_tiny_gelu.pt")
  report, result, predicted = _cli(
      ["--checkpoint", checkpoint, "--model-name", "ViT-Tiny", "--tasks", f"zeroshot:mine={user_data / 'images'}",
       "--classnames", str(user_data / "classes.txt"), "--templates", str(user_data / "templates.txt")],
      tmp_path / "eval")
  assert report["meta"]["act"] == "gelu" and result["num_templates"] == 4 and result["num_classes"] == 6

  class_names = (user_data / "classes.txt").read_text().split("\n")[:-1]
  dataset, loader, logits, target, own_logits, keys, tokenizer = _reference(model, user_data / "images",
                                                                             class_names, TEMPLATES)
  assert _margins(logits).min() > MIN_MARGIN
  bench = logits.argmax(1).numpy()
  own = own_logits.argmax(1).numpy()
  ours = np.array([predicted[k] for k in keys])
  assert len(predicted) == len(keys) == 30
  np.testing.assert_array_equal(ours, bench)
  np.testing.assert_array_equal(ours, own)
  assert 0 < np.mean(bench == target.numpy()) < 1  # a random model: some right, some wrong

  # clip_benchmark's own metrics. Under numpy 2, its accuracy() calls float() on a one-element
  # array, which numpy no longer converts; the same computation with .item() stands in for it.
  def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item() / len(target) for k in topk]
  monkeypatch.setattr(zsc, "accuracy", accuracy)
  bench_metrics = zsc.evaluate(model, loader, tokenizer, class_names, [t.replace("{}", "{c}") for t in TEMPLATES],
                               "cpu", amp=False)
  metrics = result["metrics"]
  assert metrics["top1"] == pytest.approx(100 * bench_metrics["acc1"], abs=1e-9)
  assert metrics["top5"] == pytest.approx(100 * bench_metrics["acc5"], abs=1e-9)
  assert metrics["mean_per_class"] == pytest.approx(100 * bench_metrics["mean_per_class_recall"], abs=1e-9)


@pytest.mark.slow  # two CLI runs of a second model (~40 s on the shared box)
def test_bare_state_dict_activation_is_warned_about_and_set_by_act(user_data, tmp_path, caplog):
  model = _random_open_clip(_wide_head_cfg(), seed=1)
  checkpoint = _save(model, tmp_path / "wide_gelu.pt")
  task = ["--tasks", f"zeroshot:mine={user_data / 'images'}", "--classnames", str(user_data / "classes.txt"),
          "--templates", str(user_data / "templates.txt")]
  with caplog.at_level(logging.WARNING):
    assumed, _, _ = _cli(["--checkpoint", checkpoint, *task], tmp_path / "assumed")
  assert assumed["meta"]["act"] == "quick_gelu"
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("QuickGELU" in w for w in warnings), warnings

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    report, _, predicted = _cli(["--checkpoint", checkpoint, "--act", "gelu", *task], tmp_path / "gelu")
  assert report["meta"]["act"] == "gelu"
  assert not any("QuickGELU" in r.getMessage() for r in caplog.records)
  class_names = (user_data / "classes.txt").read_text().split("\n")[:-1]
  _, _, logits, _, own_logits, keys, _ = _reference(model, user_data / "images", class_names, TEMPLATES)
  assert _margins(logits).min() > MIN_MARGIN
  np.testing.assert_array_equal([predicted[k] for k in keys], own_logits.argmax(1).numpy())


def test_retrieval_recall_equals_clip_benchmark():
  """The same Recall@K definitions: clip_benchmark's 'image_retrieval_recall' is our text->image,
  its 'text_retrieval_recall' our image->text (an image is found when any of its captions is)."""
  from clip_jax.eval.retrieval import retrieval_metrics
  rng = np.random.default_rng(0)
  n, d = 30, 16
  image_emb = rng.normal(size=(n, d)).astype(np.float32)
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  text_image = np.repeat(np.arange(n), rng.integers(1, 6, n))
  text_emb = image_emb[text_image] + rng.normal(size=(len(text_image), d)).astype(np.float32)
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  ours = retrieval_metrics(image_emb, text_emb, text_image, ks=(1, 5, 10))
  scores = torch.from_numpy(text_emb @ image_emb.T)
  positive = torch.zeros_like(scores, dtype=torch.bool)
  positive[torch.arange(len(text_image)), torch.from_numpy(text_image)] = True
  for k in (1, 5, 10):
    text_to_image = (zsr.batchify(zsr.recall_at_k, scores, positive, 8, "cpu", k=k) > 0).float().mean().item()
    image_to_text = (zsr.batchify(zsr.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0).float().mean().item()
    assert ours[f"text_to_image/R@{k}"] == pytest.approx(100 * text_to_image, abs=1e-4)
    assert ours[f"image_to_text/R@{k}"] == pytest.approx(100 * image_to_text, abs=1e-4)
  assert 0 < ours["text_to_image/R@1"] < 100


def test_retrieval_recall_with_ties_is_clip_benchmarks_over_random_tie_orders():
  """Repeated captions (and duplicate images) tie exactly; clip_benchmark's torch.topk then takes the
  tied candidates in an arbitrary order. Ours is the expectation over random orders: here the mean of
  clip_benchmark's recall on scores whose ties are broken by random jitter (well below every real gap)."""
  from clip_jax.eval.retrieval import retrieval_metrics
  rng = np.random.default_rng(1)
  n, d = 12, 4
  image_emb = rng.normal(size=(n, d)).astype(np.float32)
  image_emb[7] = image_emb[3]  # a duplicate image
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  text_image = np.repeat(np.arange(n), rng.integers(1, 4, n))
  # Captions drawn from 4 strings: most captions repeat others, of other images too.
  strings = rng.normal(size=(4, d)).astype(np.float32)
  text_emb = strings[rng.integers(0, 4, len(text_image))]
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  ks = (1, 2, 5)
  ours = retrieval_metrics(image_emb, text_emb, text_image, ks=ks)
  scores = torch.from_numpy(text_emb @ image_emb.T).double()
  positive = torch.zeros_like(scores, dtype=torch.bool)
  positive[torch.arange(len(text_image)), torch.from_numpy(text_image)] = True
  trials, sums = 4000, {}
  generator = torch.Generator().manual_seed(0)
  for _ in range(trials):
    jittered = scores + 1e-9 * torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    for k in ks:
      t2i = (zsr.recall_at_k(jittered, positive, k) > 0).double().mean().item()
      i2t = (zsr.recall_at_k(jittered.T, positive.T, k) > 0).double().mean().item()
      sums[f"text_to_image/R@{k}"] = sums.get(f"text_to_image/R@{k}", 0.0) + 100 * t2i / trials
      sums[f"image_to_text/R@{k}"] = sums.get(f"image_to_text/R@{k}", 0.0) + 100 * i2t / trials
  for metric, value in sums.items():
    assert ours[metric] == pytest.approx(value, abs=1.5), (metric, ours, sums)
  # Every caption the same string: chance, K / n both ways (counting ties as found gave 100).
  same = retrieval_metrics(image_emb[:5] * 0 + np.eye(d, dtype=np.float32)[0], np.tile(strings[:1], (5, 1)),
                           np.arange(5), ks=(1, 2))
  assert same == pytest.approx({"image_to_text/R@1": 20.0, "image_to_text/R@2": 40.0,
                                "text_to_image/R@1": 20.0, "text_to_image/R@2": 40.0})
