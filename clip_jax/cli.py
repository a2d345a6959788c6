"""What every command-line entry point shares: a user's mistake ends as one line on stderr with exit
code 2; a bug keeps its traceback.

    if __name__ == "__main__":
      cli.run(main)         # argparse mains: main(argv=None) -> exit code or None
      cli.run_absl(main)    # absl mains with a config file and --config.key=value overrides

Raise `UserError` (or `MissingPathError` for a path the user gave that is not there) where the
mistake is found, with one sentence that names the bad value and what to do (`did_you_mean` adds
the closest valid names to an "unknown name" message). The runners print
`error: <message>` and exit with 2 for these, for argparse's own errors (usage mistakes), for
absl's flag errors and for `SystemExit("message")`; anything else is a bug and keeps its traceback
(exit code 1). `--debug` anywhere before a lone `--`, or CLIP_JAX_DEBUG=1 in the environment, prints
the traceback of a user error before its line (the exit code stays 2; the setting reaches the
processes a launcher starts, through the environment).

Config overrides are checked before absl parses them (`check_config_overrides`): an unknown key
names the closest existing keys ("did you mean config.model.name?"), a value that does not parse as
the key's type says which type the key takes.

In a multi-process jax.distributed run every process usually raises the same error; only the first
process to report a given message prints it (a counter in jax's coordination service), so the
launcher's output holds it once, from a process that raised it. The others exit with the same code
silently.

Every runner also starts the process under the allocator setting XLA:CPU needs (`use_fast_malloc`:
re-executes once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1; opt out with CLIP_JAX_MALLOC=system)
and with this project's default XLA flags (`use_xla_defaults`: XLA:GPU's latency-hiding scheduler,
which overlaps the ring losses' collectives on GPUs before Hopper; a flag named in your XLA_FLAGS wins).

Imports only the standard library at module level: error paths run before any heavy import.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import importlib.util
import os
import platform
import sys
import traceback
from typing import Callable, Iterable, NoReturn, Sequence

DEBUG_ENV = "CLIP_JAX_DEBUG"
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT_CODE = 2
BUG_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shells' convention: Ctrl-C before a trainer's loop could save


class UserError(ValueError):
  """A mistake in what the user asked for (a flag, a config value, a name, a path): reported by the
  runners as one line, exit code 2. A ValueError, so callers that catch ValueError still do."""


class MissingPathError(UserError, FileNotFoundError):
  """A path the user gave does not exist (also a FileNotFoundError for callers that catch that)."""


def make_out_dir(path: str, flag: str = "--out") -> str:
  """os.makedirs(path, exist_ok=True), with a UserError where it or a folder above it is a file
  (os.makedirs raised FileExistsError / NotADirectoryError, a traceback)."""
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise UserError(f"{flag} {path} is a file (or lies under one); give a folder to write into.") from e
  return path


def closest(name: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
  """The up to `n` candidates most similar to `name` (difflib ratio >= cutoff), best first."""
  return difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)


def did_you_mean(name, valid: Iterable) -> str:
  """" did you mean 'x'?" for the valid names closest to `name` (difflib), or "" when none is close:
  the piece an "unknown <thing>" message puts before its list of valid names."""
  near = closest(str(name), [str(v) for v in valid])
  return f" did you mean {' or '.join(repr(v) for v in near)}?" if near else ""


def as_user_errors(check: Callable, *args, **kwargs):
  """Runs a validator whose ValueErrors (and FileNotFoundErrors) are all mistakes in what the user
  asked for, e.g. a trainer's validate_config(cfg), re-raising them as UserError / MissingPathError."""
  try:
    return check(*args, **kwargs)
  except UserError:
    raise
  except FileNotFoundError as e:
    raise MissingPathError(str(e)) from e
  except ValueError as e:
    raise UserError(str(e)) from e


# ----------------------------------------------------------------------------- config overrides
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds clip_jax/, configs/, ...


def packaged_config(arg: str, cwd: str | None = None, package_root: str = PACKAGE_ROOT) -> str:
  """`--config=configs/clip/digits.py:runlocal` (or a bare `configs/...` value) with the path made
  absolute inside the installed package, when `configs/...` is missing under `cwd` but packaged, so
  the documented commands work from any directory (a local `configs/` folder still wins). Every
  command applies it to its arguments (`run`, `run_absl`), as do the installed console scripts.
  Any other argument comes back unchanged."""
  flag, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
  if arg.startswith("-") and not sep:
    return arg
  path, colon, config_arg = value.partition(":")   # ml_collections: FILE.py:ARGUMENT
  if not path.startswith("configs/") or os.path.exists(os.path.join(cwd or os.getcwd(), path)):
    return arg
  packaged = os.path.join(package_root, path)
  if not os.path.isfile(packaged):
    return arg
  return f"{flag}{sep}{packaged}{colon}{config_arg}"


def _command_argv(argv: Sequence[str]) -> list[str]:
  """A command's arguments as its parser should see them: --debug taken out, configs resolved."""
  argv = _strip_debug(list(argv))
  return argv[:1] + [packaged_config(a) for a in argv[1:]]


def _load_config(spec: str):
  """ml_collections' config_flags rule: 'path.py[:arg]' -> get_config(arg) or get_config()."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise MissingPathError(f"--config={spec}: no such config file {path!r}.")
  module_spec = importlib.util.spec_from_file_location("_clip_jax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config={spec}: {path} defines no get_config(); is it a config file?")
  # A config file's ValueError is about its argument (e.g. paper.py:ViT-Nope): the user's mistake.
  return as_user_errors(module.get_config, arg) if sep else as_user_errors(module.get_config)


def _flatten_keys(config, prefix: str) -> list[str]:
  """Every dotted key of a ConfigDict, groups included: ['model', 'model.name', ...]."""
  keys = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}.{key}" if prefix else key
    keys.append(path)
    if hasattr(value, "keys") and hasattr(value, "get_type"):  # a nested ConfigDict
      keys.extend(_flatten_keys(value, path))
  return keys


def _near_keys(key: str, all_keys: list[str], n: int = 3) -> list[str]:
  """Existing keys a mistyped `key` probably meant: the same last name in another group first
  (model.dtype -> dtype), then typos of the whole path, then typos of the last name."""
  def leaf(k):
    return k.rsplit(".", 1)[-1]
  last = leaf(key)
  near = [k for k in all_keys if leaf(k) == last]
  near += [k for k in closest(key, all_keys) if k not in near]
  close_leaves = set(closest(last, {leaf(k) for k in all_keys}))
  near += [k for k in all_keys if leaf(k) in close_leaves and k not in near]
  return near[:n]


def _overrides(argv: Sequence[str], flag: str) -> tuple[str | None, list[tuple[str, str | None, str]]]:
  """argv -> (the --flag value, [(dotted key, value or None for bare booleans, as typed)])."""
  spec, found = None, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == flag:
      spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
      i += 1 if eq else 2
      continue
    for negated, prefix in ((False, flag + "."), (True, "no" + flag + ".")):
      if arg.startswith("-") and name.startswith(prefix):
        key = name[len(prefix):]
        if negated:
          found.append((key, "false", arg))
        elif eq:
          found.append((key, value, arg))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
          found.append((key, argv[i + 1], f"{arg} {argv[i + 1]}"))
          i += 1
        else:
          found.append((key, None, arg))
        break
    i += 1
  return spec, found


_BOOL_WORDS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


def _type_error(key: str, value: str | None, field_type: type, flag: str, typed: str) -> str | None:
  if field_type is bool:
    if value is None or value.lower() in _BOOL_WORDS:
      return None
    return f"{flag}.{key} takes a bool (true/false), got {value!r} ({typed})."
  if value is None:
    return f"{flag}.{key} takes a {field_type.__name__}: give a value ({typed}=...)."
  if field_type in (int, float):
    try:
      field_type(value)
    except ValueError:
      if field_type is int:  # ml_collections reads ints like 1e3 strictly as well
        return f"{flag}.{key} takes an int, got {value!r} ({typed})."
      return f"{flag}.{key} takes a float, got {value!r} ({typed})."
  return None


def check_config_overrides(argv: Sequence[str], flag: str = "config") -> None:
  """Raises UserError for `--config.KEY=VALUE` overrides that ml_collections would reject with a
  traceback: an unknown KEY (naming the closest existing keys) or a VALUE that does not parse as the
  type of an int/float/bool field. The config file is loaded the way config_flags loads it
  (`path.py[:arg]`); MissingPathError when it does not exist. Other value types are left to
  config_flags (the runner still turns its errors into one line)."""
  spec, overrides = _overrides(argv, flag)
  if spec is None:
    return
  config = _load_config(spec)
  all_keys = _flatten_keys(config, "")
  for key, value, typed in overrides:
    holder, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not (hasattr(holder, "keys") and part in holder.keys()):
        full = f"{flag}.{key}"
        near = _near_keys(key, all_keys)
        parent = ".".join([flag, *parts[:depth]])
        if near:
          hint = f"did you mean {' or '.join(f'{flag}.{k}' for k in near)}?"
        elif hasattr(holder, "keys"):
          hint = f"{parent} has: {', '.join(sorted(holder.keys())) or 'no keys'}."
        else:
          hint = f"{parent} is a value, not a group of keys."
        raise UserError(f"unknown config key {full} ({typed}); {hint}")
      if depth < len(parts) - 1:
        holder = holder[part]
    problem = _type_error(key, value, holder.get_type(parts[-1]), flag, typed)
    if problem:
      raise UserError(problem)


# ----------------------------------------------------------------------------- XLA flags
# Flags every entry point adds to XLA_FLAGS unless the user's own XLA_FLAGS name them (any value wins).
XLA_DEFAULTS = (
    # XLA:GPU runs its latency-hiding scheduler by default only from Hopper on. Without it (A100 and
    # older) the ring losses' collective-permute of the next chunk is waited for before the current
    # block's matmuls instead of under them (benchmarks/ring_overlap_check.py --gpu-topology a100:1x1x8:
    # the backward ring step 'start done matmul'; with it 'start matmul done'). CPU and TPU ignore it.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
)


def xla_flags_with_defaults(xla_flags: str) -> str:
  """An XLA_FLAGS value with each flag of XLA_DEFAULTS appended unless `xla_flags` names it already."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  added = [flag for flag in XLA_DEFAULTS if flag.split("=", 1)[0] not in named]
  return " ".join(filter(None, [xla_flags.strip(), *added]))


def use_xla_defaults() -> None:
  """Puts XLA_DEFAULTS into this process's XLA_FLAGS (`xla_flags_with_defaults`); processes started
  from here inherit them. Call it first thing in an entry point's `__main__`, before jax starts a
  backend (XLA reads XLA_FLAGS once). Opt out of one by naming it yourself, e.g.
  XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false."""
  os.environ["XLA_FLAGS"] = xla_flags_with_defaults(os.environ.get("XLA_FLAGS", ""))


# ----------------------------------------------------------------------------- allocator
MALLOC_ENV = "CLIP_JAX_MALLOC"          # 'system': leave glibc's malloc as the environment has it
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
_REEXEC_MARK = "CLIP_JAX_MALLOC_REEXEC"  # set in the re-executed process: never a second time


def malloc_environment(environ: dict[str, str], libc: tuple[str, str],
                       thp_enabled: str | None) -> dict[str, str] | None:
  """The environment this process should run under for fast XLA:CPU steps, or None when nothing is
  to change.

  Why: XLA:CPU frees its large temporaries after every step and allocates them again on the next;
  glibc's malloc serves such sizes with fresh mmaps, so each step faults in every page again (about
  700k 4 KiB faults per ViT-B-32 bf16 step at batch 32), and the faulting runs on one thread while
  the other cores wait. With glibc.malloc.hugetlb=1 (glibc >= 2.35) malloc madvises its memory for
  transparent huge pages: 2 MiB pages, about 2k faults per step, 1.25x the steps per second at low
  load (`benchmarks/results/train_step.md`). mallopt cannot set this from inside the process, and
  mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD at its maximum) left the fault count unchanged (measured
  in the same file), so the process re-executes itself with the tunable instead.

  environ: the current environment; libc: `platform.libc_ver()`; thp_enabled: the text of
  /sys/kernel/mm/transparent_hugepage/enabled (None when absent). Returns None when the user opted
  out (CLIP_JAX_MALLOC=system), set the tunable themselves (any value wins), the C library is not
  glibc >= 2.35, the kernel has huge pages off ('[never]'), JAX_PLATFORMS names no 'cpu', or this
  process is already the re-executed one.
  """
  if environ.get(MALLOC_ENV, "").lower() in ("system", "off", "0", "false") or environ.get(_REEXEC_MARK):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if HUGETLB_TUNABLE + "=" in tunables:
    return None
  name, version = libc
  try:
    if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:
    return None
  if thp_enabled is None or "[never]" in thp_enabled:
    return None
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return None
  new = dict(environ)
  new["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGETLB_TUNABLE + "=1"]))
  new[_REEXEC_MARK] = "1"
  return new


def user_cache_dir(*parts: str) -> str:
  """$XDG_CACHE_HOME (or ~/.cache) / clip_jax / parts: where the compilation cache and the built CPU
  handlers live unless the user says otherwise."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "clip_jax", *parts)


def shown_python() -> str:
  """The running interpreter as a printed command should name it, so that the line runs as pasted
  (a bare `python` may be another one, without this project's packages): relative to the current
  directory when inside it (`.venv/bin/python`), else its absolute path."""
  executable = sys.executable or "python"
  relative = os.path.relpath(executable)
  if relative.startswith(os.pardir):
    return executable
  return relative if os.sep in relative else os.path.join(os.curdir, relative)


def shown_command(argv: Sequence[str]) -> str:
  """A command for the user to read or paste, quoted for a POSIX shell; this interpreter as in
  `shown_python`."""
  import shlex
  return shlex.join([shown_python() if i == 0 and part == sys.executable else part for i, part in enumerate(argv)])


def python_command(module: str, *args: str) -> str:
  """`shown_command` of `python -m module args...` with the running interpreter."""
  return shown_command([sys.executable, "-m", module, *args])


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def use_fast_malloc() -> None:
  """Re-executes this process (same interpreter, same command line) once under
  `malloc_environment`, when that asks for a change; returns otherwise. Call it first thing in an
  entry point's `__main__` (before jax is imported, so nothing is imported twice); the runners below
  call it too. Processes started from here inherit the setting (launchers' workers, sweeps).
  Opt out: CLIP_JAX_MALLOC=system, or a GLIBC_TUNABLES of your own with glibc.malloc.hugetlb=0.
  """
  env = malloc_environment(dict(os.environ), platform.libc_ver(),
                           _read("/sys/kernel/mm/transparent_hugepage/enabled"))
  if env is None or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def use_process_defaults() -> None:
  """What every entry point runs first, before jax is imported: this project's XLA flags
  (`use_xla_defaults`), then the allocator setting (`use_fast_malloc`), which may re-execute the
  process; in this order the re-executed process starts with both."""
  use_xla_defaults()
  use_fast_malloc()


# ----------------------------------------------------------------------------- runners

def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def debug_enabled() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def _strip_debug(argv: list[str]) -> list[str]:
  """Removes --debug (before a lone '--') and records it in the environment for child processes."""
  cut = argv.index("--") if "--" in argv else len(argv)
  if DEBUG_FLAG in argv[1:cut]:
    os.environ[DEBUG_ENV] = "1"
    argv = [a for i, a in enumerate(argv) if not (0 < i < cut and a == DEBUG_FLAG)]
  return argv


def _first_to_report(text: str) -> bool:
  """False only in a jax.distributed run where another process has already reported `text`."""
  if "jax" not in sys.modules:  # no jax: no distributed run to deduplicate over
    return True
  try:
    from jax._src import distributed  # the client is not public API; any failure -> print
    client = distributed.global_state.client
    if client is None:
      return True
    key = "clip_jax/reported/" + hashlib.sha1(text.encode()).hexdigest()
    return int(client.key_value_increment(key, 1)) == 1
  except Exception:  # noqa: BLE001 - better printed twice than never
    return True


def print_user_error(message: str, error: BaseException | None = None) -> int:
  """Prints `error: <message>` as one line (once per run; with debugging on, the traceback of `error`
  first) and returns the user-error exit code, 2: for a command's `main()` that returns its exit code."""
  line = _one_line(message)
  if _first_to_report(line):
    if error is not None and debug_enabled():
      sys.stderr.write("".join(traceback.format_exception(error)))
    print(f"error: {line}", file=sys.stderr, flush=True)
  return USER_ERROR_EXIT_CODE


def report_user_error(message: str, error: BaseException | None = None) -> NoReturn:
  """`print_user_error`, then exits with its code (2)."""
  sys.exit(print_user_error(message, error))


def _report_bug(error: BaseException) -> NoReturn:
  text = "".join(traceback.format_exception(error))
  last = text.strip().splitlines()[-1]
  if _first_to_report(last):
    sys.stderr.write(text)
    sys.stderr.flush()
  sys.exit(BUG_EXIT_CODE)


def quiet_interrupt_while_starting() -> None:
  """A Ctrl-C while a `python -m` command of this project is still importing (jax alone takes seconds)
  prints one line and exits 130, as one before a training loop does, instead of a KeyboardInterrupt
  traceback (session 27's fresh user). The packages' __init__ install it when run with -m; `run` and
  `run_absl` take it out as they start (from then on `_reporting` catches Ctrl-C), so it only speaks
  for the imports and top level of one of this project's modules run as __main__, before anything is
  written. Another program's module that imports ours keeps Python's own traceback. --debug /
  CLIP_JAX_DEBUG keep the traceback."""
  previous = sys.excepthook
  if getattr(previous, "is_clip_jax_hook", False):
    return

  def hook(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt) and _starting_own_command() and not _debug_asked():
      with contextlib.suppress(Exception):
        sys.stdout.flush()
      sys.stderr.write("interrupted (Ctrl-C) while the command was starting: nothing was written; the same "
                       "command starts again.\n")
      sys.stderr.flush()
      os._exit(INTERRUPTED_EXIT_CODE)  # the interpreter would otherwise end as killed by SIGINT
    previous(kind, value, tb)
  hook.is_clip_jax_hook = True
  hook.previous = previous
  sys.excepthook = hook


def _command_started() -> None:
  """Takes `quiet_interrupt_while_starting`'s hook out: the command's own handling starts here."""
  if getattr(sys.excepthook, "is_clip_jax_hook", False):
    sys.excepthook = sys.excepthook.previous


def _starting_own_command() -> bool:
  """True while `python -m` locates its module, or runs one of this project's modules as __main__."""
  if sys.argv[:1] == ["-m"]:
    return True
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return getattr(spec, "name", "").split(".")[0] in ("clip_jax", "dreambooth_jax", "launch")


def _debug_asked() -> bool:
  """--debug on the command line (before a lone '--') or CLIP_JAX_DEBUG, before `run` has read either."""
  cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
  return debug_enabled() or DEBUG_FLAG in sys.argv[1:cut]


def _raise_usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
  raise UserError(f"{message} (see {parser.prog} --help)")


@contextlib.contextmanager
def _reporting():
  """User errors -> one line and exit 2 (after their traceback when debugging); Ctrl-C outside a
  training loop -> one line and exit 130, or 75 when a child trainer saved first
  (`child_runs.ChildSaved`); bugs -> their traceback once per run, exit 1."""
  try:
    yield
  except UserError as e:
    report_user_error(str(e), e)
  except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (which saves and exits 75 itself)
    if debug_enabled():
      sys.stderr.write("".join(traceback.format_exception(e)))
    # A child trainer that saved (child_runs.ChildSaved) makes this command resumable too: its code, 75.
    code = getattr(e, "exit_code", INTERRUPTED_EXIT_CODE)
    if _first_to_report("interrupted"):
      saved = " (its child trainer saved a checkpoint)" if code != INTERRUPTED_EXIT_CODE else ""
      print(f"interrupted (Ctrl-C){saved}: what was written so far is kept whole; the same command resumes or "
            "starts again.", file=sys.stderr, flush=True)
    _exit_after_interrupt(code)
  except SystemExit as e:
    if isinstance(e.code, str):  # SystemExit("message"): a message for the user
      report_user_error(e.code, e)
    raise
  except Exception as e:  # noqa: BLE001 - a bug: keep the traceback, print it once per run
    _report_bug(e)


def _exit_after_interrupt(code: int) -> NoReturn:
  """Ends the process after a Ctrl-C: the atexit handlers run (jax.distributed's shutdown, multiprocessing's
  children), the interpreter's teardown does not. A Ctrl-C that lands in an XLA compile leaves jax in a state
  whose teardown segfaults (session 29: 6 of 6 interrupts during the first compile ended with exit 139 after
  the one line); nothing is left to write by then (results are written whole, `observe.write_atomic`)."""
  import atexit
  atexit._run_exitfuncs()  # noqa: SLF001 - the documented handlers, run as a normal exit would
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)


def run(main: Callable[[], int | None]) -> NoReturn:
  """Runs an argparse `main()` (reading sys.argv) as a command: argparse's usage errors and
  UserError become one line on stderr with exit code 2; main's return value is the exit code."""
  _command_started()
  if getattr(main, "__module__", None) == "__main__":  # a command, not a caller inside a program
    use_process_defaults()
  sys.argv = _command_argv(sys.argv)
  original = argparse.ArgumentParser.error
  argparse.ArgumentParser.error = _raise_usage_error  # one line instead of usage + message
  try:
    with _reporting():
      code = main()
  finally:
    argparse.ArgumentParser.error = original
  sys.exit(code)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_absl(main: Callable[[list[str]], int | None], config_flag: str | None = "config") -> NoReturn:
  """absl.app.run(main) with config overrides checked first and flag errors as one line (exit 2)."""
  _command_started()
  if getattr(main, "__module__", None) == "__main__":  # a command, not a caller inside a program
    use_process_defaults()
  from absl import app, flags
  argv = _command_argv(sys.argv)

  def parse(args: list[str]) -> list[str]:
    if config_flag:
      check_config_overrides(args[1:], config_flag)
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      raise UserError(str(e)) from e
    except SystemExit as e:  # absl's --help prints the flags and exits 1; asking for help is no failure
      if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in args[1:]):
        sys.exit(0)
      raise

  with _reporting():
    app.run(main, argv=argv, flags_parser=parse)
  sys.exit(0)
