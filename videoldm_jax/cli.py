"""One convention for the package's commands: absl flags defined by a ``define_flags(flag_values)`` function, a
``run(flag_values) -> exit status`` that raises ``app.UsageError`` (naming the flag) on bad input, and

* ``main(argv)`` for callers in Python (tests, other tools): private flag values, so nothing global is defined;
  bad flags or input exit with status 2 and one line on stderr;
* ``run_program(...)`` under ``if __name__ == "__main__"``: the global FLAGS through ``absl.app`` (``--help``,
  logging flags).

Arguments that are not flags (e.g. a command after ``--``) are an error, unless the command takes them
(``positional=True``): then ``run(flag_values, args)`` gets them.

Commands built on an ml_collections config file (``--config=FILE[:ARGS]`` plus ``--config.KEY=VALUE`` overrides:
training, planning) run through ``run_config_program``: an override of a key the config does not have ends them
with one line naming the key and its closest matches (status 2), not a parser traceback.
"""

from __future__ import annotations

import difflib
import functools
import sys
from typing import Any, Callable, List, Optional, Sequence, Union

from absl import app, flags

DefineFlags = Callable[[flags.FlagValues], None]
Run = Union[Callable[[flags.FlagValues], int], Callable[[flags.FlagValues, List[str]], int]]


def main(prog: str, define_flags: DefineFlags, run: Run, argv: Sequence[str], *, positional: bool = False) -> int:
  """Parses ``argv`` (as on the command line) into fresh flag values and runs the command."""
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    args = fv([prog] + list(argv))[1:]
    return _run(run, fv, args, positional)
  except (flags.Error, app.UsageError) as e:
    print(f"{prog}: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def run_program(define_flags: DefineFlags, run: Run, *, positional: bool = False) -> None:
  """The command as a program: global FLAGS, ``absl.app`` (exit status from ``run``)."""
  define_flags(flags.FLAGS)
  app.run(lambda argv: _run(run, flags.FLAGS, argv[1:], positional))


def require(fv: flags.FlagValues, *names: str) -> None:
  """Raises ``app.UsageError`` naming the flags of ``names`` (defaults ``None``) that were not given."""
  missing = [f"--{name}" for name in names if fv[name].value is None]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def _run(run: Run, fv: flags.FlagValues, args: List[str], positional: bool) -> int:
  if positional:
    return run(fv, args)
  if args:
    raise app.UsageError(f"unexpected arguments: {args}")
  return run(fv)


def run_config_program(prog: str, define_flags: Callable[[], None], main: Callable[[List[str]], Any], *,
                       required: Sequence[str] = (), config_flag: str = "config") -> None:
  """A command with an ml_collections config flag as a program: ``define_flags()`` defines the global FLAGS
  (``required`` ones must be given), ``absl.app`` runs ``main(argv)``; an unknown ``--config.KEY`` override is
  reported in one line (status 2)."""
  define_flags()
  if required:
    flags.mark_flags_as_required(list(required))
  app.run(main, flags_parser=functools.partial(_parse_config_flags, prog, config_flag))


def _parse_config_flags(prog: str, config_flag: str, argv: List[str]) -> List[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except Exception:  # pylint: disable=broad-except  (ml_collections raises AttributeError / KeyError on overrides)
    message = unknown_override(argv, config_flag)
    if message is None:
      raise
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def unknown_override(argv: Sequence[str], config_flag: str = "config") -> Optional[str]:
  """One line naming the first ``--config.KEY`` override in ``argv`` whose key the config file (``--config=``)
  does not have, with the closest existing keys; None when every key exists (or the config does not load)."""
  path, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if not arg.startswith("-"):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if name == config_flag:
      path = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    elif name.startswith(config_flag + "."):
      overrides.append(name[len(config_flag) + 1:])
  if not path or not overrides:
    return None
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  try:
    config = config_flags.ConfigFileFlagParser(name=config_flag, lock_config=False).parse(path)
  except Exception:  # pylint: disable=broad-except  (a config that does not load is reported by absl)
    return None
  for key in overrides:
    node, done = config, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        return (f"--{config_flag}.{key}: {config_flag}.{'.'.join(done)} is a value, not a section with a key "
                f"{part!r}")
      if part not in keys:
        where = ".".join([config_flag] + done)
        close = difflib.get_close_matches(part, [str(k) for k in keys], n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(where + '.' + c for c in close)})" if close else ""
        return f"--{config_flag}.{key}: unknown config key {part!r} in {where}{hint}"
      node = node[part]
      done.append(part)
  return None
