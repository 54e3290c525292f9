"""`python -m bench peers` on the CPU: TRL's GRPOTrainer and rl-swarm run the same small workload from one base and
both come back with the four measures (speed alone, memory per process, completions/s with 2 at once, held-out)."""

import time

import pytest

pytest.importorskip("trl", reason="trl is not installed (the bench extra: pip install -e '.[bench]')")

from bench.peers import PeersPlan, bench_peers, peers_lines  # noqa: E402 - only where trl is


@pytest.mark.slow
def test_trl_and_the_swarm_report_the_same_four_measures_after_the_same_updates(tmp_path):
    plan = PeersPlan(model="rl-swarm/tiny-gpt2", work=tmp_path / "peers", cache=tmp_path / "cache", updates=2,
                     many_updates=2, warmup_updates=1, counts=(2,), deadline=time.time() + 600, quick=True,
                     default_split=False)
    out = bench_peers(plan)
    for side in ("trl", "rl_swarm"):
        measures = out[side]
        assert 0 < measures["seconds_per_update"] < 120 and measures["measured_updates"] == 2, side
        assert 0.05 < measures["peak_gib_per_process"] < 8 and measures["memory_source"] == "rss", side
        assert measures["completions_per_s"]["2"] > 0, side
        held = measures["held_out"]
        assert len(held["per_seed"]) == 2 and all(0 <= a <= 1 for a in held["per_seed"]), side
        assert held["updates"] == [3, 3], side          # warm-up + measured, the same count on both sides
    # where one update's time goes on each side: the first measured update, profiled operator by operator
    assert out["profile"]["trl"].startswith("TRL update 2: ") and out["profile"]["rl_swarm"].startswith("round 2: ")
    assert all("aten::" in text and "Self CPU time total" in text for text in out["profile"].values())
    text = "\n".join(peers_lines(out))
    assert "| completions/s, 2 processes (rl-swarm I=4, J=0) |" in text
    assert "held-out exact-match (rl-swarm I=4, J=0)" in text
