"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; one JAX compilation
cache for the whole session."""
import os
import shutil
import tempfile

import pytest

# XLA:CPU's LLVM at -O2 rather than its default -O3: most of what these tiny tests spend is compile time,
# and -O2 compiles in a fraction of it (threefry's jax.random.normal for one new shape: ~5 s of CPU at -O3,
# ~0.6 s at -O2; the tiny open_clip ResNet tower's encode_image 7.7 vs 4.9 s) with the same values
# (both compared bitwise at both levels; no fast-math at either). -O0 would be faster still but
# changes values (jax.random.normal's erf_inv by an ulp). Subprocesses inherit the flag, except where a
# test sets its own XLA_FLAGS (those run at the default -O3).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep the reference PyTorch models off the network and single-threaded enough to share 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One persistent compilation cache for the session, shared by the xdist workers and every trainer they
# start: many tests and processes compile the same tiny models. A cache entry is keyed by the program
# (HLO), the compile options, the devices and the jax/jaxlib versions, so a hit is the executable a fresh
# compile would give. The trainers' default `compilation_cache='auto'` resolves under XDG_CACHE_HOME
# (clip_jax.loop.enable_compilation_cache; multi-process runs stay uncached there), so pointing it at
# the session's folder also keeps tests out of the user's ~/.cache. The first conftest import (the xdist
# controller, or a plain run) makes the folder and removes it at the end; workers inherit it.
_SESSION_CACHE_ENV = "CLIP_JAX_TEST_SESSION_CACHE"
_OWNS_SESSION_CACHE = _SESSION_CACHE_ENV not in os.environ
if _OWNS_SESSION_CACHE:
  os.environ[_SESSION_CACHE_ENV] = tempfile.mkdtemp(prefix="clip_jax_test_cache_")
os.environ["XDG_CACHE_HOME"] = os.environ[_SESSION_CACHE_ENV]
JAX_CACHE_DIR = os.path.join(os.environ[_SESSION_CACHE_ENV], "clip_jax", "jax")  # where 'auto' resolves

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", JAX_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # as the trainers set it


# The test files by their run time in the whole suite, longest first (measured 2026-11-30; the rest
# follow in their usual order). `-n 2 --dist loadfile` hands whole files to whichever worker is free, in
# collection order (pyproject's addopts turn off xdist's reordering by test count, which put files of
# few, long tests last): longest first keeps one long file from running alone at the end.
LONGEST_FILES_FIRST = (
    "test_dreambooth.py", "test_train.py", "test_rerun.py", "test_dreambooth_embedded.py",
    "test_dreambooth_table3_smoke.py", "test_launch.py",
    "test_models.py", "test_dreambooth_training.py", "test_dreambooth_multiprocess.py", "test_slurm.py",
    "test_sd_models.py", "test_cli_errors.py", "test_finetune.py", "test_fast_attention.py", "test_schedulers.py",
    "test_results_files.py", "test_styleclip.py", "test_losses.py", "test_dreambooth_evaluate.py",
    "test_evaluate.py", "test_clipdraw.py", "test_sd_pipeline.py", "test_guidance.py", "test_image_modes.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def pytest_unconfigure(config):
  if _OWNS_SESSION_CACHE:
    shutil.rmtree(os.environ[_SESSION_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
  """A diffusers folder of the random tiny SD (`make_tiny_pipeline(key(0))`), made once per session
  (per xdist worker) for the tests that only read it."""
  from dreambooth_jax.embedded.tiny import make_tiny_pipeline
  from dreambooth_jax.sampling import pipeline as sd
  return sd.save_pipeline(make_tiny_pipeline(jax.random.key(0)), str(tmp_path_factory.mktemp("tiny_sd")))
