"""The doorbell: a hand-off written on this host wakes the processes waiting for it, and costs nothing else."""

import multiprocessing
import os

from workers.shared_folder.doorbell import Doorbell, bell_dir


def _ring_when_told(root: str, go, done) -> None:
    bell = Doorbell(root, "writer")
    go.wait(30)
    bell.ring()
    done.set()
    bell.close()


def test_a_ring_from_another_process_wakes_a_waiter_long_before_its_timeout(tmp_path):
    waiter = Doorbell(tmp_path, "waiter")
    ctx = multiprocessing.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_ring_when_told, args=(str(tmp_path), go, done))
    writer.start()
    try:
        assert not waiter.wait(0.05)            # nobody rang: the wait runs out
        go.set()
        assert waiter.wait(60)                   # rung, not timed out: a round's hand-off is not a poll away
        assert done.wait(30)
    finally:
        writer.join(timeout=30)
        waiter.close()
    assert writer.exitcode == 0


def test_rings_reach_only_the_same_experiment_and_gone_waiters_are_cleaned_up(tmp_path):
    mine, other = Doorbell(tmp_path / "a", "w1"), Doorbell(tmp_path / "b", "w2")
    gone = Doorbell(tmp_path / "a", "w3")
    gone_path = gone.path
    gone.sock.close()                          # its process died without closing: the socket file stays
    gone.sock = None
    Doorbell(tmp_path / "a", "writer").ring()
    assert mine.wait(5) and not other.wait(0.05)
    assert not gone_path.exists()              # a ring that finds nobody there removes the stale socket
    assert oct(bell_dir(tmp_path / "a").parent.stat().st_mode & 0o777) == "0o700"
    assert bell_dir(tmp_path / "a").parent.stat().st_uid == os.getuid()
    for bell in (mine, other):
        bell.close()
    assert not mine.path
