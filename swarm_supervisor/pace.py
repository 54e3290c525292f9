"""How many rounds an hour a swarm makes while it runs: one answer for the dashboard, `rl-swarm status` and
`rl-swarm experiments compare`, read from the coordinator's round states alone.

A run is what one `rl-swarm up` played: each round state names the round its run began with (a resume begins a
new run). A run is timed from its second round's start to its last round's start: its first round holds the
workers' start (loading the model, the round-0 evaluation), and the time between a run's last round and the next
run's first holds the downtime before the resume. Neither is a round the swarm made while it ran.
"""

import math
from dataclasses import dataclass
from typing import Callable

from workers.shared_folder.protocol import RoundState

# rounds of the current run timed before its own pace stands for the swarm's: the first ones after a resume
# are too few to say more than one slow round (an evaluation, a checkpoint) does
RECENT_TIMED = 3
# runs looked at, newest first: each costs two reads, and a swarm resumed thousands of times stays cheap to view
MAX_RUNS = 64


@dataclass(frozen=True)
class Stretch:
    """Rounds played one after another within a run, and the seconds between the first's start and the last's."""

    rounds: int
    seconds: float

    @property
    def per_hour(self) -> float | None:
        """None for no time (or a forged start time's overflow): no pace rather than an infinite ETA."""
        if self.rounds <= 0 or not self.seconds > 0:
            return None
        rate = self.rounds / self.seconds * 3600
        return rate if math.isfinite(rate) and rate > 0 else None


def run_stretches(read: Callable[[int], RoundState | None], newest: RoundState) -> list[Stretch]:
    """Each run's timed stretch (empty for a run of under three rounds), newest run first; `read` gives a round's
    signed state or None (missing, forged).

    Rounds are read by number, so a long run whose listing keeps only its oldest and newest rounds is timed whole."""
    stretches, last = [], newest
    for _ in range(MAX_RUNS):
        first = last.run_first_round
        second = read(first + 1) if last.round > first + 1 else None
        timed = second is not None and second.run_first_round == first
        stretches.append(Stretch(last.round - second.round, last.started_at - second.started_at) if timed
                         else Stretch(0, 0.0))
        if first <= 1:
            break
        last = read(first - 1)          # the previous run's last round
        if last is None:
            break
    return stretches


def rounds_per_hour(read: Callable[[int], RoundState | None], newest: RoundState | None,
                    running: bool) -> float | None:
    """Rounds an hour while the swarm ran, downtime and each run's start left out: of the current run while it
    runs (once RECENT_TIMED rounds are timed), else of every run. With nothing else to time yet (a run's first
    rounds), the newest run's pace from its first round."""
    if newest is None:
        return None
    stretches = run_stretches(read, newest)
    if running and stretches[0].rounds >= RECENT_TIMED:
        return stretches[0].per_hour
    timed = [s for s in stretches if s.per_hour is not None]      # a stretch of no time adds no pace
    whole = Stretch(sum(s.rounds for s in timed), sum(s.seconds for s in timed))
    if whole.per_hour is not None:
        return whole.per_hour
    first = read(newest.run_first_round) if newest.round > newest.run_first_round else None
    return Stretch(newest.round - first.round, newest.started_at - first.started_at).per_hour if first else None
