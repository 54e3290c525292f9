"""The bench's swarm parts on a deadline: a device call is cut at 10 minutes, and a swarm still running when the
bench's time is up must stop as Ctrl-C stops it (checkpoints, whole metrics), never be left on the GPU."""

import os
import time

from bench.__main__ import _run_swarm

# stands in for `rl-swarm up`: says when it starts, and stops on SIGINT as the supervisor does, saying so
SWARM = ("-c", "import signal, sys, time\n"
               "def stop(*_):\n    print('stopping: checkpoints saved', flush=True)\n    sys.exit(130)\n"
               "signal.signal(signal.SIGINT, stop)\n"
               "print('started', flush=True)\n"
               "time.sleep(60)\n")
STUBBORN = ("-c", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('started', flush=True)\n"
                  "time.sleep(60)\n")


def test_a_swarm_past_the_deadline_is_stopped_as_ctrl_c_stops_it():
    returncode, output, cut = _run_swarm(dict(os.environ), 3, SWARM)
    assert cut and returncode == 130
    assert "started" in output and "stopping: checkpoints saved" in output


def test_a_swarm_that_ignores_ctrl_c_is_killed_after_the_grace():
    started = time.monotonic()
    returncode, _, cut = _run_swarm(dict(os.environ), 2, STUBBORN, grace=2)
    assert cut and returncode == -9
    assert time.monotonic() - started < 30


def test_a_swarm_that_finishes_in_time_is_not_cut():
    returncode, output, cut = _run_swarm(dict(os.environ), 30, ("-c", "print('done')"))
    assert (returncode, cut) == (0, False) and "done" in output
