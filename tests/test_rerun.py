"""Re-running, interrupting or changing a run never loses or misstates results (issue 20.1-20.4)."""
import glob
import json
import os

from clip_jax import observe


# ----------------------------------------------------------------------------- metrics without ghosts
def tensorboard_steps(workdir: str, tag: str = "loss") -> tuple[list[int], list[int]]:
  """(steps as TensorBoard's EventAccumulator shows them, steps of every record in the files)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  accumulator = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  accumulator.Reload()
  shown = [e.step for e in accumulator.Scalars(tag)]
  stored = sorted(e.step for path in glob.glob(os.path.join(workdir, "tb", "*tfevents*"))
                  for e in EventFileLoader(path).Load() if any(v.tag == tag for v in e.summary.value))
  return shown, stored


def jsonl_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def test_a_resume_drops_the_metrics_of_the_lost_attempt(tmp_path):
  workdir = str(tmp_path)
  writer = observe.MetricWriter(workdir, resume_step=0)
  for step in range(1, 11):
    writer.write(step, {"loss": 10.0 - step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "lo')  # a line cut short by SIGKILL
  # The checkpoint of step 6 is what the run resumes from: steps 7-10 of the first attempt are ghosts.
  writer = observe.MetricWriter(workdir, resume_step=6)
  for step in range(7, 13):
    writer.write(step, {"loss": 100.0 + step})
  writer.close()
  assert jsonl_steps(workdir) == list(range(1, 13))
  shown, stored = tensorboard_steps(workdir)
  assert shown == stored == list(range(1, 13))
  values = {r["step"]: r["loss"] for r in observe.read_metrics(str(tmp_path / "metrics.jsonl"))}
  assert values[6] == 4.0 and values[7] == 107.0


def test_a_resume_with_nothing_to_drop_leaves_the_files_alone(tmp_path):
  workdir = str(tmp_path)
  writer = observe.MetricWriter(workdir, resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(p)}
  assert observe.drop_metrics_after(workdir, 1) == 0
  after = {p: open(p, "rb").read() for p in before}
  assert before == after
