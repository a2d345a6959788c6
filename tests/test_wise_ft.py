"""WiSE-FT (clip_jax.wise_ft): exact endpoints, the mix rule, refusals, and the CLI against the
evaluation CLI on each input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import convert, evaluate, wise_ft
from clip_jax.weights import save_safetensors


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(3, 4)).astype(np.float32),
                     "h": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
                     "logit_scale": np.float32(rng.normal())},
          "batch_stats": {"mean": rng.normal(size=(4,)).astype(np.float32)}}


def test_endpoints_are_exact_and_the_middle_is_the_mix():
  zs, ft = _tree(0), _tree(1)
  flat = lambda t: jax.tree_util.tree_leaves_with_path(t)  # noqa: E731
  for alpha, expected in ((0.0, zs), (1.0, ft)):
    for (path, got), (_, want) in zip(flat(wise_ft.interpolate(zs, ft, alpha)), flat(expected)):
      assert np.asarray(got).dtype == np.asarray(want).dtype, path
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
  mid = wise_ft.interpolate(zs, ft, 0.25)
  np.testing.assert_allclose(mid["params"]["w"], 0.75 * zs["params"]["w"] + 0.25 * ft["params"]["w"], rtol=1e-6)


def test_mismatched_pairs_are_refused():
  zs, ft = _tree(0), _tree(1)
  ft["params"]["w"] = ft["params"]["w"][:, :3]
  with pytest.raises(ValueError, match=r"params/w has shape \(3, 4\) in --zeroshot, \(3, 3\) in --finetuned"):
    wise_ft.interpolate(zs, ft, 0.5)
  del ft["params"]["w"]
  with pytest.raises(ValueError, match="params/w is only in --zeroshot"):
    wise_ft.interpolate(zs, ft, 0.5)
  tiny = clip_jax.create_model("ViT-Tiny")
  other = clip_jax.create_model("ViT-Tiny", vision={"width": 128}, act="quick_gelu")
  with pytest.raises(ValueError, match=r"different architectures \(vision.width 64 vs 128; act gelu vs quick_gelu\)"):
    wise_ft.align_pair((tiny, {}), (other, {}))
  with pytest.raises(ValueError, match="every alpha must be in"):
    wise_ft.parse_alphas("0,1.5")
  with pytest.raises(ValueError, match="names no alpha"):
    wise_ft.parse_alphas(" , ")
  # Only what a bare state dict's loading assumes differs: the line says how to state it.
  assumed = clip_jax.create_model("ViT-Tiny", text={"heads": 1}, act="quick_gelu")
  with pytest.raises(ValueError,
                     match=r"text.heads 2 vs 1; act gelu vs quick_gelu\); .* give --model-name \(or --act\) for it"):
    wise_ft.align_pair((tiny, {}), (assumed, {}))
  with pytest.raises(ValueError, match="one architecture.$"):  # no such hint for other differences
    wise_ft.align_pair((tiny, {}), (other, {}))
  # A Hugging Face start (its config states the end token, 49407) and a fine-tune of it under a named
  # architecture (argmax pooling) pool at the same token: a new user's pair was refused for it.
  hf_like = clip_jax.create_model("ViT-Tiny", text={"eot_token_id": tiny.config.text.vocab_size - 1})
  assert wise_ft.align_pair((hf_like, {}), (tiny, {})) == ((hf_like, {}), None)
  added_tokens = clip_jax.create_model("ViT-Tiny", text={"eot_token_id": 2})
  with pytest.raises(ValueError, match=r"text.eot_token_id 2 vs None"):
    wise_ft.align_pair((added_tokens, {}), (tiny, {}))


def _save_random_tiny(path, seed, **overrides):
  model = clip_jax.create_model("ViT-Tiny", **overrides)
  variables = clip_jax.init_variables(model, jax.random.key(seed))
  save_safetensors(convert.export_openai_state_dict(model, variables), str(path))
  return str(path)


@pytest.mark.slow  # four evaluations of a tiny model
def test_cli_endpoints_equal_the_evaluation_cli(tmp_path, capsys):
  """alpha 0 and 1 give the evaluation CLI's numbers on each input; the table and plot are written;
  a pair of another architecture is one error line."""
  a, b = _save_random_tiny(tmp_path / "a.safetensors", 0), _save_random_tiny(tmp_path / "b.safetensors", 1)
  common = ["--tasks", "zeroshot:digits", "--limit", "64", "--batch-size", "64", "--model-name", "ViT-Tiny"]
  assert wise_ft.main(["--zeroshot", a, "--finetuned", b, "--alphas", "0,0.5,1", "--out", str(tmp_path / "w"),
                       "--export-alphas", "0.5", *common]) == 0
  out = json.load(open(tmp_path / "w" / "results.json"))
  assert [r["alpha"] for r in out["rows"]] == [0.0, 0.5, 1.0]
  # The chosen mix, exported (a new user had to write their own code for it): it loads back as the mix and
  # evaluates to the table's number.
  exported = out["rows"][1]["export"]
  assert exported == str(tmp_path / "w" / "alpha_0.5" / "export") and "export" not in out["rows"][0]
  (zs_model, zs_vars), (_, ft_vars) = (evaluate.load_model(p, "ViT-Tiny", None) for p in (a, b))
  mix = wise_ft.interpolate(jax.device_get(zs_vars), jax.device_get(ft_vars), 0.5)
  for x, y in zip(jax.tree.leaves(convert.load_checkpoint(exported)[1]), jax.tree.leaves(mix)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert evaluate.main(["--checkpoint", exported, "--out", str(tmp_path / "e_mix"), *common[:-2]]) == 0
  assert json.load(open(tmp_path / "e_mix" / "results.json"))["results"][0]["metrics"] == out["results"][1][0]["metrics"]
  assert wise_ft.main(["--zeroshot", a, "--finetuned", b, "--alphas", "0,1", "--export-alphas", "0.5", "--out",
                       str(tmp_path / "bad"), *common]) == 2  # an alpha not evaluated: one line
  assert (tmp_path / "w" / "plots" / "wise_ft.png").stat().st_size > 0
  assert "| alpha |" in (tmp_path / "w" / "results.md").read_text()
  for alpha, path in ((0.0, a), (1.0, b)):
    assert evaluate.main(["--checkpoint", path, "--out", str(tmp_path / f"e{alpha}"), *common]) == 0
    reference = json.load(open(tmp_path / f"e{alpha}" / "results.json"))["results"][0]["metrics"]
    ours = out["results"][out["rows"].index(next(r for r in out["rows"] if r["alpha"] == alpha))][0]["metrics"]
    assert ours == reference, alpha

  capsys.readouterr()
  c = _save_random_tiny(tmp_path / "c.safetensors", 2, vision={"width": 128})
  assert wise_ft.main(["--zeroshot", a, "--finetuned", c, "--out", str(tmp_path / "x"), "--tasks",
                       "zeroshot:digits"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "different architectures (vision.width 64 vs 128" in err[0], err
  assert not (tmp_path / "x").exists()


def test_an_export_format_the_pair_cannot_take_is_refused_before_any_evaluation(tmp_path, capsys, monkeypatch):
  # Raised after the first alpha's evaluation, it lost that evaluation (and stranded the other processes).
  resnet = clip_jax.create_model("RN-Tiny")
  monkeypatch.setattr(evaluate, "load_model", lambda *a: (resnet, {"params": {}}))
  monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing"))
  assert wise_ft.main(["--zeroshot", "a.pt", "--finetuned", "b.pt", "--tasks", "zeroshot:digits", "--out",
                       str(tmp_path / "o"), "--export-alphas", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "ResNet image tower" in err[0] and "--export-format open_clip" in err[0], err


def test_act_for_two_folders_is_one_line_not_ignored(tmp_path, capsys, monkeypatch):
  # --act describes bare state-dict files; with both models folders it applied to nothing and was dropped
  # silently (evaluate, draw and export refuse it on a folder): now one line, before anything loads.
  monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("loaded a model"))
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  assert wise_ft.main(["--zeroshot", str(tmp_path / "a"), "--finetuned", str(tmp_path / "b"), "--act", "gelu",
                       "--tasks", "zeroshot:digits", "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--act applies to bare state-dict files" in err[0] and "are directories" in err[0], err


def test_a_zero_shot_side_stating_other_preprocessing_is_said_and_recorded(tmp_path, capsys, monkeypatch):
  # Every mix is evaluated with the zero-shot checkpoint's stated preprocessing; a fine-tune trained
  # here preprocessed as OpenAI's, so alpha 1 is not evaluated as it would be alone: said, and recorded.
  model = clip_jax.create_model("ViT-Tiny")
  monkeypatch.setattr(evaluate, "load_model", lambda *a: (model, {"params": {}}))
  monkeypatch.setattr(wise_ft, "align_pair", lambda zs, ft: (zs, None))
  monkeypatch.setattr(wise_ft, "interpolate", lambda zs, ft, alpha: zs)
  monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: {"results": []})
  zeroshot = tmp_path / "siglip_like"
  zeroshot.mkdir()
  (zeroshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {
      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}}))
  assert wise_ft.main(["--zeroshot", str(zeroshot), "--finetuned", "b.pt", "--tasks", "zeroshot:digits",
                       "--alphas", "0,1", "--out", str(tmp_path / "o")]) == 0
  out = capsys.readouterr().out
  assert (f"every mix is evaluated with {zeroshot}'s image preprocessing (mean [0.5, 0.5, 0.5], std [0.5, 0.5, "
          "0.5], bicubic, resize squash); b.pt states mean") in out
  meta = json.load(open(tmp_path / "o" / "results.json"))["meta"]
  assert meta["preprocessing"]["resize_mode"] == "squash" and meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
