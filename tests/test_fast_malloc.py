"""clip_jax.cli.use_fast_malloc: every entry point runs under glibc.malloc.hugetlb=1 without the user
exporting anything (issue 15.1), once, with the user's own setting and the opt-out respected."""
import os
import platform
import subprocess
import sys

import pytest

from clip_jax import cli

GLIBC = ("glibc", "2.36")
THP = "always [madvise] never\n"


def test_environment_adds_the_tunable_once_and_keeps_the_users_others():
  env = cli.malloc_environment({"PATH": "/bin"}, GLIBC, THP)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
  env = cli.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, THP)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert cli.malloc_environment(env, GLIBC, THP) is None  # the re-executed process stops there


@pytest.mark.parametrize("environ, libc, thp", [
    ({"CLIP_JAX_MALLOC": "system"}, GLIBC, THP),                      # the opt-out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP),       # the user's own value wins
    ({}, ("glibc", "2.31"), THP),                                     # no such tunable before 2.35
    ({}, ("", ""), THP),                                              # musl, macOS
    ({}, GLIBC, "always madvise [never]\n"),                          # huge pages off in the kernel
    ({}, GLIBC, None),
    ({"JAX_PLATFORMS": "cuda"}, GLIBC, THP),                          # not a CPU run
])
def test_environment_is_left_alone(environ, libc, thp):
  assert cli.malloc_environment(environ, libc, thp) is None


def _run(env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CLIP_JAX_MALLOC_REEXEC")}
  env.update(env_changes)
  code = ("import os, sys; from clip_jax import cli; print('start', flush=True); cli.use_fast_malloc(); "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  out = subprocess.run([sys.executable, "-c", code, "a b", "--flag"], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return out.stdout.splitlines()


@pytest.mark.skipif(cli.malloc_environment({}, platform.libc_ver(),
                                           cli._read("/sys/kernel/mm/transparent_hugepage/enabled")) is None,
                    reason="this machine's C library or kernel has no malloc huge pages to turn on")
def test_the_process_re_executes_once_with_its_arguments():
  lines = _run({})
  assert lines == ["start", "start", "glibc.malloc.hugetlb=1 ['a b', '--flag']"]
  assert _run({"CLIP_JAX_MALLOC": "system"}) == ["start", "None ['a b', '--flag']"]
