"""benchmarks/profile_step.py: op kinds from XLA's op names, and a real traced step of a tiny CLIP
whose table accounts for its ops (the dots among them)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_step  # noqa: E402


def test_op_kinds_sum_worker_thread_events_only():
  event = lambda name, ns: SimpleNamespace(name=name, duration_ns=ns)  # noqa: E731
  worker = SimpleNamespace(name="tf_XLAEigen/123", events=[
      event("ynn_fusion.1", 2e9), event("ynn_fusion.22", 1e9), event("copy.3", 5e8),
      event("ThunkExecutor::Execute", 9e9), event("end: copy", 1e6)])
  python = SimpleNamespace(name="python", events=[event("ynn_fusion.7", 7e9)])
  totals = profile_step.op_times_by_kind([SimpleNamespace(lines=[worker, python])])
  assert totals == {"ynn_fusion": 3.0, "copy": 0.5}
  rows = profile_step.table(totals, top=1)
  assert rows[2] == "| ynn_fusion | 3.00 | 85.7% |" and rows[-2] == "| (other kinds) | 0.50 | 14.3% |"


@pytest.mark.slow
def test_profile_of_a_tiny_step(tmp_path):
  out = tmp_path / "profile.md"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--model", "ViT-Tiny",
                         "--batch", "4", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert "ViT-Tiny bfloat16 train step, batch 4" in text and "| **all ops** |" in text
  kinds = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  assert any("fusion" in kind for kind in kinds), text   # XLA's ops were seen, not just bookkeeping
