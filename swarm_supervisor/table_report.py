"""The table several swarms make: cumulative reward, gain over no sharing and held-out accuracy, over seeds.

The measures are the SAPO paper's (arXiv:2509.08721, Table 1): cumulative reward is the sum over rounds of the
workers' mean reward; a split's gain is its cumulative reward over the no-sharing split's, seed by seed.
"""

from dataclasses import dataclass
from pathlib import Path

from swarm_supervisor.experiments import held_out_by_node, mean_interval, metrics_by_round
from swarm_supervisor.table import Arm
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import HeldOutEval
from workers.shared_folder.signing import KeyRing


@dataclass(frozen=True)
class TableRow:
    """One split (or sweep arm) over its seeds; each tuple holds one value per seed, in the seeds' order."""

    label: str
    experiments: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: tuple[int, ...]                    # the rounds compared: the most every split of the seed reached
    rounds_reached: tuple[int, ...]            # the rounds this split's swarm ran
    cumulative_reward: tuple[float, ...]
    held_out_start: tuple[float | None, ...]
    held_out_end: tuple[float | None, ...]
    task_rewards: dict[str, float]             # mean reward per task over every round, worker and seed
    reward_per_round: tuple[tuple[float, ...], ...]   # per seed: the workers' mean reward, round by round

    def to_json(self) -> dict:
        return {"split": self.label, "experiments": list(self.experiments), "seeds": list(self.seeds),
                "rounds": list(self.rounds), "rounds_reached": list(self.rounds_reached),
                "cumulative_reward": [round(v, 4) for v in self.cumulative_reward],
                "held_out_start": [None if v is None else round(v, 4) for v in self.held_out_start],
                "held_out_end": [None if v is None else round(v, 4) for v in self.held_out_end],
                "task_rewards": {k: round(v, 4) for k, v in self.task_rewards.items()}}


def table_rows(arms: list[Arm], roots: dict[str, Path], cache_dir: Path | None,
               common_rounds: bool = True) -> list[TableRow]:
    """Rows in the arms' order of labels; `roots` maps each arm's experiment to its folder. With `common_rounds`,
    a seed's splits are compared over the rounds every one of them reached: a table stopped early has some splits
    rounds ahead, and a sum over more rounds is no match for one over fewer. Without it (a sweep whose arms run
    for different lengths by design) each arm counts every round it ran."""
    records = {}
    for arm in arms:
        folder = ExperimentFolder(roots[arm.experiment])
        keyring = KeyRing.for_viewing(folder, cache_dir)
        records[arm.experiment] = (metrics_by_round(folder, keyring)[0], held_out_by_node(folder, keyring)[0])
    reached = {name: max(by_round, default=0) for name, (by_round, _) in records.items()}
    common = {seed: min(reached[a.experiment] for a in arms if a.seed == seed) for seed in {a.seed for a in arms}}
    cutoff = {a.experiment: common[a.seed] if common_rounds else reached[a.experiment] for a in arms}
    rows = []
    for label in dict.fromkeys(arm.label for arm in arms):
        members = sorted((a for a in arms if a.label == label), key=lambda a: a.seed)
        task_sums: dict[str, list[float]] = {}
        curves, starts, ends = [], [], []
        for arm in members:
            by_round, evals = records[arm.experiment]
            kept = [by_round[r] for r in sorted(by_round) if r <= cutoff[arm.experiment]]
            curves.append(tuple(sum(m.reward_mean for m in nodes.values()) / len(nodes) for nodes in kept))
            for nodes in kept:
                for metrics in nodes.values():
                    for task, reward in (metrics.task_rewards or {}).items():
                        task_sums.setdefault(task, []).append(reward)
            starts.append(_mean([e[0].accuracy for e in evals.values() if e[0].round == 0]))
            ends.append(_mean([e.accuracy for e in (_newest(node, cutoff[arm.experiment]) for node in evals.values())
                               if e is not None]))
        rows.append(TableRow(label=label, experiments=tuple(a.experiment for a in members),
                             seeds=tuple(a.seed for a in members), rounds=tuple(cutoff[a.experiment] for a in members),
                             rounds_reached=tuple(reached[a.experiment] for a in members),
                             cumulative_reward=tuple(sum(c) for c in curves),
                             held_out_start=tuple(starts), held_out_end=tuple(ends),
                             task_rewards={t: sum(v) / len(v) for t, v in sorted(task_sums.items())},
                             reward_per_round=tuple(curves)))
    return rows


def _newest(evals: list[HeldOutEval], round_: int) -> HeldOutEval | None:
    """A worker's newest evaluation after round 0 and at or before `round_`."""
    return max((e for e in evals if 0 < e.round <= round_), key=lambda e: e.round, default=None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_cutoffs(rows: list[TableRow]) -> str:
    """One line per seed whose splits stopped at different rounds: what the table compares, and what each reached."""
    lines = []
    for i, seed in enumerate(rows[0].seeds if rows else ()):
        reached = {row.label: row.rounds_reached[i] for row in rows if i < len(row.rounds_reached)}
        if len(set(reached.values())) > 1:
            lines.append(f"seed {seed}: compared over the first {rows[0].rounds[i]} rounds, the most every split "
                         "reached (" + ", ".join(f"{label} {n}" for label, n in reached.items()) + ")")
    return "\n".join(lines)


def gains(row: TableRow, baseline: TableRow) -> list[float]:
    """The row's cumulative reward over the baseline's, minus 1, for each seed both ran for as many rounds (a sum
    over 150 rounds is no match for one over 500) and whose baseline is positive."""
    base = {seed: (rounds, value) for seed, rounds, value in zip(baseline.seeds, baseline.rounds,
                                                                  baseline.cumulative_reward)}
    return [value / base[seed][1] - 1 for seed, rounds, value in zip(row.seeds, row.rounds, row.cumulative_reward)
            if seed in base and base[seed][0] == rounds and base[seed][1] > 0]


def _shown(values: list[float], percent: bool = False, signed: bool = False) -> str:
    if not values:
        return "-"
    mean, half = mean_interval(values)
    fmt = (lambda v: f"{v:+.1%}" if signed else f"{v:.1%}") if percent else \
        (lambda v: f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}")
    return fmt(mean) + ("" if half is None else f" ± {fmt(half).lstrip('+')}")


def format_table(rows: list[TableRow], paper: dict[str, float] | None = None) -> str:
    """The paper's table: cumulative reward and gain over the first row (no sharing), mean ± 95% interval."""
    header = ["split", "seeds", "rounds", "cumulative reward", "gain vs " + rows[0].label if rows else "gain",
              "held-out start", "held-out end"]
    if paper:
        header += ["paper: cumulative", "paper: gain"]
    lines = [header]
    paper_rows = list(paper.items()) if paper else []
    for number, row in enumerate(rows):
        cells = [row.label, str(len(row.seeds)), "/".join(str(r) for r in sorted(set(row.rounds))),
                 _shown(list(row.cumulative_reward)),
                 "-" if number == 0 else _shown(gains(row, rows[0]), percent=True, signed=True),
                 _shown([v for v in row.held_out_start if v is not None], percent=True),
                 _shown([v for v in row.held_out_end if v is not None], percent=True)]
        if paper_rows and number < len(paper_rows):
            name, value = paper_rows[number]
            first = paper_rows[0][1]
            cells += [f"{value:.1f} ({name})", "-" if number == 0 else f"{value / first - 1:+.0%}"]
        elif paper:
            cells += ["-", "-"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def format_task_rewards(rows: list[TableRow]) -> str:
    """Mean reward per task for each row: which tasks sharing helps."""
    tasks = sorted({t for row in rows for t in row.task_rewards})
    if not tasks:
        return ""
    width = max(len(t) for t in tasks)
    lines = [f"{'task':<{width}}  " + "  ".join(f"{row.label:>8}" for row in rows)]
    for task in tasks:
        cells = [f"{row.task_rewards[task]:8.3f}" if task in row.task_rewards else f"{'-':>8}" for row in rows]
        lines.append(f"{task:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_table(rows: list[TableRow], out: Path, window: int = 20) -> Path:
    """Reward per round per row, smoothed; the band spans the seeds (lowest to highest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for row in rows:
        curves = [_smooth(list(c), window) for c in row.reward_per_round if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        rounds = list(range(1, length + 1))
        columns = [[c[i] for c in curves] for i in range(length)]
        line, = ax.plot(rounds, [sum(col) / len(col) for col in columns], label=f"{row.label} ({len(curves)} seeds)")
        ax.fill_between(rounds, [min(col) for col in columns], [max(col) for col in columns], alpha=0.15,
                        color=line.get_color())
    ax.set(title=f"reward per round ({window}-round average; band: lowest..highest seed)", xlabel="round",
           ylabel="mean reward of the workers")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
