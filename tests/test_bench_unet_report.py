"""benchmarks/bench_unet_step.py's table: one cell per column in every row, and the one-step memory ratio
(the issue-15 goal's 'at <= diffusers' peak memory' compares what one step holds)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_unet_step  # noqa: E402

GIB = 2 ** 30


def _round(step_s, one_step_gib, peak_gib):
  return {"step_s": step_s, "times_s": [step_s], "peak_rss_bytes": peak_gib * GIB, "rss_before_bytes": 4 * GIB,
          "first_timed_step_peak_rss_bytes": one_step_gib * GIB, "first_step_s": 8.0, "version": "test"}


def test_table_rows_fill_every_column_and_compare_one_step_memory(tmp_path):
  args = bench_unet_step._parse_args(["--variants", "jax_bf16,torch_bf16,jax_fp32"])
  results = {"jax_bf16": [_round(3.5, 7.8, 9.9)], "torch_bf16": [_round(3.2, 8.0, 8.2)],
             "jax_fp32": [{"error": "out of memory"}]}
  path = tmp_path / "unet.md"
  bench_unet_step._write_markdown(args, results, ("1.00 / 1.00 / 1.00", "1.00 / 1.00 / 1.00"), str(path))
  rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
  header, rule, *body = rows
  columns = header.count("|")
  assert rule.count("|") == columns and all(row.count("|") == columns for row in body)
  cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in body[0].split("|")]))
  assert cells["variant"] == "jax_bf16" and cells["one step vs torch_bf16"] == "0.97x"  # 7.8 / 8.0
  assert cells["vs torch_bf16"] == "1.21x" and cells["vs diffusers (torch_bf16)"] == "0.91x"
  assert "failed: out of memory" in body[2]


def test_gpu_memory_ratio_compares_xla_buffers_with_torch_max_allocated(tmp_path):
  """On GPU our allocator peak holds what autotuning borrowed while compiling (55.5 GiB against XLA's
  13.5 GiB for the SD UNet step on an H200), so the device ratio must use the step's buffer assignment."""
  args = bench_unet_step._parse_args(["--variants", "jax_bf16,torch_bf16", "--device", "gpu"])
  ours = dict(_round(0.1006, 6.02, 6.02), xla_bytes=13.52 * GIB, device_peak_bytes=55.54 * GIB, lower_s=4.5,
              compile_s=56.6, cached_compile_s=1.5)
  theirs = dict(_round(0.1186, 1.91, 1.91), device_peak_bytes=14.32 * GIB)
  path = tmp_path / "unet.md"
  bench_unet_step._write_markdown(args, {"jax_bf16": [ours], "torch_bf16": [theirs]},
                                  ("0.00 / 0.00 / 0.00", "4.51 / 2.61 / 1.08"), str(path))
  rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
  header, _, *body = rows
  cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in body[0].split("|")]))
  assert cells["vs torch_bf16"] == "0.94x (device)"  # 13.52 / 14.32, not 55.54 / 14.32
  assert cells["one step vs torch_bf16"] == "3.15x (host)"
  assert cells["vs diffusers (torch_bf16)"] == "1.18x"


def test_lora_rows_are_compared_with_diffusers_lora_row(tmp_path):
  args = bench_unet_step._parse_args(["--variants", "jax_bf16,torch_bf16,jax_bf16_lora,torch_bf16_lora"])
  results = {"jax_bf16": [_round(2.0, 4.0, 4.0)], "torch_bf16": [_round(3.0, 5.0, 5.0)],
             "jax_bf16_lora": [_round(1.5, 3.0, 3.0)], "torch_bf16_lora": [_round(2.5, 2.0, 2.0)]}
  path = tmp_path / "unet.md"
  bench_unet_step._write_markdown(args, results, ("1.00 / 1.00 / 1.00", "1.00 / 1.00 / 1.00"), str(path))
  text = path.read_text()
  rows = [line for line in text.splitlines() if line.startswith("|")]
  header, _, *body = rows
  names = [c.strip() for c in header.split("|")]
  table = {row.split("|")[1].strip(): dict(zip(names, [c.strip() for c in row.split("|")])) for row in body}
  speed = "vs diffusers (torch_bf16 / torch_bf16_lora)"
  assert table["jax_bf16"][speed] == "1.50x"        # 3.0 / 2.0, against the full row
  assert table["jax_bf16_lora"][speed] == "1.67x"   # 2.5 / 1.5, against diffusers' LoRA row
  assert table["jax_bf16_lora"]["one step vs torch_bf16 / torch_bf16_lora"] == "1.50x"  # 3.0 / 2.0
  assert "--lora-rank 4" in text and "rank-4 LoRA adapter" in text


@pytest.mark.slow
def test_lora_workers_train_the_same_adapter_on_the_tiny_unet():
  """Both LoRA variants run (toy UNet, one timed step) and train adapters of the same size: ours from
  `lora.init_lora`'s default targets, diffusers' from PEFT's LoraConfig in the worker."""
  pytest.importorskip("peft")
  results = {}
  for worker in ("jax_bf16_lora", "torch_bf16_lora"):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_unet_step.py"), "--worker", worker,
                           "--unet", "tiny", "--size", "8", "--steps", "1", "--warmup", "1", "--threads", "1",
                           "--skip-cached-compile"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
  ours, theirs = results["jax_bf16_lora"], results["torch_bf16_lora"]
  assert ours["step_s"] > 0 and theirs["step_s"] > 0
  assert ours["trained_parameters"] == theirs["trained_parameters"] > 0
