"""Experiments read from the shared folder alone: list, compare, validate (any machine that mounts it)."""

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from configs_env.config import MAX_DRIVE_LAG_S
from swarm_supervisor.machines import count_restarts, supervisor_records
from swarm_supervisor.pace import rounds_per_hour
from swarm_supervisor.readable import plain
from workers.shared_folder.held_out import read_held_out
from workers.shared_folder.exchange import newest_signed_round, read_finished, read_heartbeats, signed_round_state
from workers.shared_folder.folder import ExperimentFolder, runs_on
from workers.shared_folder.recorded_config import read_recorded_config
from workers.shared_folder.rejections import RejectedFile, warn_once, warn_skipped
from workers.shared_folder.jsonl import read_jsonl
from workers.shared_folder.protocol import Heartbeat, HeldOutEval, RoundMetrics, Status
from workers.shared_folder.signing import KeyRing, signed_lines

log = logging.getLogger(__name__)


def experiment_config(folder: ExperimentFolder, keyring: KeyRing) -> dict:
    """The config.json the swarm was started with; {} when missing, unreadable, or not the coordinator's (warned
    about once)."""
    try:
        return read_recorded_config(folder, keyring)
    except RejectedFile as error:
        warn_once(str(error))
    except OSError:         # missing, or a Drive hiccup: no settings to show this time
        pass
    return {}


def metrics_by_round(folder: ExperimentFolder,
                     keyring: KeyRing) -> tuple[dict[int, dict[str, RoundMetrics]], list[str]]:
    """Every worker's valid metrics rows by round (a re-run round keeps its last row), and the bad lines."""
    rows: dict[int, dict[str, RoundMetrics]] = {}
    bad: list[str] = []
    for path in folder.metrics_files():
        name = str(path.relative_to(folder.root))
        try:
            # warned about by the whole path: a line named as in the experiment would not say which experiment,
            # and would be warned about once for every experiment with that line
            lines = read_jsonl(path, signed_lines(RoundMetrics.from_json, path.parent.name, keyring))
        except RejectedFile as error:        # not a regular file, or over the size limit: warned about once
            warn_skipped(path, error)
            bad.append(str(error).replace(str(path), name)[:200])
            continue
        except OSError as exc:               # a Drive hiccup: the next look reads it
            bad.append(f"{name}: not read ({exc.strerror or exc})")
            continue
        bad += [line.replace(str(path), name)[:200] for line in lines.bad]
        for row in lines:
            rows.setdefault(row.round, {})[row.node] = row
    return rows, bad


def held_out_by_node(folder: ExperimentFolder, keyring: KeyRing) -> tuple[dict[str, list[HeldOutEval]], list[str]]:
    """Every worker's held-out evaluations by round (round 0: before round 1), and the files with bad lines."""
    evals: dict[str, list[HeldOutEval]] = {}
    bad: list[str] = []
    for path in folder.metrics_files("eval.jsonl"):
        rows, errors = read_held_out(path, keyring)
        if errors:
            bad.append(f"{path.relative_to(folder.root)}: {errors} bad line(s)")
        if rows:
            evals[path.parent.name] = rows
    return evals, bad


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean of the finite values among `values`; None when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


RUNNING_FRESH_S = 120.0      # a coordinator heartbeat this recent says the swarm runs, plus DRIVE_LAG


def status_of(folder: ExperimentFolder, keyring: KeyRing, beats: dict[str, Heartbeat] | None = None,
              drive_lag: float = 0.0) -> str:
    """finished, running (a coordinator heartbeat of the last two minutes says so; on a machine that sees the
    folder `drive_lag` seconds late, of the last two minutes and that lag), failed or stopped."""
    if read_finished(folder, keyring) is not None:
        return "finished"
    beats = read_heartbeats(folder, keyring) if beats is None else beats
    beat = beats.get("coordinator")
    if beat is not None and beat.status == Status.RUNNING and beat.age() < RUNNING_FRESH_S + drive_lag:
        return "running"
    workers = [b for b in beats.values() if b.role == "worker"]
    if workers and all(b.status in (Status.FAILED, Status.CRASHED) for b in workers):
        return "failed"
    return "stopped"


@dataclass(frozen=True)
class Summary:
    name: str
    status: str
    rounds: int
    max_rounds: int
    nodes: int
    split: str
    model: str
    started: str
    last_activity: str
    cumulative_reward: float
    final_accuracy: float | None
    held_out_start: float | None    # greedy exact-match on the held-out set before round 1, mean of workers
    held_out_final: float | None    # the same at each worker's newest evaluation after round 0
    held_out_best: float | None     # each worker's best evaluation (round 0 included), mean of workers
    rounds_per_hour: float | None    # while it ran, downtime left out (pace.rounds_per_hour)
    restarts: int
    rejected_files: int       # folder files and groups the workers refused, plus bad metrics lines


def summarize(root: Path, cache_dir: Path | None, last_n: int = 10) -> Summary:
    """One experiment's numbers, as the node that signed each record says them (`cache_dir`: where this machine
    keeps its keys; see KeyRing.for_viewing)."""
    folder = ExperimentFolder(root)
    keyring = KeyRing.for_viewing(folder, cache_dir)
    cfg = experiment_config(folder, keyring)
    by_round, bad = metrics_by_round(folder, keyring)
    evals, bad_evals = held_out_by_node(folder, keyring)
    # the SAPO paper's measure: the sum over rounds of the mean reward of every worker
    cumulative = sum(sum(r.reward_mean for r in nodes.values()) / len(nodes) for nodes in by_round.values())
    tail = [r for k in sorted(by_round)[-last_n:] for r in by_round[k].values()]
    beats = read_heartbeats(folder, keyring)
    status = status_of(folder, keyring, beats, _drive_lag(cfg.get("drive_lag")))
    # the rounds the coordinator signed: a state file's name is anyone's to plant (round_999999.json)
    last = per_hour = None
    try:
        last = newest_signed_round(folder, keyring)
        per_hour = rounds_per_hour(partial(signed_round_state, folder, keyring), last, status == "running")
    except OSError:         # a Drive hiccup: no pace this time
        pass
    last_seen = max((b.updated_at for b in beats.values()), default=None)
    return Summary(
        name=root.name, status=status,
        rounds=last.round if last else 0,
        max_rounds=setting_of(cfg, "max_rounds", 0),
        nodes=len({n for nodes in by_round.values() for n in nodes}),
        split=f"I={cfg.get('num_train_samples', '?')} J={cfg.get('num_transplant_trees', '?')} "
              f"G={cfg.get('num_generations', '?')}",
        model=str(cfg.get("model_resolved", "?")),
        started=_when(cfg.get("started_at")), last_activity=_when(last_seen or None),
        cumulative_reward=cumulative,
        final_accuracy=sum(r.accuracy for r in tail) / len(tail) if tail else None,
        held_out_start=mean_or_none([rows[0].accuracy for rows in evals.values() if rows[0].round == 0]),
        held_out_final=mean_or_none([rows[-1].accuracy for rows in evals.values() if rows[-1].round > 0]),
        held_out_best=mean_or_none([max(r.accuracy for r in rows) for rows in evals.values()]),
        rounds_per_hour=per_hour, restarts=count_restarts(folder),
        rejected_files=len(bad) + len(bad_evals) + sum(b.rejected for b in beats.values()))


def _drive_lag(value: object) -> float:
    """The recorded DRIVE_LAG within the setting's range (a forged 1e300 would call a long-dead swarm running)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    return min(float(value), MAX_DRIVE_LAG_S) if ok else 0.0


def setting_of(cfg: dict, key: str, default: int) -> int:
    """An integer of the recorded config.json; its default when the file says anything else."""
    value = cfg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _when(timestamp: object) -> str:
    """A recorded time as a date; "-" for none, or for one no clock shows (a forged 1e300)."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return "-"


def summaries_csv(summaries: list[Summary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(Summary.__dataclass_fields__)
    for s in summaries:
        writer.writerow(plain(v) if isinstance(v, str) else v for v in s.__dict__.values())
    return out.getvalue()


# -- plots ----------------------------------------------------------------------------------------

def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_experiments(roots: list[Path], out: Path, cache_dir: Path | None, window: int = 10) -> Path:
    """Reward and exact-match per round (smoothed, band = min..max over workers), seconds per round, GPU per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (reward_ax, acc_ax), (speed_ax, gpu_ax) = axes
    for root in roots:
        folder = ExperimentFolder(root)
        keyring = KeyRing.for_viewing(folder, cache_dir)
        by_round, _ = metrics_by_round(folder, keyring)
        rounds = sorted(by_round)
        if not rounds:
            continue
        for ax, field in ((reward_ax, "reward_mean"), (acc_ax, "accuracy")):
            means = [sum(getattr(r, field) for r in by_round[k].values()) / len(by_round[k]) for k in rounds]
            lows = [min(getattr(r, field) for r in by_round[k].values()) for k in rounds]
            highs = [max(getattr(r, field) for r in by_round[k].values()) for k in rounds]
            line, = ax.plot(rounds, _smooth(means, window), label=root.name)
            ax.fill_between(rounds, _smooth(lows, window), _smooth(highs, window), alpha=0.15,
                            color=line.get_color())
        held_out: dict[int, list[float]] = {}
        for rows in held_out_by_node(folder, keyring)[0].values():
            for row in rows:
                held_out.setdefault(row.round, []).append(row.accuracy)
        if held_out:
            # not smoothed: each point is already the mean over every held-out question and worker
            acc_ax.plot(sorted(held_out), [sum(held_out[k]) / len(held_out[k]) for k in sorted(held_out)], "o--",
                        color=line.get_color(), label=f"{root.name} held-out")
        speed = [max(r.round_s for r in by_round[k].values()) for k in rounds]
        speed_ax.plot(rounds, _smooth(speed, window), label=root.name)
        rows = _gpu_samples(folder)
        for node in sorted({n for row in rows for n in row["nodes"]}):
            points = [(row["time"] - rows[0]["time"], row["nodes"][node]) for row in rows if node in row["nodes"]]
            if points:
                gpu_ax.plot(*zip(*points), label=f"{root.name}/{node}")
    reward_ax.set(title=f"reward per round (mean of workers, {window}-round average; band: min..max)",
                  xlabel="round", ylabel="reward")
    acc_ax.set(title="exact-match rate: training (line), held-out greedy (o--)", xlabel="round", ylabel="accuracy")
    speed_ax.set(title="seconds per round (slowest worker)", xlabel="round", ylabel="s")
    gpu_ax.set(title="GPU memory per node (NVML)", xlabel="seconds", ylabel="MiB")
    if not gpu_ax.lines:     # a CPU run: say so rather than draw an empty frame that looks like a failure
        gpu_ax.text(0.5, 0.5, "N/A: no GPU samples (CPU run)", ha="center", va="center", transform=gpu_ax.transAxes)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _gpu_sample(record: dict, where: str) -> dict:
    """{"time": t, "nodes": {node: GPU MiB}} of a monitor.jsonl line; nodes without a number are left out."""
    nodes = record.get("nodes")
    if isinstance(record.get("time"), bool) or not isinstance(record.get("time"), (int, float)) \
            or not isinstance(nodes, dict):
        raise RejectedFile(f"{where}: not a monitor sample (time and nodes)")
    return {"time": record["time"],
            "nodes": {node: sample["gpu_mib"] for node, sample in nodes.items() if isinstance(sample, dict)
                      and isinstance(sample.get("gpu_mib"), (int, float)) and not isinstance(sample["gpu_mib"], bool)}}


def _gpu_samples(folder: ExperimentFolder) -> list[dict]:
    """Every machine's monitor samples, by time, each with the nodes that machine runs; a file that cannot be
    read leaves its machine's workers out of the plot's GPU panel, not the plot."""
    records, _ = supervisor_records(folder, folder.monitor_file_of, _gpu_sample)
    samples = [{**sample, "nodes": {node: mib for node, mib in sample["nodes"].items() if runs_on(machine, node)}}
               for machine, sample in records]
    return sorted(samples, key=lambda sample: sample["time"])


# -- aggregate over seeds -------------------------------------------------------------------------

# two-sided 95% Student-t critical values by degrees of freedom (1..10); 1.96 beyond
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, _T95.get(n - 1, 1.96) * sd / n ** 0.5


@dataclass(frozen=True)
class Aggregate:
    configuration: str
    experiments: tuple[str, ...]
    cumulative_reward: tuple[float, float | None]
    final_accuracy: tuple[float, float | None] | None
    held_out_final: tuple[float, float | None] | None = None


def aggregate(roots: list[Path], cache_dir: Path | None) -> list[Aggregate]:
    """Experiments that differ only in SEED are one configuration: mean and 95% interval across them."""
    groups: dict[str, list[Summary]] = {}
    for root in roots:
        folder = ExperimentFolder(root)
        cfg = experiment_config(folder, KeyRing.for_viewing(folder, cache_dir))
        key = (f"{cfg.get('model_resolved', '?')} I={cfg.get('num_train_samples', '?')} "
               f"J={cfg.get('num_transplant_trees', '?')} G={cfg.get('num_generations', '?')} "
               f"workers={cfg.get('num_workers', '?')} rounds={cfg.get('max_rounds', '?')}")
        groups.setdefault(key, []).append(summarize(root, cache_dir))
    out = []
    for key, members in sorted(groups.items()):
        accuracies = [m.final_accuracy for m in members if m.final_accuracy is not None]
        held_out = [m.held_out_final for m in members if m.held_out_final is not None]
        out.append(Aggregate(configuration=key, experiments=tuple(m.name for m in members),
                             cumulative_reward=mean_interval([m.cumulative_reward for m in members]),
                             final_accuracy=mean_interval(accuracies) if accuracies else None,
                             held_out_final=mean_interval(held_out) if held_out else None))
    return out
