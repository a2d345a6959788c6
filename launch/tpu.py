"""TPU pod slices: the same worker command on every host of the slice, through gcloud.

    1. pack the working tree (tracked and untracked-but-not-ignored files) into a tarball;
    2. copy it to every worker (`gcloud compute tpus tpu-vm scp --worker=all`);
    3. set up every worker: unpack, `launch/setup.sh` (the pinned requirements) and jax[tpu] of the
       same jax version;
    4. run `python -m launch.worker` on every worker (`ssh --worker=all`): jax.distributed finds
       the slice's hosts by itself.

Steps 1-3 are skipped with `--skip-setup` (code and environment already there). The workdir
should be a bucket (gs://...): orbax writes checkpoints there from all hosts, and a re-launch
resumes from it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess

from launch.local import REPO_ROOT
from launch.worker import HEARTBEAT_TIMEOUT_S


@dataclasses.dataclass
class TpuSettings:
  name: str
  zone: str
  project: str | None = None
  remote_dir: str = "clip_jax"          # relative to the home directory on each worker
  archive: str = "/tmp/clip_jax_src.tar.gz"
  skip_setup: bool = False


def pinned_jax_version(repo_dir: str = REPO_ROOT) -> str:
  with open(os.path.join(repo_dir, "requirements.txt")) as f:
    match = re.search(r"^jax==(\S+)", f.read(), re.MULTILINE)
  if not match:
    raise ValueError(f"requirements.txt in {repo_dir} pins no jax version (expected a 'jax==X' line).")
  return match.group(1)


def _gcloud(settings: TpuSettings, verb: str, *args: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, "--zone", settings.zone, "--worker=all"]
  if settings.project:
    command += ["--project", settings.project]
  return command


def commands(settings: TpuSettings, module: str, trainer_args: list[str], repo_dir: str = REPO_ROOT,
             heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> list[list[str]]:
  """Every command, in order; each is an argv list (step 1 is a bash pipeline)."""
  s = settings
  remote_archive = "/tmp/" + os.path.basename(s.archive)
  out = []
  if not s.skip_setup:
    pack = (f"git -C {shlex.quote(repo_dir)} ls-files -z --cached --others --exclude-standard"
            f" | tar -czf {shlex.quote(s.archive)} -C {shlex.quote(repo_dir)} --null -T -")
    out.append(["bash", "-c", pack])
    out.append(_gcloud(s, "scp", s.archive, f"{s.name}:{remote_archive}"))
    setup = (f"mkdir -p {s.remote_dir} && tar -xzf {remote_archive} -C {s.remote_dir} && cd {s.remote_dir}"
             f' && bash launch/setup.sh && .venv/bin/pip install --quiet "jax[tpu]=={pinned_jax_version(repo_dir)}"')
    out.append(_gcloud(s, "ssh", s.name) + ["--command", setup])
  worker = shlex.join([".venv/bin/python", "-m", "launch.worker", f"--module={module}",
                       f"--heartbeat-timeout={heartbeat_timeout}", "--", *trainer_args])
  out.append(_gcloud(s, "ssh", s.name) + ["--command", f"cd {s.remote_dir} && {worker}"])
  return out


def run(settings: TpuSettings, module: str, trainer_args: list[str], dry_run: bool, out) -> int:
  for command in commands(settings, module, trainer_args):
    print(shlex.join(command), file=out, flush=True)
    if dry_run:
      continue
    try:
      code = subprocess.run(command, check=False).returncode
    except FileNotFoundError:
      raise SystemExit(f"launch: {command[0]} is not on PATH; install the Google Cloud SDK "
                       "(or print the commands with --dry-run).") from None
    if code:
      print(f"launch: that command failed with exit code {code}; stopping.", file=out, flush=True)
      return code
  return 0
