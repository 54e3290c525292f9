"""A node's held-out evaluations as the shared folder keeps them (metrics/<node>/eval.jsonl): read by round, and
the trend that says whether the node still learns. Torch-free: `status`, `experiments` and the supervisor read
them without loading the learning code that makes them (workers.evaluation).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.rejections import RejectedFile, warn_skipped
from workers.shared_folder.jsonl import read_jsonl
from workers.shared_folder.protocol import HeldOutEval
from workers.shared_folder.signing import KeyRing, signed_lines

log = logging.getLogger(__name__)

# The learning-health guard: a node is "falling" when each of its last FALL_EVALUATIONS evaluations sits more
# than FALL_POINTS below the best one before them (one bad evaluation of 100 questions can be noise; two are a trend)
FALL_POINTS, FALL_EVALUATIONS = 0.10, 2


@dataclass(frozen=True)
class HeldOutTrend:
    """A node's held-out accuracy against its start and its best: the numbers that say whether it still learns."""

    start: float | None = None         # before round 1
    best: float | None = None
    best_round: int | None = None
    newest: float | None = None        # the newest evaluation after round 0
    newest_round: int | None = None
    falling: bool = False

    def warning(self, node: str) -> str | None:
        if not self.falling or self.best is None or self.newest is None:
            return None
        return (f"{node}: held-out accuracy {self.newest:.0%} at round {self.newest_round}, down from its best "
                f"{self.best:.0%} at round {self.best_round} ({FALL_EVALUATIONS} evaluations in a row more than "
                f"{FALL_POINTS * 100:.0f} points below it); its best model is in checkpoints/{node}/best/")


def held_out_trend(rows: list[HeldOutEval]) -> HeldOutTrend:
    """Start, best and newest of a node's evaluations (sorted by round), and whether it is falling."""
    if not rows:
        return HeldOutTrend()
    best = max(rows, key=lambda r: (r.accuracy, -r.round))        # the earliest of equal bests
    newest = rows[-1] if rows[-1].round > 0 else None
    earlier = rows[:-FALL_EVALUATIONS]
    falling = bool(earlier) and all(r.accuracy < max(e.accuracy for e in earlier) - FALL_POINTS
                                    for r in rows[-FALL_EVALUATIONS:])
    return HeldOutTrend(start=rows[0].accuracy if rows[0].round == 0 else None, best=best.accuracy,
                        best_round=best.round, newest=newest.accuracy if newest else None,
                        newest_round=newest.round if newest else None, falling=falling)


def eval_file(folder: ExperimentFolder, node: str) -> Path:
    return folder.eval_file(node)


def read_held_out(path: Path, keyring: KeyRing) -> tuple[list[HeldOutEval], int]:
    """One node's evaluations by round (a repeated round keeps its last line) and the count of bad lines; a line
    counts only when the node of its folder (metrics/<node>/eval.jsonl) signed it."""
    try:
        lines = read_jsonl(path, signed_lines(HeldOutEval.from_json, path.parent.name, keyring))   # bad: warned
    except RejectedFile as error:     # over its size limit, or not a regular file
        warn_skipped(path, error)
        return [], 1
    except OSError as error:          # a Drive hiccup: the next call reads them
        log.warning("%s: %s", path, error)
        return [], 0
    by_round = {row.round: row for row in lines}
    return [by_round[r] for r in sorted(by_round)], len(lines.bad)
