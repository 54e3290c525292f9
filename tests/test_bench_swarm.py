"""The bench's swarm parts on a deadline: a device call is cut at 10 minutes, and a swarm still running when the
bench's time is up must stop as Ctrl-C stops it (checkpoints, whole metrics), never be left on the GPU."""

import os
import time

import pytest

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


def test_the_rounds_that_end_in_an_evaluation_or_a_checkpoint_are_told_apart_from_the_quiet_ones(tmp_path):
    """Every EVAL_EVERY and CHECKPOINT_INTERVAL rounds the workers evaluate and snapshot before their round is done:
    a mean over all rounds spreads those seconds over every hand-off. The bench reports the quiet rounds apart."""
    from bench.report import render
    from bench.swarm_stats import swarm_timing
    from tests.helpers import append_as, metrics_row, write_as
    from workers.shared_folder.folder import ExperimentFolder
    from workers.shared_folder.protocol import HeldOutEval, RoundState

    folder = ExperimentFolder(tmp_path / "exp")
    write_as(folder, "coordinator", folder.config_file, {"schema": 1, "eval_every": 5, "checkpoint_interval": 10})
    started = 1000.0
    for round_ in range(1, 14):
        write_as(folder, "coordinator", folder.round_state_file(round_),
                 RoundState(round_, 20, started, "start", ("w-1", "w-2")).to_json())
        for node in ("w-1", "w-2"):     # each worker's round: 2 s of work (generate 1 + train 1) in 2.5 s
            append_as(folder, node, folder.metrics_file(node), {**metrics_row(node, round_), "round_s": 2.5})
        started += 2.6 if round_ % 5 else 4.6     # 0.1 s of hand-off, 2.1 s after an evaluation or a checkpoint
        if round_ % 5 == 0:         # a batch of greedy answers takes its longest one's time: the bench says how long
            for node, cut_off in (("w-1", 3), ("w-2", 1)):
                append_as(folder, node, folder.eval_file(node),
                          HeldOutEval(node, round_, 0.5, 100, 2.0, mean_tokens=40.0, cut_off=cut_off).to_json())
    timing = swarm_timing(folder.root)
    assert timing["rounds"] == 10 and timing["quiet_rounds"] == 8        # rounds 3-12 measured: 5 and 10 are not quiet
    assert timing["seconds_per_quiet_round"] == pytest.approx(2.6) and timing["quiet_worker_work_seconds"] == 2.0
    assert timing["hops"]["between_quiet_rounds_s"] == pytest.approx(0.1)
    assert timing["hops"]["between_rounds_s"] == pytest.approx(0.5)      # (8 x 0.1 + 2 x 2.1) / 10
    swarm = {**timing, "wall_s": 26.0, "peak_gib_per_worker": 2.0, "peak_gib_by_round_10": 2.0,
             "mean_completion_tokens": 8.0, "final_reward_mean": 0.5}
    text = render({"device": "GPU", "date": "d", "git_sha": "abc1234", "torch": "2", "swarm_default": swarm})
    assert "the 8 of 10 rounds that end in neither a held-out evaluation nor a checkpoint: 2.600 s a round for " \
           "2.000 s of work, wall / work 1.30" in text
    assert timing["held_out"] == {"evaluations": 4, "questions": 100, "seconds": 2.0, "mean_tokens": 40.0,
                                  "cut_off": 2.0}
    assert "held-out evaluations: 4 of 100 greedy answers, 2.00 s each; answers of 40.0 tokens on average, 2.0 a " \
           "time cut off at MAX_NEW_TOKENS" in text
