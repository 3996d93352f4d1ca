"""Running untrusted decoding in worker processes, so that a crashing decoder costs one input, not the whole run.

FFmpeg (under PyAV) is C code fed arbitrary files: a malformed one can segfault or abort the process that reads
it. :class:`IsolatedPool` keeps a few long-lived worker processes and hands them one call at a time, so when a
worker dies the call it was running is known exactly. That call's result becomes a :class:`WorkerLost`
(``decoder_crashed``, or ``decoder_timeout`` when it overran ``timeout``), the worker is replaced and every other
call goes on untouched::

  with IsolatedPool(num_workers=4, timeout=600) as pool:
    for out in pool.map(decode_fn, [(path,) for path in paths]):  # in input order
      if isinstance(out, WorkerLost):
        skips.add(out.reason, ..., out.detail)

Workers are started with the "spawn" method: the parent often holds JAX (and its threads), which must not be
forked. An exception raised by the function itself is a bug, not a bad input: it is re-raised in the parent as
:class:`WorkerError` with the worker's traceback.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import time
import traceback
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence

DECODER_CRASHED = "decoder_crashed"
DECODER_TIMEOUT = "decoder_timeout"


@dataclasses.dataclass(frozen=True)
class WorkerLost:
  """In place of a result: the worker running the call died (``DECODER_CRASHED``) or overran the timeout."""
  reason: str
  detail: str


class WorkerError(RuntimeError):
  """The function raised in a worker (the message ends with the worker's traceback)."""


class WorkerStartError(RuntimeError):
  """A worker process died before it could take any work (an environment problem, not a bad input)."""


def _exit_description(exitcode: Optional[int]) -> str:
  if exitcode is not None and exitcode < 0:
    try:
      return f"worker killed by {signal.Signals(-exitcode).name}"
    except ValueError:
      return f"worker killed by signal {-exitcode}"
  return f"worker exited with code {exitcode}"


def _serve(conn) -> None:
  """Worker loop: ``(fn, args)`` in, ``("ok", result)`` / ``("lost", text)`` / ``("error", text)`` out, until
  ``None`` or EOF."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
  try:
    import resource  # pylint: disable=g-import-not-at-top
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing decoder should not litter core files
  except (ImportError, ValueError, OSError):
    pass
  conn.send(("ready",))
  while True:
    try:
      data = conn.recv_bytes()
    except (EOFError, OSError):
      return
    try:
      message = pickle.loads(data)
      if message is None:
        return
      fn, args = message
      reply = ("ok", fn(*args))
      payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except MemoryError as e:  # one input's absurd allocation: lose that input, not the run
      payload = pickle.dumps(("lost", f"out of memory: {e}"))
    except Exception as e:  # pylint: disable=broad-except  (reported to the parent, which re-raises)
      payload = pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    conn.send_bytes(payload)


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  ready: bool = False
  index: Optional[int] = None  # the call it is running
  started: float = 0.0  # when that call started (for the timeout)


_PENDING = object()  # "no outcome yet" (a call may legitimately return None)


class IsolatedPool:
  """``num_workers`` reusable worker processes running one call each at a time; see the module docstring.

  Args:
    num_workers: worker processes (at least 1).
    timeout: seconds one call may take before its worker is killed (``decoder_timeout``); None: no limit.
    max_ahead: results buffered ahead of the next one due in order (bounds memory); default 2 per worker + 2.
    start_method: a multiprocessing start method; never "fork" in a process that may hold JAX threads.
  """

  def __init__(self, num_workers: int = 1, *, timeout: Optional[float] = None, max_ahead: Optional[int] = None,
               start_method: str = "spawn"):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if timeout is not None and timeout <= 0:
      raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
    self.num_workers = num_workers
    self.timeout = timeout
    self.max_ahead = max_ahead or 2 * num_workers + 2
    self._ctx = multiprocessing.get_context(start_method)
    self._workers: List[_Worker] = []
    self.num_lost = 0  # calls that lost their worker, over the pool's life

  def __enter__(self) -> "IsolatedPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ----- workers ----------------------------------------------------------------------------------------
  def _start_worker(self) -> _Worker:
    parent, child = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_serve, args=(child,), daemon=True, name="isolated-decoder")
    process.start()
    child.close()  # the parent keeps only its end: EOF on it then means the worker is gone
    worker = _Worker(process, parent)
    self._workers.append(worker)
    return worker

  def _discard(self, worker: _Worker, kill: bool = True) -> None:
    if kill and worker.process.is_alive():
      worker.process.kill()
    worker.process.join(5)
    worker.conn.close()
    self._workers.remove(worker)

  def _check_idle_death(self, worker: _Worker) -> None:
    self._discard(worker, kill=False)
    if not worker.ready:
      raise WorkerStartError(f"a decoding worker process died while starting "
                             f"({_exit_description(worker.process.exitcode)}); see its stderr above")

  def close(self) -> None:
    """Stops every worker (idle ones are asked to exit, busy ones are killed)."""
    for worker in list(self._workers):
      if worker.index is None:
        try:
          worker.conn.send_bytes(pickle.dumps(None))
        except (OSError, ValueError):
          pass
        worker.process.join(5)
      self._discard(worker)

  def _check(self, worker: _Worker, fn_name: str) -> Any:
    """The outcome of ``worker``'s call (its result or a WorkerLost), or ``_PENDING``; may raise."""
    try:
      while worker.conn.poll():
        message = pickle.loads(worker.conn.recv_bytes())
        if message[0] == "ready":  # the clock of a call starts when its worker can run it, not at start-up
          worker.ready = True
          worker.started = max(worker.started, time.monotonic())
          continue
        worker.index = None
        if message[0] == "ok":
          return message[1]
        if message[0] == "lost":
          self.num_lost += 1
          return WorkerLost(DECODER_CRASHED, message[1])
        raise WorkerError(f"{fn_name} raised in a worker process: {message[1]}")
    except (EOFError, OSError):  # the pipe closed: the worker is gone (its exit code comes below)
      worker.process.join(5)
    if not worker.process.is_alive():
      worker.process.join(5)
      if not worker.ready:
        self._discard(worker)
        raise WorkerStartError(f"a decoding worker process died while starting "
                               f"({_exit_description(worker.process.exitcode)}); see its stderr above")
      self._discard(worker, kill=False)
      self.num_lost += 1
      return WorkerLost(DECODER_CRASHED, _exit_description(worker.process.exitcode))
    if self.timeout is not None and worker.ready and time.monotonic() - worker.started > self.timeout:
      self._discard(worker)
      self.num_lost += 1
      return WorkerLost(DECODER_TIMEOUT, f"no result after {self.timeout:g}s, worker killed")
    return _PENDING

  # ----- mapping ----------------------------------------------------------------------------------------
  def map(self, fn: Callable[..., Any], calls: Iterable[Sequence[Any]]) -> Iterator[Any]:
    """``fn(*args)`` for each ``args`` in ``calls``, in the workers, yielded in input order.

    ``fn`` must be picklable (a module-level function). A call whose worker died or timed out yields a
    :class:`WorkerLost`; raises :class:`WorkerError` when ``fn`` raises.
    """
    calls = [tuple(c) for c in calls]
    fn_name = getattr(fn, "__qualname__", repr(fn))
    queue: Deque[int] = collections.deque(range(len(calls)))
    done: Dict[int, Any] = {}
    next_out = 0
    try:
      while next_out < len(calls):
        busy = [w for w in self._workers if w.index is not None]
        while queue and queue[0] < next_out + self.max_ahead and len(busy) < self.num_workers:
          worker = next((w for w in self._workers if w.index is None), None) or self._start_worker()
          if not worker.process.is_alive():  # died while idle (e.g. the OOM killer): no call of ours is lost
            self._check_idle_death(worker)
            continue
          index = queue.popleft()
          worker.conn.send_bytes(pickle.dumps((fn, calls[index]), protocol=pickle.HIGHEST_PROTOCOL))
          worker.index, worker.started = index, time.monotonic()
          busy.append(worker)
        if not busy:
          raise AssertionError(f"IsolatedPool.map: nothing running with calls {list(queue)[:4]} left")
        wait_s = None
        if self.timeout is not None:
          wait_s = max(0.0, min(w.started + self.timeout for w in busy) - time.monotonic()) + 0.01
        multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s)
        for worker in busy:
          index = worker.index
          outcome = self._check(worker, fn_name)
          if outcome is not _PENDING:
            done[index] = outcome
        while next_out in done:
          yield done.pop(next_out)
          next_out += 1
    finally:
      # Abandoned early (an error, or the caller stopped): workers still running a call would answer the next
      # map with stale results, so they go.
      for worker in [w for w in self._workers if w.index is not None]:
        self._discard(worker)
