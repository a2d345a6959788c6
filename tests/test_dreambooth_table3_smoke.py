"""The embedded Table 3 experiment end to end at smoke size: a base pretrained for a few steps, both
fine-tunes for two seeds, generation, every metric column, the table and the files. What the numbers
mean needs the full runs (benchmarks/results/); here every column is computed and written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dreambooth_jax.embedded import pretrain, table3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_table3_smoke_on_a_few_step_base(tmp_path):
  # A 4-step digits CLIP gives the frozen text encoder and the CLIP metrics; the base is 2 VAE and
  # 2 UNet steps on two digits (its prompt accuracy is near chance: only its plumbing is used).
  clip_dir = str(tmp_path / "clip")
  subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py:runlocal",
                  f"--workdir={clip_dir}"], check=True, cwd=REPO)
  cfg = pretrain.get_config()
  cfg.digits = (0, 7)
  cfg.vae.steps, cfg.unet.steps = 2, 2
  cfg.text_init = clip_dir
  cfg.sample.per_prompt = 2
  base = pretrain.pretrain(cfg, str(tmp_path / "base"), progress=False)

  result = table3.run(str(tmp_path / "t3"), pretrain_dir=str(tmp_path / "base"), images_per_prompt=2,
                      config_args="runlocal", progress=False, seeds=(0, 1), clip=clip_dir)
  assert set(result["summary"]) == {"base", "no prior preservation", "prior preservation"}
  assert len(result["per_seed"]) == 2 and len(result["meta"]["identifiers"]) == 2
  assert result["meta"]["base_prompt_accuracy"] == base["prompt_accuracy"]["overall"]
  for row in result["summary"].values():
    assert set(row) == {key for key, _ in table3.COLUMNS} | {"class_div_vae"}
    for stat in row.values():
      assert len(stat["values"]) == 2 and np.isfinite(stat["mean"]) and stat["sd"] >= 0.0
    assert -1.0 <= row["clip_i"]["mean"] <= 1.0 and -1.0 <= row["pres_clip"]["mean"] <= 1.0
  with open(result["paths"]["json"]) as f:
    assert json.load(f)["meta"]["class_prompt"] == "a seven"
  table = open(result["paths"]["markdown"]).read()
  assert "| prior preservation |" in table and "PRES (CLIP)" in table and " ± " in table
  assert "| paper: Imagen without prior preservation |" in table
  for path in result["grids"].values():
    assert os.path.isfile(path)
  assert len(os.listdir(tmp_path / "t3" / "runs" / "seed1" / "prior" / "class_images")) == 4
