"""One convention for the package's commands: absl flags defined by a ``define_flags(flag_values)`` function, a
``run(flag_values) -> exit status`` that raises ``app.UsageError`` (naming the flag) on bad input, and

* ``main(argv)`` for callers in Python (tests, other tools): private flag values, so nothing global is defined;
  bad flags or input exit with status 2 and one line on stderr;
* ``run_program(...)`` under ``if __name__ == "__main__"``: the global FLAGS through ``absl.app`` (``--help``,
  logging flags).

Arguments that are not flags (e.g. a command after ``--``) are an error, unless the command takes them
(``positional=True``): then ``run(flag_values, args)`` gets them.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Sequence, Union

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
