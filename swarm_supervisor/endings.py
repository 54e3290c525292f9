"""How each worker's run ended, as the run's summary says it: finished at round 3, stopped at round 12, failed: why.

Built from the supervisor's last view (status.NodeRow): a worker the supervisor ran shows how its process ended, not
the stage its heartbeat last named. Many workers that ended alike are one line ("worker-1..24: stopped at round 12-13").
"""

import re
from dataclasses import dataclass

from swarm_supervisor.experiments import mean_or_none
from swarm_supervisor.status import NodeRow
from workers.shared_folder.protocol import Status

EACH_UP_TO = 8          # workers a summary lists one by one; more are grouped by how they ended
NUMBERED = re.compile(r"(.*?)(\d+)")


def ending(row: NodeRow) -> tuple[str, str]:
    """How one worker ended, as (what, why): ("stopped at round {}", "killed: ..."), ("failed at round {}", "boom");
    {} is where its round goes."""
    why = ((row.last_error or "").strip().splitlines() or [""])[-1]
    if row.status == Status.FAILED:
        return ("failed at round {}" if row.round is not None else "failed"), why or "no reason recorded"
    if row.round is None:           # no heartbeat of this run: its process never got as far as beating
        return "stopped while starting", why
    if row.status == Status.DONE:
        return "finished at round {}", why
    if row.status == Status.RESTARTING:
        return "stopped after round {} waiting to restart", why
    if row.status == Status.STOPPED:
        return ("stopped before its first round" if row.round == 0 else "stopped at round {}"), why
    return f"{row.status} at round {{}}", why       # a view of a swarm still running


@dataclass(frozen=True)
class Ending:
    """Workers that ended alike, and what they reached."""

    rows: tuple[NodeRow, ...]
    what: str                     # "stopped at round {}"
    why: str                      # "" or the error or kill that ended them

    def words(self) -> str:
        """"worker-1..24: stopped at round 12-13", "worker-3: failed at round 5: CUDA out of memory"."""
        rounds = sorted({row.round for row in self.rows if row.round is not None}) or [0]
        # not str.format: a status from another machine's heartbeat may hold braces
        text = self.what.replace("{}", str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}")
        if self.why:
            text += f": {self.why}" if self.what.startswith("failed") else f" ({self.why})"
        return f"{node_ranges([row.node_id for row in self.rows])}: {text}"

    def numbers(self) -> str:
        """Reward, held-out start -> newest, restarts: a worker's own, or a group's means and restarts summed."""
        rows, mean = self.rows, "mean " if len(self.rows) > 1 else ""
        reward = mean_or_none([row.reward for row in rows])
        held_out = [mean_or_none([getattr(row, field) for row in rows]) for field in ("held_out_start", "held_out")]
        shown = " -> ".join(f"{value:.1%}" for value in held_out if value is not None) or "-"
        return f"{mean}reward {'-' if reward is None else f'{reward:.3f}'}, {mean}held-out {shown}, " \
               f"restarts {sum(row.restarts for row in rows)}"


def endings(rows: list[NodeRow], each_up_to: int = EACH_UP_TO) -> list[Ending]:
    """The workers' endings: one each for a few workers, one per way of ending for more (in the workers' order)."""
    workers = [row for row in rows if row.role == "worker"]
    if len(workers) <= each_up_to:
        return [Ending((row,), *ending(row)) for row in workers]
    grouped: dict[tuple[str, str], list[NodeRow]] = {}
    for row in workers:
        grouped.setdefault(ending(row), []).append(row)
    return [Ending(tuple(group), what, why) for (what, why), group in grouped.items()]


def node_ranges(names: list[str]) -> str:
    """"worker-1..5, 7, 9..24": numbered names in runs of consecutive numbers, others as they are."""
    runs: list[list] = []              # [prefix, first, last], or [name] for a name without a number
    for name in names:
        numbered = NUMBERED.fullmatch(name)
        if numbered is None or numbered[2] != str(int(numbered[2])):      # worker-01 stays as it is written
            runs.append([name])
        elif runs and len(runs[-1]) == 3 and runs[-1][0] == numbered[1] and runs[-1][2] + 1 == int(numbered[2]):
            runs[-1][2] += 1
        else:
            runs.append([numbered[1], int(numbered[2]), int(numbered[2])])
    parts, prefix = [], None
    for run in runs:
        if len(run) == 1:
            parts.append(run[0])
        else:
            parts.append(("" if run[0] == prefix else run[0]) + (f"{run[1]}..{run[2]}" if run[2] > run[1] else
                                                                  str(run[1])))
        prefix = run[0] if len(run) == 3 else None
    return ", ".join(parts)
