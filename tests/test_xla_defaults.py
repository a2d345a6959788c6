"""clip_jax.cli.use_xla_defaults: the XLA flags every entry point adds unless the user names them."""
import os
import subprocess
import sys

from clip_jax import cli

SCHEDULER = "--xla_gpu_enable_latency_hiding_scheduler"


def test_defaults_are_added_once_and_the_users_own_value_wins():
  assert cli.xla_flags_with_defaults("") == f"{SCHEDULER}=true"
  kept = "--xla_force_host_platform_device_count=8"
  assert cli.xla_flags_with_defaults(f" {kept} ") == f"{kept} {SCHEDULER}=true"
  assert cli.xla_flags_with_defaults(f"{SCHEDULER}=false {kept}") == f"{SCHEDULER}=false {kept}"
  once = cli.xla_flags_with_defaults("")
  assert cli.xla_flags_with_defaults(once) == once


def test_a_cpu_process_runs_with_the_defaults():
  # XLA aborts on a flag it does not know: the GPU flag must be one the CPU build accepts too.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import os; from clip_jax import cli; cli.use_xla_defaults(); import jax, jax.numpy as jnp; "
          "print(float(jnp.ones(3).sum()), os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["3.0", f"{SCHEDULER}=true"]
