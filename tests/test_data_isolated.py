"""IsolatedPool: calls in reusable worker processes; a crashed or hung worker costs only its own call."""

import os

import pytest

import fuzz_videos
from videoldm_jax.data import isolated


def test_results_in_order_from_reused_workers():
  with isolated.IsolatedPool(2) as pool:
    out = list(pool.map(fuzz_videos.double_or_crash, [(i,) for i in range(12)] + [("none",)]))
    again = list(pool.map(fuzz_videos.double_or_crash, [(i,) for i in range(4)]))
  assert [o[0] for o in out[:-1]] == [2 * i for i in range(12)] and out[-1] is None
  pids = {o[1] for o in out[:-1] + again}
  assert len(pids) == 2 and os.getpid() not in pids  # two workers, reused across calls and maps


def test_crashes_and_hangs_cost_only_their_call():
  calls = [(1,), ("segv",), (2,), ("abort",), (3,), ("hang",), (4,)]
  with isolated.IsolatedPool(2, timeout=3.0) as pool:
    out = list(pool.map(fuzz_videos.double_or_crash, calls))
    assert pool.num_lost == 3
  assert [o[0] for o in out[0::2]] == [2, 4, 6, 8]
  assert out[1] == isolated.WorkerLost(isolated.DECODER_CRASHED, "worker killed by SIGSEGV")
  assert out[3] == isolated.WorkerLost(isolated.DECODER_CRASHED, "worker killed by SIGABRT")
  assert out[5].reason == isolated.DECODER_TIMEOUT


def test_an_exception_in_the_function_is_raised_with_its_traceback():
  with isolated.IsolatedPool(1) as pool:
    with pytest.raises(isolated.WorkerError, match=r"(?s)ValueError: a bug, not a bad input.*Traceback"):
      list(pool.map(fuzz_videos.double_or_crash, [(1,), ("raise",), (2,)]))
    assert [o[0] for o in pool.map(fuzz_videos.double_or_crash, [(5,)])] == [10]  # still usable


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_workers"):
    isolated.IsolatedPool(0)
  with pytest.raises(ValueError, match="timeout"):
    isolated.IsolatedPool(1, timeout=0)
