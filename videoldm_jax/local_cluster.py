r"""Several JAX processes on one machine, on CPU: a stand-in for a multi-host pod (tests, debugging).

  python -m videoldm_jax.local_cluster --num_processes=2 --devices_per_process=4 -- \
      python -m videoldm_jax.train --config=configs/rds.py:stage=base,runlocal --workdir=/tmp/videoldm_mp

Each process gets ``JAX_PLATFORMS=cpu``, ``devices_per_process`` fake CPU devices
(``--xla_force_host_platform_device_count``) and the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` that ``parallel.initialize_distributed`` reads (coordinator on a free localhost port; collectives
over gloo). Together they form one ``num_processes * devices_per_process`` device mesh, as the hosts of a TPU slice
do. Output lines are prefixed with ``[pN]``; the launcher exits non-zero if any process does, and stops the others
when one fails.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

from absl import app, flags

from videoldm_jax import cli


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """Environment of one process of the local cluster."""
  env = dict(os.environ if base is None else base)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=" ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
  )
  return env


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int
  output: str


def run(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 4, *,
        env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None, timeout: Optional[float] = None,
        echo: bool = False) -> List[ProcessResult]:
  """Runs ``command`` as ``num_processes`` cooperating JAX processes; returns each one's exit code and output.

  A process that fails (or the ``timeout``) terminates the others, so a broken collective never hangs the caller.
  """
  port = free_port()
  procs = []
  outputs: List[List[str]] = [[] for _ in range(num_processes)]

  def pump(i, stream):
    for line in stream:
      outputs[i].append(line)
      if echo:
        sys.stdout.write(f"[p{i}] {line}")
        sys.stdout.flush()

  threads = []
  for i in range(num_processes):
    p = subprocess.Popen(list(command), env=process_env(i, num_processes, devices_per_process, port, env), cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    t = threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
    t.start()
    threads.append(t)
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      late = deadline is not None and time.monotonic() > deadline
      if failed or late:
        for p in procs:
          if p.poll() is None:
            p.terminate()
        if late:
          outputs[0].append(f"local_cluster: timed out after {timeout:.0f}s\n")
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in threads:
      t.join(timeout=5)
  return [ProcessResult(i, p.returncode, "".join(outputs[i])) for i, p in enumerate(procs)]


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_integer("num_processes", 2, "number of JAX processes", flag_values=fv)
  flags.DEFINE_integer("devices_per_process", 4, "fake CPU devices of each process", flag_values=fv)
  flags.DEFINE_float("timeout", None, "seconds", flag_values=fv)
  # The command's own flags follow it: parsing stops at the first argument that is not a flag, as at ``--``.
  fv.set_gnu_getopt(False)


def run_command(fv: flags.FlagValues, command: List[str]) -> int:
  """Runs ``command`` (the arguments after ``--``) on the local cluster of ``fv``; 1 if any process fails."""
  if not command:
    raise app.UsageError("give the command after --")
  results = run(command, fv.num_processes, fv.devices_per_process, timeout=fv.timeout, echo=True)
  codes = [r.returncode for r in results]
  if any(codes):
    sys.stderr.write(f"local_cluster: exit codes {codes}\n")
    return 1
  return 0


def main(argv: Sequence[str]) -> int:
  """The command with ``argv`` (its flags, then ``--`` and the command, as on the command line)."""
  return cli.main("videoldm_jax.local_cluster", define_flags, run_command, argv, positional=True)


if __name__ == "__main__":
  cli.run_program(define_flags, run_command, positional=True)
